"""The progress writer: the latest progress of each running job, written in batches.

Handlers report progress from any thread; ``ctx.set_progress`` has already refused what cannot
be stored, so a write here fails only on the connection, and then the values wait for the next
round. Progress of a job that is finishing is written before its outcome (``pending_for``, then
``write``), so a job that ends within a round still shows its last progress.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from uuid import UUID

from pgqueue._sql import Queries
from pgqueue.worker.db import ServiceConnection

log = logging.getLogger("pgqueue.worker")
INTERVAL = 0.5


class ProgressWriter:
    def __init__(self, conn: ServiceConnection, queries: Queries) -> None:
        self._conn = conn
        self._queries = queries
        self._pending: dict[int, tuple[UUID, str]] = {}
        self._lock = threading.Lock()

    def report(self, job_id: int, token: UUID, text: str) -> None:
        """Remember ``text`` (checked JSON) as the job's latest progress; any thread may call."""
        with self._lock:
            self._pending[job_id] = (token, text)

    def report_from_any_thread(self, token: UUID) -> Callable[[int, int, str], None]:
        """The callback a :class:`JobContext` reports through."""

        def report(job_id: int, _attempt: int, text: str) -> None:
            self.report(job_id, token, text)

        return report

    def pending_for(self, job_id: int) -> bool:
        """Whether progress of the job waits to be written. No lock, asked at every job's end:
        the writer swaps the dict whole and a lookup in it is atomic, and a handler's report
        comes before its return, so the progress of the job that just ended is never missed."""
        return job_id in self._pending

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            await self.write()

    async def write(self) -> None:
        with self._lock:
            items, self._pending = self._pending, {}
        if not items:
            return
        params = {
            "id": list(items),
            "token": [token for token, _ in items.values()],
            "progress": [text for _, text in items.values()],
        }
        try:
            async with self._conn.use() as c:
                await c.execute(self._queries.save_progress, params)
        except Exception as exc:
            log.warning("saving progress of %d jobs failed (%s); retrying", len(items), exc)
            with self._lock:
                for job_id, value in items.items():
                    self._pending.setdefault(job_id, value)
