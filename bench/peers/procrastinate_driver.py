"""procrastinate's driver (run with bench/.venvs/procrastinate's Python; see _driver.py).

Fastest documented setup: the async ``PsycopgConnector`` (psycopg 3 pool), async tasks, a worker
with ``concurrency`` parallel jobs and LISTEN/NOTIFY on; the connection pool is sized to the
concurrency (each slot fetches and finishes its own job, one statement each). Enqueue:
``task.defer_async`` and, in bulk, ``task.batch_defer_async`` (one statement per batch).
In the app scenario the job is deferred on the app's own connection (``configure(connection=)``).

Queues, delay, priority (the protocol's optional parameters) map onto ``task.configure(...)``:
``queue`` -> ``queue=`` (overrides the task's default queue "bench"; a worker runs any registered
task whatever queue the job is in, so "noop" and "sleep" run on every served queue);
``delay`` -> ``schedule_in={"seconds": delay}`` (sets ``scheduled_at``; computed once per
``configure`` call, i.e. per job in single mode and per batch in bulk mode);
``priority`` "high" -> ``priority=1``: in procrastinate higher runs first and the default is 0
(the fetch orders ``priority DESC, id ASC`` over every served queue, so it is strict priority then
FIFO across queues, no per-queue round robin). With no option given, ``task.configure()`` is
exactly what ``task.defer_async`` does itself, so the default path is unchanged.
A worker serves several queues the documented way, one ``Worker(queues=[...])`` (the CLI's
``procrastinate worker -q a,b``); ``concurrency`` is one total for the process, shared by all its
queues (procrastinate has no per-queue pool, so nothing is split).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as d
import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate.worker import Worker

# Chosen by trying combinations on this machine (see docs/benchmarks.md).
CONCURRENCY = 100
POOL_SIZE = 20


def make_app(dsn: str, pool_size: int = 4) -> tuple[App, Any, Any]:
    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=min(4, pool_size), max_size=pool_size))

    @app.task(name="noop", queue=d.QUEUE)
    async def noop(**args: Any) -> None:
        d.noop_handler_body(args)

    @app.task(name="sleep", queue=d.QUEUE)
    async def sleep(**args: Any) -> None:
        await d.sleep_handler_body(args)

    return app, noop, sleep


def job_options(command: dict[str, Any]) -> dict[str, Any]:
    """The protocol's queue, delay and priority as ``Task.configure`` options (see above)."""
    options: dict[str, Any] = {}
    if command.get("queue"):
        options["queue"] = command["queue"]
    if command.get("delay"):
        options["schedule_in"] = {"seconds": float(command["delay"])}
    if command.get("priority") == "high":
        options["priority"] = 1
    return options


class Procrastinate:
    def __init__(self, command: dict[str, Any]) -> None:
        self.dsn = command["dsn"]
        self.task_name = command.get("task", "noop")

    def _app(self, pool_size: int = 4) -> tuple[App, Any]:
        app, noop, sleep = make_app(self.dsn, pool_size)
        return app, (noop if self.task_name == "noop" else sleep)

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        app, _ = self._app()
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        return {}

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        options = job_options(command)
        app, task = self._app()
        async with app.open_async():
            # Open the pool (and run the insert once) outside the timing; then delete that job so
            # the queue holds exactly n (a delayed scenario counts what is left to the job).
            warm = await task.configure(**options).defer_async(w=1)
            await app.job_manager.cancel_job_by_id_async(warm, delete_job=True)
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    await task.configure(**options).defer_async(**d.job_args(command))
            else:
                for start in range(0, n, batch):
                    args = d.job_args(command)
                    await task.configure(**options).batch_defer_async(
                        *[args for _ in range(min(batch, n - start))]
                    )
            seconds = time.perf_counter() - begin
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        concurrency = int(command.get("concurrency") or CONCURRENCY)
        pool_size = int(command.get("pool_size") or min(max(POOL_SIZE, concurrency // 2), 60))
        app, _ = self._app(pool_size)
        async with app.open_async():
            worker = Worker(
                app,
                queues=d.queues_of(command),
                concurrency=concurrency,
                wait=True,
                install_signal_handlers=False,
                listen_notify=True,
                fetch_job_polling_interval=float(command.get("poll_interval") or 5.0),
            )

            async def stop() -> None:
                worker.stop()

            result = await d.run_worker(worker.run, stop, command)
        return {**result, "config": {"concurrency": concurrency, "pool_size": pool_size}}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        options = job_options(command)
        app, task = self._app()
        async with app.open_async():

            async def one(args: dict[str, Any]) -> None:
                await task.configure(**options).defer_async(**args)

            async def many(items: list[dict[str, Any]]) -> None:
                await task.configure(**options).batch_defer_async(*items)

            return await d.run_producer(one, many, command)

    async def app(self, command: dict[str, Any]) -> dict[str, Any]:
        if not command.get("notify", True):
            raise NotImplementedError("procrastinate always notifies (a row trigger on its jobs table)")
        app, task = self._app()
        async with app.open_async():

            async def enqueue(c: psycopg.AsyncConnection[Any]) -> None:
                await task.configure(connection=c).defer_async(t=time.time())

            return await d.run_psycopg_app(self.dsn, command, enqueue)

    async def count(self, command: dict[str, Any]) -> dict[str, Any]:
        return await d.psycopg_count(
            self.dsn,
            "SELECT count(*) FILTER (WHERE status IN ('todo', 'doing')),"
            " count(*) FILTER (WHERE status = 'succeeded') FROM procrastinate_jobs",
        )


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    d.main(Procrastinate)
