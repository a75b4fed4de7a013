"""BullMQ for Python's driver, on its PostgreSQL backend (run with bench/.venvs/bullmq's Python;
see _driver.py for the protocol).

The backend is picked per instance by the options dict every ``Queue`` and ``Worker`` takes:
``{"backend": "postgres", "connection": <libpq conninfo>, "schema": "bullmq"}`` (the default
schema, as the PostgreSQL guide advises); it needs psycopg 3 (the package's ``postgres`` extra).
``setup`` applies the bundled migrations explicitly (``run_migrations``, the Python counterpart of
the guide's ``runMigrations`` step); the queue itself needs no declaring.

Configured for throughput as the docs recommend:

- Workers: the concurrency guide names two levers, a worker's ``concurrency`` factor and several
  workers (the recommended setup). In the Python port every backend instance owns one psycopg
  connection and runs its statements one at a time behind a lock (there is no pool to size, the
  guide's "size the pool" tip has nothing to act on), so a single Worker's slots queue up on one
  round trip each. A process therefore runs ``WORKERS`` Worker instances (one connection plus one
  LISTEN connection each), each with ``concurrency`` slots; when the harness caps a process's
  concurrency (the I/O scenario) the cap is split between them. Each job costs two statements
  (``move_to_active``, then ``move_to_completed``: the Python worker does not fetch the next job
  on completion). An idle worker blocks on LISTEN ``bullmq_jobs`` (``drainDelay`` left at 5 s).
- ``removeOnComplete`` (worker option): the guide's tuning tips advise retention so finished
  jobs do not pile up; finished jobs are deleted, failed ones kept (``removeOnFail`` unset), so
  ``count`` reports ``finished`` as 0 and ``remaining`` from the waiting/active/delayed counts.
- Enqueue: ``Queue.add`` one by one and, in bulk, ``Queue.addBulk`` (one ``add_jobs_bulk``
  statement per batch of 1,000), which the guide names as the fast path. Its statement has a
  fixed cost of several ms (it creates and drops two temporary tables), so the fixed-rate producer
  sends ticks of fewer than ``SMALL_BATCH`` jobs as that many ``add`` calls (one round trip each,
  still one call per tick to the harness) and larger ticks with ``addBulk``. The job's name is the
  task (``noop``/``sleep``), dispatched by one processor; lock, stalled-check and event settings
  are the defaults (the backend writes its event stream on every transition; no option skips it).
- NOTIFY cannot be turned off: ``add_job`` always notifies ``bullmq_jobs``.

Queues, delay, priority (the protocol's optional parameters):

- ``queue``: the ``Queue`` instance's name (BullMQ has no per-job queue option: one ``Queue``
  object per queue). ``count`` sums ``getJobCounts`` over every queue that has rows in the schema.
- ``delay``: the job option ``delay`` in milliseconds (``opts={"delay": ms}``, on ``add`` and on
  each ``addBulk`` entry); such a job sits in the ``delayed`` state until then.
- ``priority`` "high": no option at all. In BullMQ "jobs without a priority assigned get the
  highest priority, being processed before jobs with priorities assigned to them" (the prioritized
  guide); the PostgreSQL backend claims ``ORDER BY priority, seq`` with 0 = no priority, so every
  documented priority value (1 .. 2^21, lower first) runs AFTER the default. There is no level
  above the default: the first-running level is the default itself, so "high" jobs are added
  exactly like default ones (priority 0, FIFO by ``seq`` with the default jobs).
- ``queues`` (worker): in BullMQ one ``Worker`` object serves one queue, so one process serving
  several queues runs its own Workers for each queue (the same processor, so ``noop`` and
  ``sleep`` run on every queue): ``WORKERS`` Worker instances x ``CONCURRENCY`` slots per queue.
  A ``concurrency`` cap is the process's total: split evenly across the queues (at least 1 each),
  then each queue's share across its Workers as above. The queues' Workers claim independently
  (each on its own connections), so a backlog in one queue does not hold back another's jobs.

Write-heavy app: the Python backend opens its own connections and has no way to enqueue on the
caller's connection or inside the caller's transaction. Each app connection commits its rows,
then adds the job with its own ``Queue`` (its own connection, autocommit): two commits per
transaction, not atomic (a crash between them loses the job), which is what a BullMQ user can do.
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
from bullmq import Queue, Worker
from bullmq.backends.postgres_connection import DEFAULT_SCHEMA, run_migrations
from psycopg import sql

# Tried 1-8 Workers x 1-50 slots each on this (shared, 2-core) machine: 2-4 Workers beat one, more
# slots per Worker barely matter (they share its connection); 4 x 25 = 100 slots per process.
WORKERS = 4  # Worker instances per process (each on its own connection)
CONCURRENCY = 25  # slots per Worker
# addBulk costs ~7 ms per call whatever its size (add_jobs_bulk creates two temporary tables),
# add ~0.4 ms a job: measured here, they break even near 20 jobs.
SMALL_BATCH = 16


def job_options(command: dict[str, Any]) -> dict[str, Any]:
    """The protocol's delay and priority as BullMQ job options (see the module docstring)."""
    opts: dict[str, Any] = {}
    if command.get("delay"):
        opts["delay"] = round(float(command["delay"]) * 1000)  # ms (the SQL casts to bigint)
    priority = command.get("priority")
    if priority not in (None, "high"):
        raise ValueError(f"unknown priority {priority!r}")
    # "high": BullMQ's first-running level is "no priority" (0), the default: nothing to set.
    return opts


class BullMQSystem:
    def __init__(self, command: dict[str, Any]) -> None:
        self.dsn = command["dsn"]
        self.task = command.get("task", "noop")

    def _opts(self, **extra: Any) -> dict[str, Any]:
        return {"backend": "postgres", "connection": self.dsn, "schema": DEFAULT_SCHEMA, **extra}

    def _queue(self, name: str = d.QUEUE) -> Queue:
        return Queue(name, self._opts())

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(self.dsn) as c:
            version = await run_migrations(c, DEFAULT_SCHEMA)
        return {"schema_version": version}

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        if not command.get("notify", True):
            raise NotImplementedError("BullMQ's PostgreSQL backend always notifies (add_job)")
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        queue = self._queue(command.get("queue") or d.QUEUE)
        opts = job_options(command)
        try:
            await queue.backend.waitUntilReady()  # connect (and check the schema) outside the timing
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    await queue.add(self.task, d.job_args(command), opts)
            else:
                for start in range(0, n, batch):
                    args = d.job_args(command)
                    await queue.addBulk(
                        [
                            {"name": self.task, "data": args, "opts": opts}
                            for _ in range(min(batch, n - start))
                        ]
                    )
            seconds = time.perf_counter() - begin
        finally:
            await queue.close()
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        queues = d.queues_of(command)
        workers = int(command.get("workers") or WORKERS)
        total = int(command.get("concurrency") or 0)
        slots: dict[str, list[int]] = {}  # per queue: its Workers' slots
        for i, name in enumerate(queues):
            if total:  # a per-process cap: split evenly across the queues, then their workers
                share = max(1, total // len(queues) + (1 if i < total % len(queues) else 0))
                n = min(workers, share)
                slots[name] = [share // n + (1 if j < share % n else 0) for j in range(n)]
            else:
                slots[name] = [int(command.get("worker_concurrency") or CONCURRENCY)] * workers

        async def process(job: Any, token: str) -> None:
            if job.name == "sleep":
                await d.sleep_handler_body(job.data)
            else:
                d.noop_handler_body(job.data)

        pool = [  # one Worker serves one queue: each queue gets its own
            Worker(
                name,
                process,
                self._opts(concurrency=c, autorun=False, removeOnComplete=True),
            )
            for name in queues
            for c in slots[name]
        ]
        for w in pool:
            await w.backend.waitUntilReady()

        async def start() -> None:
            await asyncio.gather(*(w.run() for w in pool))

        async def stop() -> None:
            await asyncio.gather(*(w.close() for w in pool))

        result = await d.run_worker(start, stop, command)
        config: dict[str, Any]
        if queues == [d.QUEUE]:
            config = {"workers": len(pool), "concurrency": slots[d.QUEUE], "removeOnComplete": True}
        else:
            config = {"queues": slots, "workers": len(pool), "removeOnComplete": True}
        return {**result, "config": config}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        queue = self._queue(command.get("queue") or d.QUEUE)
        opts = job_options(command)
        await queue.backend.waitUntilReady()

        async def one(args: dict[str, Any]) -> None:
            await queue.add(self.task, args, opts)

        async def many(items: list[dict[str, Any]]) -> None:
            if len(items) < SMALL_BATCH:  # addBulk's fixed cost outweighs a few single adds
                for a in items:
                    await queue.add(self.task, a, opts)
            else:
                await queue.addBulk([{"name": self.task, "data": a, "opts": opts} for a in items])

        try:
            return await d.run_producer(one, many, command)
        finally:
            await queue.close()

    async def app(self, command: dict[str, Any]) -> dict[str, Any]:
        if not command.get("notify", True):
            raise NotImplementedError("BullMQ's PostgreSQL backend always notifies (add_job)")
        sync_commit = "on" if command.get("sync_commit", True) else "off"
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
            await c.execute(d.APP_DDL)

        system = self

        class AppConnection:
            """The app's own connection, and the BullMQ queue (its own connection) beside it."""

            def __init__(self, conn: psycopg.AsyncConnection[Any], queue: Queue) -> None:
                self.conn, self.queue = conn, queue

            async def close(self) -> None:
                await self.queue.close()
                await self.conn.close()

        async def connect() -> AppConnection:
            conn = await d.psycopg_app_connection(self.dsn, sync_commit)
            queue = system._queue()
            await queue.backend.waitUntilReady()
            return AppConnection(conn, queue)

        async def transaction(c: AppConnection, rows: int) -> None:
            async with c.conn.transaction(), c.conn.cursor() as cur:
                await cur.executemany(d.APP_INSERT, [(i, 10.5, "payment") for i in range(rows)])
            # Committed: now the job, on the queue's own connection (its own transaction).
            await c.queue.add(self.task, {"t": time.time()})

        return await d.run_app(transaction, connect, command)

    async def count(self, command: dict[str, Any]) -> dict[str, Any]:
        # Every queue with rows in the schema (BullMQ has no "list queues" call), counted through
        # the library's getJobCounts, one Queue each.
        async with await psycopg.AsyncConnection.connect(self.dsn) as c:
            query = sql.SQL("SELECT DISTINCT queue FROM {}.job").format(sql.Identifier(DEFAULT_SCHEMA))
            cur = await c.execute(query)
            names = sorted({d.QUEUE, *(row[0] for row in await cur.fetchall())})
        counts: dict[str, int] = {}
        per_queue: dict[str, int] = {}
        for name in names:
            queue = self._queue(name)
            try:
                q = await queue.getJobCounts(
                    "waiting", "active", "delayed", "prioritized", "waiting-children", "paused", "completed"
                )
            finally:
                await queue.close()
            for k, v in q.items():
                counts[k] = counts.get(k, 0) + int(v)
            per_queue[name] = sum(int(v) for k, v in q.items() if k != "completed")
        finished = int(counts.pop("completed", 0))
        return {
            "remaining": sum(counts.values()),
            "finished": finished,
            "counts": counts,
            "queues": per_queue,
        }


if __name__ == "__main__":
    d.main(BullMQSystem)
