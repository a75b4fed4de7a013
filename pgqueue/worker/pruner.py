"""The pruner: deletes finished jobs past their retention, one small batch per transaction.

Only one worker prunes at a time (an advisory lock tried, never waited for), and each batch is
small so it never holds locks that would stall claims.
"""

from __future__ import annotations

import asyncio
import logging

from pgqueue.sql import Queries
from pgqueue.worker.db import ServiceConnection

log = logging.getLogger("pgqueue.maintenance")
LOCK_KEY = "pgqueue.prune"


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
        async with self._conn.use() as conn:
            for query, params in (
                (q.prune_completed, {"keep_seconds": self._keep, "limit": self._batch}),
                (q.prune_completed_count, {"limit": self._batch}),
                (q.prune_dead, {"limit": self._batch}),
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
