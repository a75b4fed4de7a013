"""awa's driver (run with bench/.venvs/awa's Python; see _driver.py for the protocol).

awa 0.6 (``awa-pg``): a Rust runtime (claiming, heartbeats, completion batching) with Python
handlers dispatched through PyO3. Setup: ``AsyncClient.migrate()``, then the fresh-install path
into the queue-storage engine, the 0.6 default (``prepare_queue_storage_schema()`` and
``awa.storage_auto_finalize_if_fresh``, which the first ``start()`` would otherwise run), so
producers can use the direct COPY path before any worker has started.

Worker: one ``AsyncClient.start()`` runtime with async handlers on the bench queue, in the dict
queue form. Throughput levers the configuration guide and the benchmarking notes name for a hot
single queue: ``max_workers`` well above the handlers' own needs (no-op handlers keep their permit
until the completion is durably acknowledged, and 1024 permits select four completion shards),
``claim_batch_size`` at its default of 512 (one claimer: extra ``claimers`` are advised only when
one leaves permits idle), LISTEN/NOTIFY wake-ups with the default 200 ms ``poll_interval_ms``
fallback, and ``priority_aging_interval_ms=0`` (claim-time priority aging off: strict
priority order). The client pool (``max_connections``) is raised above the default 10 for the
runtime's claim, completion and maintenance loops. ``enqueue_shards``/``PartitionedQueue`` stay
off: they weaken FIFO and every other system runs one strict queue. The I/O scenario's
``concurrency`` becomes ``max_workers``.

Several queues (``queues``): one runtime, one queue dict per queue in ``start()`` (the
configuration guide's hard-reserved mode: each queue has its own claimer and its own
``max_workers`` permits). A given ``concurrency`` is the process's total, split evenly across the
queues (at least 1 each; 10 over two queues = 5 + 5), so a backlog in one queue cannot take the
other's permits; without it every queue gets the drain's ``MAX_WORKERS``. (awa's weighted mode,
``global_max_workers`` with per-queue ``min_workers``, would share overflow instead; not used.)
The handlers are registered once, by kind: awa dispatches Python handlers by kind on every queue
the runtime serves, the decorator's queue being the declared one ``start()`` validates.

Queue, delay, priority on enqueue: ``queue=``; ``delay`` becomes ``run_at`` (now + delay, taken
per batch), which awa keeps in its ``deferred_jobs`` table, apart from the ready lanes, until the
maintenance leader promotes it; priority "high" = 1: awa has levels 1 (runs first) to 4, claims
``priority ASC`` and inserts at 2 by default (absent = 2, as before).

Enqueue: ``AsyncClient.insert`` one by one and, in bulk, ``enqueue_many_copy`` (the direct
queue-storage COPY the README recommends for high-volume producers), one call per batch, the
batch's args from ``job_args`` (so ``warm`` and ``sleep`` apply to bulk jobs). The pool is opened
outside the timing with a ``SELECT 1`` (it used to be a warm-up job, which left one job more than
``n`` in the queue: a delayed enqueue must leave exactly ``n`` jobs).
App: the job is inserted on the app's own psycopg connection, inside its transaction, with
``awa.bridge.insert_job`` (the bridge the README points to for application tables). awa always
notifies on enqueue (``pg_notify`` in its insert paths), so the app scenario runs with NOTIFY on
only. Count: awa's own compatibility view ``awa.jobs`` took minutes to scan here, so ``count``
reads the queue-storage tables directly (see ``REMAINING``); ``finished`` adds the completions the
queue ring has already pruned. awa's Rust client rejects a URL with an empty host, so a unix-socket
URL gets ``localhost`` as its (ignored) host.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as d
import awa
import psycopg
from awa.bridge import insert_job

# 1024 per the benchmarking notes; 256, 512 and 2048 were no faster on this machine.
MAX_WORKERS = 1024
CLAIM_BATCH_SIZE = 512
MAX_CONNECTIONS = 20
HIGH_PRIORITY = 1  # awa's levels run 1 (first) to 4 (last); inserts default to 2


# Jobs not finished, from awa's queue-storage tables, one short statement each (the ``awa.jobs``
# view, and joins through its ``terminal_jobs`` view, took minutes on 20,000 jobs on unanalysed
# partitions): ready rows past their lane's claim cursor, deferred (scheduled/retryable) rows,
# materialised leases, and receipt claims neither closed (a closure row or batch) nor with an
# outcome yet (a done, compact-completed, deferred, dead-lettered or leased row for the attempt).
REMAINING = (
    """SELECT count(*) FROM awa.ready_entries AS r
    JOIN awa.queue_claim_heads AS h USING (queue, priority, enqueue_shard)
    WHERE r.lane_seq >= awa.sequence_next_value(h.seq_name)
      AND NOT EXISTS (SELECT 1 FROM awa.ready_tombstones AS t
        WHERE (t.ready_slot, t.ready_generation, t.queue, t.priority, t.enqueue_shard, t.lane_seq)
            = (r.ready_slot, r.ready_generation, r.queue, r.priority, r.enqueue_shard, r.lane_seq))""",
    "SELECT count(*) FROM awa.deferred_jobs",
    "SELECT count(*) FROM awa.leases",
    """WITH claims AS (
        SELECT claim_slot, receipt_id, job_id, run_lease FROM awa.lease_claims
        UNION ALL SELECT b.claim_slot, i.receipt_id, i.job_id, i.run_lease
        FROM awa.lease_claim_batches AS b,
            unnest(b.receipt_ids, b.job_ids, b.run_leases) AS i(receipt_id, job_id, run_lease))
    SELECT count(DISTINCT (job_id, run_lease)) FROM claims
    WHERE (claim_slot, receipt_id) NOT IN (
            SELECT claim_slot, unnest(receipt_ids) FROM awa.lease_claim_closure_batches)
      AND (claim_slot, job_id, run_lease) NOT IN (
            SELECT claim_slot, job_id, run_lease FROM awa.lease_claim_closures)
      AND (job_id, run_lease) NOT IN (
            SELECT job_id, run_lease FROM awa.done_entries
            UNION ALL SELECT unnest(job_ids), unnest(run_leases) FROM awa.receipt_completion_batches
            UNION ALL SELECT job_id, run_lease FROM awa.deferred_jobs
            UNION ALL SELECT job_id, run_lease FROM awa.dlq_entries
            UNION ALL SELECT job_id, run_lease FROM awa.leases)""",
)
# Completed jobs: retained compact and wide completions, plus those the queue ring pruned so far.
FINISHED = """SELECT (SELECT COALESCE(sum(completed_count), 0) FROM awa.receipt_completion_batches)
    + (SELECT count(*) FROM awa.done_entries WHERE state = 'completed')
    + (SELECT COALESCE(sum(pruned_completed_count), 0) FROM awa.queue_terminal_rollups)"""


@dataclass
class BenchArgs:
    """A job's arguments: ``t`` (enqueue time) or ``w`` (a warm-up or backlog job), and ``s``
    (a sleep job's length, when not the default)."""

    t: float | None = None
    w: int | None = None
    s: float | None = None


def _args(job: awa.Job[BenchArgs]) -> dict[str, Any]:
    a = job.args
    args: dict[str, Any] = {"t": a.t} if a.t is not None else {"w": a.w}
    if a.s is not None:
        args["s"] = a.s
    return args


def job_options(command: dict[str, Any]) -> dict[str, Any]:
    """The protocol's queue, delay and priority as awa insert options, taken now (``run_at`` is
    the delay from this moment): ``queue``; ``run_at`` (a timezone-aware datetime); priority
    ``HIGH_PRIORITY`` for "high", else awa's default (2) by leaving it out."""
    options: dict[str, Any] = {"queue": command.get("queue") or d.QUEUE}
    if command.get("delay"):
        options["run_at"] = datetime.now(UTC) + timedelta(seconds=float(command["delay"]))
    if command.get("priority") == "high":
        options["priority"] = HIGH_PRIORITY
    return options


def split_workers(total: int, queues: list[str]) -> list[int]:
    """``total`` permits split evenly over the queues (the first ones take the remainder), at
    least 1 each."""
    base, extra = divmod(total, len(queues))
    return [max(1, base + (1 if i < extra else 0)) for i in range(len(queues))]


def sqlx_url(url: str) -> str:
    """awa's Rust client rejects an empty URL host (a unix socket given as ``?host=/dir``)."""
    parts = urlsplit(url)
    if parts.hostname:
        return url
    netloc = parts.netloc + "localhost"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _connect(client: awa.AsyncClient) -> None:
    """Open the client's pool with a read, so no warm-up job is left behind."""
    tx = await client.transaction()
    async with tx:
        await tx.fetch_one("SELECT 1 AS ok")


class AwaSystem:
    def __init__(self, command: dict[str, Any]) -> None:
        self.dsn = command["dsn"]
        self.url = sqlx_url(command["url"])
        self.kind = "noop" if command.get("task", "noop") == "noop" else "sleep"

    def _client(self, max_connections: int = 10) -> awa.AsyncClient:
        return awa.AsyncClient(self.url, max_connections=max_connections)

    def _job(self, args: dict[str, Any]) -> BenchArgs:
        return BenchArgs(**args)

    async def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        async with self._client() as client:
            await client.migrate()
            await client.prepare_queue_storage_schema()
            tx = await client.transaction()
            async with tx:
                row = await tx.fetch_one("SELECT awa.storage_auto_finalize_if_fresh('awa') AS ok")
            if not row["ok"]:
                raise RuntimeError(f"awa did not switch to queue storage: {await client.storage_status()}")
        return {}

    async def enqueue(self, command: dict[str, Any]) -> dict[str, Any]:
        n, batch = int(command["n"]), int(command.get("batch", 1000))
        async with self._client() as client:
            await _connect(client)  # outside the timing
            begin = time.perf_counter()
            if command["mode"] == "single":
                for _ in range(n):
                    job = self._job(d.job_args(command))
                    await client.insert(job, kind=self.kind, **job_options(command))
            else:
                for start in range(0, n, batch):
                    args = d.job_args(command)
                    jobs = [self._job(args) for _ in range(min(batch, n - start))]
                    await client.enqueue_many_copy(jobs, kind=self.kind, **job_options(command))
            seconds = time.perf_counter() - begin
        return {"jobs": n, "seconds": seconds, "rate": n / seconds}

    async def worker(self, command: dict[str, Any]) -> dict[str, Any]:
        queues = d.queues_of(command)
        if command.get("concurrency"):
            per_queue = split_workers(int(command["concurrency"]), queues)
        else:
            per_queue = [MAX_WORKERS] * len(queues)
        claim_batch = int(command.get("batch_size") or CLAIM_BATCH_SIZE)
        pool = int(command.get("pool_size") or MAX_CONNECTIONS)
        client = self._client(pool)

        # Handlers are dispatched by kind on every queue start() runs; the decorator's queue is the
        # declared one start() validates (the README's partitioned-queue pattern).
        @client.task(BenchArgs, kind="noop", queue=queues[0])
        async def noop(job: awa.Job[BenchArgs]) -> None:
            d.noop_handler_body(_args(job))

        @client.task(BenchArgs, kind="sleep", queue=queues[0])
        async def sleep(job: awa.Job[BenchArgs]) -> None:
            await d.sleep_handler_body(_args(job))

        stopped = asyncio.Event()
        configs = [
            {
                "name": queue,
                "max_workers": workers,
                "claim_batch_size": claim_batch,
                "priority_aging_interval_ms": 0,
            }
            for queue, workers in zip(queues, per_queue, strict=True)
        ]

        async def start() -> None:
            await client.start(configs)
            await stopped.wait()

        async def stop() -> None:
            await client.shutdown(timeout_ms=30_000)
            stopped.set()

        try:
            result = await d.run_worker(start, stop, command)
        finally:
            await client.close()
        config = configs[0] if len(configs) == 1 else {"queues": configs}
        return {**result, "config": {**config, "max_connections": pool}}

    async def produce(self, command: dict[str, Any]) -> dict[str, Any]:
        queue = command.get("queue") or d.QUEUE
        async with self._client() as client:

            async def one(args: dict[str, Any]) -> None:
                await client.insert(self._job(args), kind=self.kind, queue=queue)

            async def many(items: list[dict[str, Any]]) -> None:
                await client.enqueue_many_copy([self._job(a) for a in items], kind=self.kind, queue=queue)

            return await d.run_producer(one, many, command)

    async def app(self, command: dict[str, Any]) -> dict[str, Any]:
        if not command.get("notify", True):
            raise NotImplementedError("awa always notifies on enqueue (pg_notify in its insert paths)")

        async def enqueue(c: psycopg.AsyncConnection[Any]) -> None:
            await insert_job(c, BenchArgs(t=time.time()), kind=self.kind, queue=d.QUEUE)

        return await d.run_psycopg_app(self.dsn, command, enqueue)

    async def count(self, command: dict[str, Any]) -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
            remaining = 0
            for query in REMAINING:
                cur = await c.execute(query)
                row = await cur.fetchone()
                remaining += int(row[0]) if row else 0
            cur = await c.execute(FINISHED)
            row = await cur.fetchone()
        return {"remaining": remaining, "finished": int(row[0]) if row else 0}


if __name__ == "__main__":
    d.main(AwaSystem)
