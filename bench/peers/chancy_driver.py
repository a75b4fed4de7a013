"""Chancy's driver (run with bench/.venvs/chancy's Python; see _driver.py for the protocol).

Fastest documented setup for async work: a queue on the ``AsyncExecutor`` with ``eager_polling``
(poll again as soon as a job finishes) and the shortest polling interval (1 s, an int), LISTEN/NOTIFY
on, default plugins (leadership, pruner, recovery, metrics, workflows) as a user gets them, and
logging at WARNING (Chancy logs every pulled job at INFO). Enqueue: ``push`` and, in bulk,
``push_many`` (batches of 1,000, one transaction each). Chancy can turn NOTIFY off
(``Chancy(notifications=False)``), so the app scenario runs both ways.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as d
import chancy_tasks
import psycopg
from chancy import Chancy, Job, Queue, Worker
from psycopg.rows import dict_row

CONCURRENCY = 200
LOG = logging.getLogger("bench.chancy")
LOG.setLevel(logging.WARNING)
LOG.addHandler(logging.StreamHandler(sys.stderr))


class ChancySystem:
    def __init__(self, command: dict[str, Any]) -> None:
        self.dsn = command["dsn"]
        self.func = chancy_tasks.noop if command.get("task", "noop") == "noop" else chancy_tasks.sleep

    def _chancy(self, notifications: bool = True, pool: int = 10) -> Chancy:
        return Chancy(self.dsn, log=LOG, notifications=notifications, max_connection_pool_size=pool)

    def _job(self, args: dict[str, Any]) -> Job:
        return Job.from_func(self.func, queue=d.QUEUE, kwargs=args)

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        async with self._chancy() as chancy:
            await chancy.migrate()
        return {}

    async def _declare(self, chancy: Chancy, concurrency: int) -> None:
        await chancy.declare(
            Queue(
                d.QUEUE,
                concurrency=concurrency,
                executor=Chancy.Executor.Async,
                polling_interval=1,
                eager_polling=True,
            ),
            upsert=True,
        )

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        async with self._chancy(notifications=bool(command.get("notify", True))) as chancy:
            await chancy.push(self._job({"w": 1}))
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    await chancy.push(self._job(d.job_args(command)))
            else:
                for start in range(0, n, batch):
                    now = time.time()
                    jobs = [self._job({"t": now}) for _ in range(min(batch, n - start))]
                    async for _refs in chancy.push_many(jobs, batch_size=batch):
                        pass
            seconds = time.perf_counter() - begin
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        concurrency = int(command.get("concurrency") or CONCURRENCY)
        async with self._chancy(pool=int(command.get("pool_size") or 10)) as chancy:
            await self._declare(chancy, concurrency)
            worker = Worker(chancy, register_signal_handlers=False)

            async def start() -> None:
                await worker.start()
                await worker.wait_for_shutdown()

            async def stop() -> None:
                await worker.stop()

            result = await d.run_worker(start, stop, command)
        return {**result, "config": {"concurrency": concurrency, "executor": "async", "eager_polling": True}}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        async with self._chancy() as chancy:

            async def one(args: dict[str, Any]) -> None:
                await chancy.push(self._job(args))

            async def many(items: list[dict[str, Any]]) -> None:
                async for _refs in chancy.push_many([self._job(a) for a in items]):
                    pass

            return await d.run_producer(one, many, command)

    async def app(self, command: dict[str, Any]) -> dict[str, Any]:
        notify = bool(command.get("notify", True))
        async with self._chancy(notifications=notify) as chancy:

            async def enqueue(c: psycopg.AsyncConnection[Any]) -> None:
                async with c.cursor(row_factory=dict_row) as cur:
                    await chancy.push_ex(cur, self._job({"t": time.time()}))

            return await d.run_psycopg_app(self.dsn, command, enqueue)

    async def count(self, command: dict[str, Any]) -> dict[str, Any]:
        return await d.psycopg_count(
            self.dsn,
            "SELECT count(*) FILTER (WHERE state IN ('pending', 'running', 'retrying')),"
            " count(*) FILTER (WHERE state = 'succeeded') FROM chancy_jobs",
        )


if __name__ == "__main__":
    d.main(ChancySystem)
