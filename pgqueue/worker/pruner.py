"""The pruner: deletes finished jobs past their retention, one small batch per transaction.

Only one worker prunes at a time (an advisory lock tried, never waited for), and each batch is
small so it never holds locks that would stall claims.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pgqueue._sql import Queries
from pgqueue.worker.db import ServiceConnection

log = logging.getLogger("pgqueue.maintenance")
LOCK_KEY = "pgqueue.prune"
FINISHED_STATES = ["completed", "cancelled"]


class Pruner:
    def __init__(
        self, conn: ServiceConnection, queries: Queries, *, keep_seconds: float, batch: int, interval: float
    ) -> None:
        self._conn = conn
        self._queries = queries
        self._keep = keep_seconds
        self._batch = batch
        self._interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("pruning failed: %s", exc)

    async def run_once(self) -> int:
        """Delete what retention allows; returns how many rows went."""
        q = self._queries
        removed = 0
        # Each queue's own retention where it set one; finished jobs of the others after
        # keep_seconds, dead ones never. The admin's clean runs the same deletes with its cut-off.
        everywhere: dict[str, Any] = {"queue": None, "queue_retention": True, "limit": self._batch}
        async with self._conn.use() as conn:
            for query, params in (
                (
                    q.delete_finished_jobs,
                    {**everywhere, "states": FINISHED_STATES, "older_than": self._keep},
                ),
                (q.prune_completed_count, {"limit": self._batch}),
                (q.delete_dead_jobs, {**everywhere, "older_than": None}),
            ):
                while True:
                    async with conn.transaction():
                        got = await (await conn.execute(q.try_maintenance_lock, {"key": LOCK_KEY})).fetchone()
                        if got is None or not got[0]:
                            return removed
                        count = (await conn.execute(query, params)).rowcount
                    removed += count
                    if count < self._batch:
                        break
        if removed:
            log.info("pruned %d finished jobs", removed)
        return removed
