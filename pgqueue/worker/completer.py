"""The completer: writes outcomes and starts in batches (group commit), one statement each.

Outcomes pile up while one flush is in flight, then go in one statement: under load each flush
carries hundreds, when idle a single outcome goes out at once, so there is no timer to tune and
no per-job round trip.

The same statement charges the attempts of prefetched jobs that left the buffer: a job starts
at once (the buffer exists so a freed slot need not wait for the database) and its start is
written once it has run as long as the last flush took; if it finishes first, its outcome's own
row update charges it. Under load a short job thus costs no write of its own for its start (in
a drain one job in five had one, a quarter of the ack's time), and the time a start goes
unrecorded stays about one flush, as when every start went with the next flush: a crash in that
window loses an attempt that was never recorded, which ``jobs.unrecorded_losses`` bounds.

A flush that fails on the connection is retried whole after a backoff (nothing is dropped). A
flush that the server refuses for one of its rows (a value it cannot store) is split in halves
until the bad outcome stands alone; that one is replaced by a failure that records why, and the
others are written: one bad outcome never blocks the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from uuid import UUID

import psycopg

from pgqueue._connections import is_transient
from pgqueue._enqueue import wake_params
from pgqueue._sql import Queries
from pgqueue.errors import UnstorableResult
from pgqueue.worker.db import ServiceConnection, reconnect_delay
from pgqueue.worker.execution import ClaimedJob, Outcome
from pgqueue.worker.outcomes import error_entry

log = logging.getLogger("pgqueue.worker")

# Bounded statements: a backlog (after an outage) drains as many short flushes rather than one
# that holds thousands of row locks for seconds.
MAX_BATCH = 2000
# The longest a prefetched job's start waits for its outcome before it is written by itself
# (the wait is the last flush's duration, so a slow server cannot stretch it further).
START_GRACE_MAX = 0.05


def ack_params(outcomes: list[Outcome], starts: list[ClaimedJob]) -> dict[str, Any]:
    """The ack's parameters: one array per column, those of numbers, tokens and kinds as array
    literals (see :func:`_literal`), the values that need quoting (JSON, times) as lists."""
    tokens: dict[UUID, str] = {}  # a claim's jobs share its token: each is written out once
    return {
        "id": _literal(str(o.job.id) for o in outcomes),
        "token": _literal(_token_text(tokens, o.job.token) for o in outcomes),
        "kind": _literal(o.kind for o in outcomes),
        "result": [o.result_json for o in outcomes],
        "error": [o.error_json for o in outcomes],
        "delay": _literal(repr(o.delay) for o in outcomes),
        "charge": _literal(str(o.charge) for o in outcomes),
        "started_at": [o.job.began_at if o.charge else None for o in outcomes],
        "start_id": _literal(str(j.id) for j in starts),
        "start_token": _literal(_token_text(tokens, j.token) for j in starts),
        "start_at": [j.began_at for j in starts],
    }


def _literal(items: Iterable[str]) -> str:
    """A PostgreSQL array literal of items that need no quoting (integers, ``repr`` of floats,
    which the server reads, ``inf`` included; UUIDs; the outcome kinds), cast by the statement.

    The driver dumps a list element by element in Python: 1.5 ms of an ack of 275 outcomes
    (5.7 µs a job, the worker's largest cost in a drain, the tokens 1.5 µs each); joining text
    costs a tenth of that.
    """
    return "{" + ",".join(items) + "}"


def _token_text(seen: dict[UUID, str], token: UUID) -> str:
    text = seen.get(token)
    if text is None:
        text = seen[token] = str(token)
    return text


def retry_later(conn: psycopg.AsyncConnection[Any], exc: Exception) -> bool:
    """Whether a refused write failed for the connection or the server's state (the same rows
    will go through later) rather than for one of its values."""
    return conn.closed or conn.broken or isinstance(exc, psycopg.InterfaceError) or is_transient(exc)


def fallback(outcome: Outcome, reason: str) -> Outcome:
    """What to write when the server refused an outcome: a failure saying why, and no value."""
    job = outcome.job
    entry = error_entry(
        job.attempt, UnstorableResult.__name__, f"the outcome could not be stored: {reason}", None
    )
    if outcome.kind in ("completed", "retry"):  # the attempt failed after all: the retry policy decides
        if job.attempt < job.max_attempts:
            return Outcome(job, "retry", error_json=entry, delay=max(1.0, outcome.delay))
        return Outcome(job, "dead", error_json=entry)
    return replace(outcome, result_json=None, error_json=entry)


class Completer:
    """Collects outcomes and starts; :meth:`run` writes them until cancelled."""

    def __init__(
        self,
        conn: ServiceConnection,
        queries: Queries,
        *,
        on_written: Callable[[list[Outcome]], None],
        wake_after: Callable[[list[Outcome]], list[str]],
    ) -> None:
        self._conn = conn
        self._prepare = conn.prepare or None
        self._queries = queries
        self._on_written = on_written
        self._wake_after = wake_after
        self._outcomes: list[Outcome] = []
        # Prefetched jobs that started and whose start is not written yet, by id, each with the
        # monotonic time its start falls due for a write (in start order).
        self._starts: dict[int, tuple[ClaimedJob, float]] = {}
        self._start_grace = 0.0  # the last flush's duration, at most START_GRACE_MAX
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._idle.clear()
        self._wake.set()

    def record_start(self, job: ClaimedJob) -> None:
        """``job`` left the prefetch buffer and runs: charge its attempt with its outcome, or
        with the first write after it has run as long as a flush takes."""
        if not self._starts:
            self._wake.set()  # the run loop learns when the first one falls due
        self._starts[job.id] = (job, time.monotonic() + self._start_grace)
        self._idle.clear()

    def __len__(self) -> int:
        return len(self._outcomes)

    async def drained(self) -> None:
        """Wait until everything added so far has been written."""
        await self._idle.wait()

    def _next_start_due(self) -> float | None:
        """Seconds until the oldest unwritten start falls due (0: now); None without one."""
        for _, due in self._starts.values():
            return max(0.0, due - time.monotonic())
        return None

    async def _wait_for_work(self) -> None:
        """Until an outcome arrives or an unwritten start falls due."""
        due = self._next_start_due()
        if due is None:
            await self._wake.wait()
        elif due > 0:
            with contextlib.suppress(TimeoutError):  # the start fell due
                await asyncio.wait_for(self._wake.wait(), due)
        self._wake.clear()

    async def run(self) -> None:
        failures = 0
        while True:
            await self._wait_for_work()
            while self._outcomes or self._next_start_due() == 0:
                try:
                    await self._flush_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    log.warning("writing %d outcomes failed (%s); retrying", len(self._outcomes), exc)
                    await asyncio.sleep(reconnect_delay(failures))
                    continue
                failures = 0
            if not self._starts:
                self._idle.set()

    async def _flush_once(self) -> None:
        taken, self._outcomes = self._outcomes[:MAX_BATCH], self._outcomes[MAX_BATCH:]
        # A job that started from the buffer and already finished is charged by its outcome's
        # own row update; only the starts of jobs still running need one of their own.
        pending = self._starts
        for o in taken:
            if pending.pop(o.job.id, None) is not None:
                o.charge = 1
        batch = taken
        now = time.monotonic()
        starts: list[ClaimedJob] = []
        for job, due in pending.values():  # in start order: the due ones come first
            if due > now or len(starts) == MAX_BATCH:
                break
            starts.append(job)
        for job in starts:
            del pending[job.id]
        try:
            written = await self._write(batch, starts)
            self._start_grace = min(START_GRACE_MAX, time.monotonic() - now)
        except BaseException:
            self._outcomes[:0] = batch  # keep them: nothing is dropped on a failed flush
            self._starts = {job.id: (job, now) for job in starts + [o.job for o in batch if o.charge]}
            self._starts.update(pending)
            raise
        if not written:
            return
        self._on_written(written)
        queues = self._wake_after(written)
        if queues:  # capacity freed under a global cap, or a job back in line: others look again
            async with self._conn.use() as c:
                await c.execute(self._queries.wake_queues, wake_params(self._queries, queues))

    async def _write(self, batch: list[Outcome], starts: list[ClaimedJob]) -> list[Outcome]:
        """One statement for outcomes and starts; if the server refuses a row, split the outcomes.

        Planned at each run, as the claim is (see :class:`ServiceConnection`): a plan made while
        the table was nearly empty deletes finished rows by reading the whole table.
        """
        async with self._conn.use() as c:
            try:
                await c.execute(self._queries.ack, ack_params(batch, starts), prepare=self._prepare)
                return batch
            except psycopg.Error as exc:
                if retry_later(c, exc) or not batch:
                    raise
        if starts:  # they carry only ids, tokens and times: the refused value is an outcome's
            await self._write([], starts)
        return await self._write_outcomes(batch)

    async def _write_outcomes(self, batch: list[Outcome], *, last_resort: bool = False) -> list[Outcome]:
        """Write ``batch``, halving it around refused rows (replaced by fallbacks)."""
        async with self._conn.use() as c:
            try:
                await c.execute(self._queries.ack, ack_params(batch, []), prepare=self._prepare)
                return batch
            except psycopg.Error as exc:
                if retry_later(c, exc):
                    raise
                if len(batch) == 1:
                    if last_resort:  # even the bare failure was refused: let go, the lease expires
                        log.error(
                            "job %d: no outcome could be stored (%s); left to lease rescue",
                            batch[0].job.id,
                            exc,
                        )
                        return batch
                    log.error(
                        "job %d: outcome refused by the server (%s); recorded as failed", batch[0].job.id, exc
                    )
                    return await self._write_outcomes(
                        [fallback(batch[0], f"{type(exc).__name__}: {exc}")], last_resort=True
                    )
        half = len(batch) // 2
        return await self._write_outcomes(batch[:half]) + await self._write_outcomes(batch[half:])
