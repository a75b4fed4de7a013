"""PgQueuer's driver (run with bench/.venvs/pgqueuer's Python; see _driver.py for the protocol).

Configured as PgQueuer's own benchmark (tools/benchmark.py in its repository) runs it, which is its
fastest documented setup: the asyncpg driver, uvloop, async entrypoints, several QueueManagers per
process each on its own connection (``consumers``), a dequeue ``batch_size`` per round trip.
Finished jobs are moved to ``pgqueuer_log`` by PgQueuer's buffered status writes.
Enqueue: ``Queries.enqueue(entrypoint, payload)``; in bulk, the list form (one statement).

Queues, delay, priority (the protocol's optional parameters):
- queue: PgQueuer has no queue object; a job's entrypoint name is its routing key. The default
  queue "bench" keeps the plain names ("noop", "sleep"); another queue q uses "q.noop"/"q.sleep".
  A worker serving several queues registers all their entrypoints on each of its QueueManagers
  (one manager serves every entrypoint it registers; that is how one process serves several).
  ``concurrency`` stays the process's total (``max_concurrent_tasks`` of its one manager):
  PgQueuer sizes no pool per entrypoint, so nothing is split. Note its dequeue takes the served
  entrypoints' jobs in one order (priority DESC, id ASC), so an older backlog on one entrypoint
  runs before newer jobs of another: there is no per-queue fairness within a manager.
- delay: ``execute_after=timedelta(seconds=delay)``.
- priority: "high" = priority 10; PgQueuer dequeues ``priority DESC`` (higher first), default 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as d
import asyncpg
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, PgQueuer, Queries
from pgqueuer.models import Job

# Chosen by trying the combinations on this machine (see docs/benchmarks.md).
CONSUMERS = 5
BATCH_SIZE = 100


def payload(args: dict[str, Any]) -> bytes:
    return json.dumps(args).encode()


HIGH_PRIORITY = 10  # PgQueuer runs higher priorities first; its default is 0


def entrypoint_name(queue: str, task: str) -> str:
    """The entrypoint a queue's task runs as: plain for the default queue, "queue.task" else."""
    return task if queue == d.QUEUE else f"{queue}.{task}"


def job_options(command: dict[str, Any]) -> tuple[int, timedelta | None]:
    """The protocol's priority and delay as PgQueuer's ``priority`` and ``execute_after``."""
    priority = HIGH_PRIORITY if command.get("priority") == "high" else 0
    delay = float(command.get("delay") or 0)
    return priority, (timedelta(seconds=delay) if delay else None)


class PgQueuerSystem:
    def __init__(self, command: dict[str, Any]) -> None:
        self.url = command["url"]
        self.task = command.get("task", "noop")
        self.entrypoint = entrypoint_name(command.get("queue") or d.QUEUE, self.task)

    async def _queries(self) -> tuple[Queries, asyncpg.Connection]:
        conn = await asyncpg.connect(self.url)
        return Queries(AsyncpgDriver(conn)), conn

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        q, conn = await self._queries()
        await q.install()
        await conn.close()
        return {}

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        priority, after = job_options(command)
        q, conn = await self._queries()
        begin = time.perf_counter()
        if command["mode"] == "single":
            for _ in range(n):
                await q.enqueue(self.entrypoint, payload(d.job_args(command)), priority, after)
        else:
            for start in range(0, n, batch):
                k = min(batch, n - start)
                body = payload(d.job_args(command))
                await q.enqueue(
                    [self.entrypoint] * k, [body] * k, [priority] * k, [after] * k if after else None
                )
        seconds = time.perf_counter() - begin
        await conn.close()
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        concurrency = int(command.get("concurrency") or 0)
        consumers = int(command.get("consumers") or CONSUMERS)
        batch_size = int(command.get("batch_size") or BATCH_SIZE)
        if concurrency:  # a per-process cap (the I/O scenario): one manager, batches within it
            consumers = 1
            batch_size = min(batch_size, concurrency // 2)
        pool_driver = bool(command.get("pool"))
        queues = d.queues_of(command)
        managers: list[PgQueuer] = []
        conns: list[Any] = []
        for _ in range(consumers):
            if pool_driver:
                pool = await asyncpg.create_pool(self.url)
                conns.append(pool)
                pgq = PgQueuer(AsyncpgPoolDriver(pool))
            else:
                conn = await asyncpg.connect(self.url)
                conns.append(conn)
                pgq = PgQueuer(AsyncpgDriver(conn))

            for queue in queues:  # every served queue's entrypoints, on every manager

                @pgq.entrypoint(entrypoint_name(queue, "noop"))
                async def noop(job: Job) -> None:
                    d.noop_handler_body(json.loads(job.payload or b"{}"))

                @pgq.entrypoint(entrypoint_name(queue, "sleep"))
                async def sleep(job: Job) -> None:
                    await d.sleep_handler_body(json.loads(job.payload or b"{}"))

            managers.append(pgq)

        async def start() -> None:
            await asyncio.gather(
                *(m.run(batch_size=batch_size, max_concurrent_tasks=concurrency or None) for m in managers)
            )

        async def stop() -> None:
            for m in managers:
                m.shutdown.set()

        result = await d.run_worker(start, stop, command)
        for c in conns:
            await c.close()
        config: dict[str, Any] = {
            "consumers": consumers,
            "batch_size": batch_size,
            "max_concurrent_tasks": concurrency or None,
            "pool": pool_driver,
        }
        if queues != [d.QUEUE]:
            config["entrypoints"] = [entrypoint_name(q, t) for q in queues for t in ("noop", "sleep")]
        return {**result, "config": config}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        q, conn = await self._queries()
        ep = self.entrypoint

        async def one(args: dict[str, Any]) -> None:
            await q.enqueue(ep, payload(args), 0)

        async def many(items: list[dict[str, Any]]) -> None:
            await q.enqueue([ep] * len(items), [payload(a) for a in items], [0] * len(items))

        result = await d.run_producer(one, many, command)
        await conn.close()
        return result

    async def app(self, command: dict[str, Any]) -> dict[str, Any]:
        if not command.get("notify", True):
            raise NotImplementedError("PgQueuer always notifies (a statement trigger on its table)")
        sync_commit = "on" if command.get("sync_commit", True) else "off"
        setup = await asyncpg.connect(self.url)
        await setup.execute(d.APP_DDL)
        await setup.close()

        queries: dict[int, Queries] = {}

        async def connect() -> Any:
            c = await asyncpg.connect(self.url)
            await c.execute(f"SET synchronous_commit = {sync_commit}")
            queries[id(c)] = Queries(AsyncpgDriver(c))
            return c

        async def transaction(c: Any, rows: int) -> None:
            async with c.transaction():
                await c.executemany(d.APP_INSERT_DOLLAR, [(i, 10.5, "payment") for i in range(rows)])
                await queries[id(c)].enqueue(self.task, payload({"t": time.time()}), 0)

        return await d.run_app(transaction, connect, command)

    async def count(self, command: dict[str, Any]) -> dict[str, Any]:
        conn = await asyncpg.connect(self.url)
        remaining = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        finished = await conn.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
        await conn.close()
        return {"remaining": int(remaining), "finished": int(finished)}


if __name__ == "__main__":
    d.main(PgQueuerSystem, default_loop="uvloop")
