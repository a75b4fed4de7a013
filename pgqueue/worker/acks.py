"""Batched acknowledgement: outcomes pile up while one flush is in flight, then go in one statement.

This is group commit: under load each flush carries hundreds of outcomes, when idle a single
outcome goes out at once, so there is no timer to tune and no per-job round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pgqueue.worker.execution import Outcome

log = logging.getLogger("pgqueue.worker")

MAX_BATCH = 2000
Flush = Callable[[list[Outcome]], Awaitable[None]]


def ack_params(outcomes: list[Outcome]) -> dict[str, list[Any]]:
    return {
        "id": [o.job.id for o in outcomes],
        "attempt": [o.job.attempt for o in outcomes],
        "kind": [o.kind for o in outcomes],
        "result": [o.result_json for o in outcomes],
        "error": [o.error_json for o in outcomes],
        "delay": [o.delay for o in outcomes],
    }


class AckBuffer:
    """Collects outcomes; :meth:`run` flushes them until stopped, retrying through disconnects."""

    def __init__(self, flush: Flush, on_flushed: Callable[[list[Outcome]], None]) -> None:
        self._flush = flush
        self._on_flushed = on_flushed
        self._pending: list[Outcome] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle.clear()
        self._wake.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def drained(self) -> None:
        """Wait until everything added so far has been written."""
        await self._idle.wait()

    async def run(self, retry_delay: Callable[[int], float]) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                # Bounded statements: a backlog (after an outage) drains as many short flushes
                # rather than one that holds thousands of row locks for seconds.
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._flush(batch)
                except asyncio.CancelledError:
                    self._pending[:0] = batch
                    raise
                except Exception as exc:
                    self._pending[:0] = batch  # keep them: nothing is dropped on a failed flush
                    failures += 1
                    log.warning("ack flush of %d outcomes failed (%s); retrying", len(batch), exc)
                    await asyncio.sleep(retry_delay(failures))
                    continue
                failures = 0
                self._on_flushed(batch)
            self._idle.set()
