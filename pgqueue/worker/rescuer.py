"""The rescuer: jobs whose worker stopped renewing its lease go back to the queue (or die).

Any live worker rescues, in small batches under SKIP LOCKED, so several rescuers never fight.
A rescue right after the database comes back would race the owners: their leases lapsed while
nobody could renew them, but the owners are alive and about to renew (and to write the outcomes
they hold). So a rescuer waits one heartbeat interval plus a margin after its own connection
recovers (a worker that started during an outage counts as recovering) before it rescues.
A server that stalls without dropping connections (a VM pause, a frozen disk) is the same race
with no reconnect to see: a round whose probe or rescue statement waited in the stall rescues
nothing and settles likewise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from pgqueue._enqueue import wake_params
from pgqueue._rows import dataclass_row
from pgqueue._sql import Queries
from pgqueue.worker.db import ServiceConnection

log = logging.getLogger("pgqueue.maintenance")
BATCH = 500
MARGIN = 1.5  # seconds on top of a heartbeat interval, for owners to reconnect and renew
STALL = 1.0  # seconds a round's statement may start late before the server counts as stalled


@dataclass(frozen=True, slots=True)
class Rescued:
    """One round of ``rescue_expired``: the queues that got jobs back, and how many went where."""

    queues: list[str] | None  # NULL when nothing was requeued
    requeued: int
    buried: int
    stalled: bool  # the statement began late: it rescued nothing
    answered_at: datetime  # the server's clock as it answered


class Rescuer:
    def __init__(
        self, conn: ServiceConnection, queries: Queries, *, lease_seconds: float, interval: float
    ) -> None:
        self._conn = conn
        self._queries = queries
        self._lease = lease_seconds
        self._interval = interval
        # Owners renew every lease/3 and retry within a second after a failure.
        self.settle = lease_seconds / 3 + MARGIN
        self._healthy_since: float | None = float("-inf")

    def recovered(self) -> None:
        """The database just came back for this worker: let the owners renew first."""
        self._healthy_since = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception as exc:
                self._healthy_since = None
                log.warning("lease rescue failed: %s", exc)

    async def run_once(self) -> int:
        """One round; returns how many jobs it rescued (0 while settling after a reconnect)."""
        async with self._conn.use() as c, c.cursor(row_factory=dataclass_row(Rescued)) as cur:
            sent = time.monotonic()
            probe = await (await c.execute("SELECT clock_timestamp()")).fetchone()
            assert probe is not None
            probed_at: datetime = probe[0]
            now = time.monotonic()
            if self._healthy_since is None:
                self._healthy_since = now
            elif now - sent > STALL:
                log.info("lease rescue: the database took %.1f s to answer; owners renew first", now - sent)
                self._healthy_since = now
            if now - self._healthy_since < self.settle:
                return 0
            total = 0
            while True:
                params = {"limit": BATCH, "probed_at": probed_at, "stall": STALL}
                await cur.execute(self._queries.rescue_expired, params)
                row = await cur.fetchone()
                assert row is not None
                if row.stalled:
                    log.info("lease rescue waited in a stalled database: the owners renew first")
                    self._healthy_since = time.monotonic()
                    break
                probed_at = row.answered_at
                moved = row.requeued + row.buried
                total += moved
                if moved:
                    log.warning("rescued %d jobs with expired leases (%d dead-lettered)", moved, row.buried)
                if row.queues:
                    await c.execute(self._queries.wake_queues, wake_params(self._queries, row.queues))
                if moved < BATCH:
                    break
            await c.execute(self._queries.forget_dead_workers, {"after": self._lease * 3})
        return total
