"""Chancy's driver (run with bench/.venvs/chancy's Python; see _driver.py for the protocol).

Fastest documented setup for async work: a queue on the ``AsyncExecutor`` with ``eager_polling``
(poll again as soon as a job finishes) and the shortest polling interval (1 s, an int), LISTEN/NOTIFY
on, default plugins (leadership, pruner, recovery, metrics, workflows) as a user gets them, and
logging at WARNING (Chancy logs every pulled job at INFO). Enqueue: ``push`` and, in bulk,
``push_many`` (batches of 1,000, one transaction each). Chancy can turn NOTIFY off
(``Chancy(notifications=False)``), so the app scenario runs both ways.

Queues, delays and priorities (the protocol's optional parameters): ``queue`` is the job's
``Job.queue``; ``delay`` sets ``Job.scheduled_at`` to now + delay (the fetch skips jobs whose
``scheduled_at`` is in the future); priority "high" = ``Job.priority=10`` (Chancy fetches
``ORDER BY priority DESC``: higher runs first; the default is 0). Chancy queues live in the
database and every worker whose tags match a declared queue (by default, all workers) serves it, so
one worker process serves several queues by declaring each of them (``chancy.declare``); the worker
op declares every queue in ``queues``. Chancy sizes concurrency per queue (``Queue.concurrency``,
per worker), so a given ``concurrency`` is the process's total, split evenly across the served
queues (at least 1 each; a remainder goes to the first queues); with no ``concurrency`` each queue
gets today's drain size (200). The warm-up job an enqueue pushes first (to open the pool outside
the timing) carries the same queue, delay and priority; a delayed one is cancelled at once
(``chancy.cancel_job``: state "failed", not counted) so that a delayed backlog is exactly ``n``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as d
import chancy_tasks
import psycopg
from chancy import Chancy, Job, Queue, Worker
from psycopg.rows import dict_row

CONCURRENCY = 200
HIGH_PRIORITY = 10  # Chancy runs higher priorities first; the default is 0
LOG = logging.getLogger("bench.chancy")
LOG.setLevel(logging.WARNING)
LOG.addHandler(logging.StreamHandler(sys.stderr))


class ChancySystem:
    def __init__(self, command: dict[str, Any]) -> None:
        self.dsn = command["dsn"]
        self.func = chancy_tasks.noop if command.get("task", "noop") == "noop" else chancy_tasks.sleep

    def _chancy(self, notifications: bool = True, pool: int = 10) -> Chancy:
        return Chancy(self.dsn, log=LOG, notifications=notifications, max_connection_pool_size=pool)

    def _job(self, args: dict[str, Any], options: dict[str, Any] | None = None) -> Job:
        return Job.from_func(self.func, kwargs=args, **(options or {"queue": d.QUEUE}))

    @staticmethod
    def _options(command: dict[str, Any]) -> dict[str, Any]:
        """The protocol's queue, delay and priority as ``Job`` fields (delay: taken now)."""
        options: dict[str, Any] = {"queue": command.get("queue") or d.QUEUE}
        if command.get("delay"):
            options["scheduled_at"] = datetime.now(tz=UTC) + timedelta(seconds=float(command["delay"]))
        if command.get("priority") == "high":
            options["priority"] = HIGH_PRIORITY
        return options

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        async with self._chancy() as chancy:
            await chancy.migrate()
        return {}

    async def _declare(self, chancy: Chancy, name: str, concurrency: int) -> None:
        await chancy.declare(
            Queue(
                name,
                concurrency=concurrency,
                executor=Chancy.Executor.Async,
                polling_interval=1,
                eager_polling=True,
            ),
            upsert=True,
        )

    @staticmethod
    def _split(command: dict[str, Any], queues: list[str]) -> dict[str, int]:
        """Each served queue's concurrency: the given total split evenly, else today's drain size."""
        if not command.get("concurrency"):
            return {q: CONCURRENCY for q in queues}
        total = int(command["concurrency"])
        share, extra = divmod(total, len(queues))
        return {q: max(1, share + (1 if i < extra else 0)) for i, q in enumerate(queues)}

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        async with self._chancy(notifications=bool(command.get("notify", True))) as chancy:
            warm = await chancy.push(self._job({"w": 1}, self._options(command)))
            if command.get("delay"):  # a delayed backlog holds exactly n jobs: retire the warm-up
                await chancy.cancel_job(warm)
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    await chancy.push(self._job(d.job_args(command), self._options(command)))
            else:
                for start in range(0, n, batch):
                    args, options = d.job_args(command), self._options(command)
                    jobs = [self._job(args, options) for _ in range(min(batch, n - start))]
                    async for _refs in chancy.push_many(jobs, batch_size=batch):
                        pass
            seconds = time.perf_counter() - begin
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        queues = d.queues_of(command)
        per_queue = self._split(command, queues)
        concurrency = sum(per_queue.values())
        async with self._chancy(pool=int(command.get("pool_size") or 10)) as chancy:
            for name, size in per_queue.items():
                await self._declare(chancy, name, size)
            worker = Worker(chancy, register_signal_handlers=False)

            async def start() -> None:
                await worker.start()
                await worker.wait_for_shutdown()

            async def stop() -> None:
                await worker.stop()

            result = await d.run_worker(start, stop, command)
        config: dict[str, Any] = {"concurrency": concurrency, "executor": "async", "eager_polling": True}
        if command.get("queues"):
            config["queues"] = per_queue
        return {**result, "config": config}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        options = {"queue": command.get("queue") or d.QUEUE}
        async with self._chancy() as chancy:

            async def one(args: dict[str, Any]) -> None:
                await chancy.push(self._job(args, options))

            async def many(items: list[dict[str, Any]]) -> None:
                async for _refs in chancy.push_many([self._job(a, options) for a in items]):
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
