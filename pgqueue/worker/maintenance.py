"""Background upkeep any live worker performs: rescue jobs of dead workers, prune finished jobs.

Each step works in small batches so it never holds locks that would stall claims.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from pgqueue.sql import Queries

log = logging.getLogger("pgqueue.maintenance")
RESCUE_BATCH = 500
MAINTENANCE_LOCK = "pgqueue.prune"


async def rescue(conn: psycopg.AsyncConnection[Any], queries: Queries, lease_seconds: float) -> int:
    """Re-queue (or dead-letter) running jobs whose lease expired; wake workers of their queues."""
    total = 0
    while True:
        cur = await conn.execute(queries.rescue_expired, {"limit": RESCUE_BATCH})
        row = await cur.fetchone()
        assert row is not None
        queues, requeued, buried = row
        total += int(requeued) + int(buried)
        if requeued or buried:
            log.warning("rescued %d jobs with expired leases (%d dead-lettered)", requeued + buried, buried)
        if queues:
            await conn.execute(queries.wake_queues, {"channel": queries.channel, "queues": queues})
        if requeued + buried < RESCUE_BATCH:
            break
    await conn.execute(queries.forget_dead_workers, {"after": lease_seconds * 3})
    return total


async def prune(conn: psycopg.AsyncConnection[Any], queries: Queries, keep_seconds: float, batch: int) -> int:
    """Delete finished jobs past their retention, one small batch per transaction.

    Only one worker prunes at a time (an advisory lock tried, never waited for).
    """
    removed = 0
    for query, params in (
        (queries.prune_completed, {"keep_seconds": keep_seconds, "limit": batch}),
        (queries.prune_completed_count, {"limit": batch}),
        (queries.prune_dead, {"limit": batch}),
    ):
        while True:
            async with conn.transaction():
                got = await (
                    await conn.execute(queries.try_maintenance_lock, {"key": MAINTENANCE_LOCK})
                ).fetchone()
                if got is None or not got[0]:
                    return removed
                count = (await conn.execute(query, params)).rowcount
            removed += count
            if count < batch:
                break
    if removed:
        log.info("pruned %d finished jobs", removed)
    return removed
