"""pgqueue's driver: the same protocol as the peers' drivers (see _driver.py), run with pgqueue's venv.

Configuration (the fastest documented mode, and what a user gets by default otherwise):
- AsyncQueue for enqueueing: ``enqueue`` (one INSERT, autocommit) and ``enqueue_many`` (COPY).
- AsyncWorker with coroutine handlers; the claim is sized to the free slots, so ``concurrency``
  is also the claim batch size. The driver's worker is a process of its own, as ``pgqueue
  worker``'s is, and freezes its start-up heap at the same point (``freeze_startup_heap``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as d
import psycopg
import psycopg.types.json

from pgqueue import AsyncQueue, JobSpec
from pgqueue.worker import AsyncWorker, freeze_startup_heap

DRAIN_CONCURRENCY = 200

# The "bare-sql" reference (``"bare": true``): the same work on pgqueue's own table with no
# framework at all, as /work/shared/ceiling.py does it. What the round trips and the database
# cost; what a framework can at best approach.
BARE_INSERT = "INSERT INTO pgqueue.jobs (queue, task, args) VALUES (%s, %s, %s)"
BARE_COPY = "COPY pgqueue.jobs (queue, task, args) FROM STDIN"
BARE_CLAIM = """UPDATE pgqueue.jobs SET state = 'running', attempts = attempts + 1, started_at = now()
 WHERE id IN (SELECT id FROM pgqueue.jobs WHERE state = 'queued' AND queue = %s AND run_at <= now()
              ORDER BY priority, run_at, id LIMIT %s FOR UPDATE SKIP LOCKED)
 RETURNING id, task, args"""
# A finished job leaves the live table for finished_jobs (as pgqueue's own ack moves it).
BARE_ACK = """WITH done AS (DELETE FROM pgqueue.jobs WHERE id = ANY(%s) RETURNING *)
 INSERT INTO pgqueue.finished_jobs (id, queue, task, args, priority, state, run_at, attempts,
   max_attempts, errors, created_at, started_at, finished_at)
 SELECT id, queue, task, args, priority, 'completed', run_at, attempts, max_attempts, errors,
   created_at, started_at, now() FROM done"""
BARE_BATCH = 500


def make_queue(dsn: str, notify: bool = True) -> AsyncQueue:
    queue = AsyncQueue(dsn, notify=notify)

    @queue.task(name="noop", queue=d.QUEUE)
    async def noop(**args: Any) -> None:
        d.noop_handler_body(args)

    @queue.task(name="sleep", queue=d.QUEUE)
    async def sleep(**args: Any) -> None:
        await d.sleep_handler_body(args)

    return queue


def job_options(command: dict[str, Any]) -> dict[str, Any]:
    """The protocol's queue, delay and priority as pgqueue job options (priority 1 runs first;
    the default is 5)."""
    options: dict[str, Any] = {}
    if command.get("queue"):
        options["queue"] = command["queue"]
    if command.get("delay"):
        options["delay"] = float(command["delay"])
    if command.get("priority") == "high":
        options["priority"] = 1
    return options


class PgQueue:
    def __init__(self, command: dict[str, Any]) -> None:
        self.dsn = command["dsn"]
        self.task = command.get("task", "noop")

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        from pgqueue.migrate import upgrade  # Alembic: only this op pays for importing it

        upgrade(self.dsn)
        return {}

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        if command.get("bare"):
            return await self._bare_enqueue(command, n, batch)
        options = job_options(command)
        async with make_queue(self.dsn, notify=bool(command.get("notify", True))) as q:
            await q.enqueue(self.task, {"w": 1}, **options)  # open the pool outside the timing
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    await q.enqueue(self.task, d.job_args(command), **options)
            else:
                for start in range(0, n, batch):
                    args = d.job_args(command)
                    await q.enqueue_many(
                        [JobSpec(self.task, args, **options) for _ in range(min(batch, n - start))]
                    )
            seconds = time.perf_counter() - begin
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def _bare_enqueue(self, command: dict[str, Any], n: int, batch: int) -> dict[str, Any]:
        dumps = psycopg.types.json.Jsonb
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
            await c.execute(BARE_INSERT, (d.QUEUE, self.task, dumps({"w": 1})), prepare=True)
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    await c.execute(
                        BARE_INSERT, (d.QUEUE, self.task, dumps(d.job_args(command))), prepare=True
                    )
            else:
                for start in range(0, n, batch):
                    args = json.dumps({"t": time.time()})
                    async with c.transaction(), c.cursor().copy(BARE_COPY) as copy:
                        for _ in range(min(batch, n - start)):
                            await copy.write_row((d.QUEUE, self.task, args))
            seconds = time.perf_counter() - begin
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def _bare_worker(self, command: dict[str, Any]) -> dict[str, Any]:
        stopping = asyncio.Event()

        async def loop() -> None:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
                while not stopping.is_set():
                    cur = await c.execute(BARE_CLAIM, (d.QUEUE, BARE_BATCH), prepare=True)
                    rows = await cur.fetchall()
                    if not rows:
                        await asyncio.sleep(0.01)
                        continue
                    for _id, _task, args in rows:
                        d.noop_handler_body(args)
                    await c.execute(BARE_ACK, ([r[0] for r in rows],), prepare=True)

        async def stop() -> None:
            stopping.set()

        result = await d.run_worker(loop, stop, command)
        return {**result, "config": {"claim_batch": BARE_BATCH}}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        if command.get("bare"):
            return await self._bare_worker(command)
        queue = make_queue(self.dsn)
        concurrency = int(command.get("concurrency") or DRAIN_CONCURRENCY)
        poll = {"poll_interval": float(command["poll"])} if command.get("poll") else {}
        worker = AsyncWorker(
            queue,
            queues=tuple(d.queues_of(command)),
            concurrency=concurrency,
            install_signal_handlers=False,
            **poll,
        )
        if command.get("freeze", True):  # off only to measure what the freeze saves
            freeze_startup_heap()

        async def stop() -> None:
            worker.stop()

        result = await d.run_worker(worker.run, stop, command)
        await queue.close()
        return {**result, "config": {"concurrency": concurrency}}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        options = job_options(command)
        async with make_queue(self.dsn) as q:

            async def one(args: dict[str, Any]) -> None:
                await q.enqueue(self.task, args, **options)

            async def many(items: list[dict[str, Any]]) -> None:
                await q.enqueue_many([JobSpec(self.task, a, **options) for a in items])

            return await d.run_producer(one, many, command)

    async def app(self, command: dict[str, Any]) -> dict[str, Any]:
        notify = bool(command.get("notify", True))
        async with make_queue(self.dsn, notify=notify) as q:

            async def enqueue(c: psycopg.AsyncConnection[Any]) -> None:
                await q.enqueue(self.task, {"t": time.time()}, conn=c)

            # no_job: the baseline, the same app with no queue at all
            return await d.run_psycopg_app(self.dsn, command, None if command.get("no_job") else enqueue)

    async def count(self, command: dict[str, Any]) -> dict[str, Any]:
        return await d.psycopg_count(
            self.dsn,
            "SELECT (SELECT count(*) FROM pgqueue.jobs),"
            " (SELECT count(*) FROM pgqueue.finished_jobs WHERE state = 'completed')",
        )


if __name__ == "__main__":
    d.main(PgQueue)
