"""The rescuer: jobs whose worker stopped renewing its lease go back to the queue (or die).

Any live worker rescues, in small batches under SKIP LOCKED, so several rescuers never fight.
A lease can lapse while its owner is alive: the database was down, stalled (a VM pause, a
frozen disk) or locked, and nobody could renew. When it answers again, the owners' renewals and
a rescue run at the same moment, and a rescue that wins takes jobs that are still running. So a
rescue is two-phase: a round sights the expired leases, and a later one takes only those it has
seen expired and unchanged for :data:`GRACE`: the time a live owner takes to renew once it can,
plus a margin to reconnect. An owner whose lease has lapsed is retrying a failed renewal (every
second at most, whatever its own lease) or waiting for one in flight, so it has renewed by then
and its changed lease keeps the job; a dead owner's lease never changes.
No clock is compared across machines and no outage has to be noticed: the rule holds whatever
kept the owner away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from pgqueue._enqueue import wake_params
from pgqueue._rows import dataclass_row
from pgqueue._sql import Queries
from pgqueue.worker.db import Conn, ServiceConnection
from pgqueue.worker.lease_keeper import RETRY

log = logging.getLogger("pgqueue.maintenance")
BATCH = 500  # jobs rescued per statement
SIGHT = 10_000  # expired leases sighted per round, oldest first
MARGIN = 1.5  # seconds on top of the owners' retry, for them to reconnect and renew
# Seconds a lease must stay expired and unchanged before it is rescued. An owner retries a failed
# renewal every RETRY seconds at most (sooner when its heartbeat interval is shorter), whatever
# its lease; so this holds for a fleet of workers with different leases too.
GRACE = RETRY + MARGIN


@dataclass(frozen=True, slots=True)
class Expired:
    """A running job whose lease had run out when the rescuer looked."""

    id: int
    token: UUID | None  # None, as the lease, only on a row written by hand
    lease: datetime | None


@dataclass(frozen=True, slots=True)
class Rescued:
    """One ``rescue_expired``: the queues that got jobs back, and how many went where."""

    queues: list[str] | None  # NULL when nothing was requeued
    requeued: int
    buried: int
    cancelled: int  # asked to cancel before their worker was lost: they end here


class Rescuer:
    def __init__(
        self, conn: ServiceConnection, queries: Queries, *, lease_seconds: float, interval: float
    ) -> None:
        self._conn = conn
        self._queries = queries
        self._lease = lease_seconds
        self._interval = interval
        self._sighted: dict[int, tuple[Expired, float]] = {}  # id -> (lease seen, first seen at)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("lease rescue failed: %s", exc)

    async def run_once(self) -> int:
        """One round: rescue what has stayed expired for the grace, then look again; returns
        how many jobs it rescued."""
        async with self._conn.use() as c:
            now = time.monotonic()
            due = [seen for seen, at in self._sighted.values() if now - at >= GRACE]
            total = 0
            for start in range(0, len(due), BATCH):
                total += await self._rescue(c, due[start : start + BATCH])
            await self._sight(c)
            await c.execute(self._queries.forget_dead_workers, {"after": self._lease * 3})
        return total

    async def _rescue(self, c: Conn, due: list[Expired]) -> int:
        params = {
            "ids": [e.id for e in due],
            "tokens": [e.token for e in due],
            "leases": [e.lease for e in due],
        }
        async with c.cursor(row_factory=dataclass_row(Rescued)) as cur:
            await cur.execute(self._queries.rescue_expired, params)
            row = await cur.fetchone()
        assert row is not None
        moved = row.requeued + row.buried + row.cancelled
        if moved:
            log.warning(
                "rescued %d jobs with expired leases (%d dead-lettered, %d cancelled as asked)",
                moved,
                row.buried,
                row.cancelled,
            )
        if row.queues:
            await c.execute(self._queries.wake_queues, wake_params(self._queries, row.queues))
        return moved

    async def _sight(self, c: Conn) -> None:
        """Remember the expired leases, each with when it was first seen as it is now: a lease
        that changed (renewed, then lapsed again) starts its grace afresh."""
        async with c.cursor(row_factory=dataclass_row(Expired)) as cur:
            await cur.execute(self._queries.expired_leases, {"limit": SIGHT})
            rows = await cur.fetchall()
        seen_at = time.monotonic()  # after the answer: a statement that waited in a stall counts from its end
        sighted: dict[int, tuple[Expired, float]] = {}
        for row in rows:
            earlier = self._sighted.get(row.id)
            sighted[row.id] = earlier if earlier is not None and earlier[0] == row else (row, seen_at)
        self._sighted = sighted
