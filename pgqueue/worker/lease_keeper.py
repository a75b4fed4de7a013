"""The lease keeper: renews this worker's leases from a thread of its own, and names a blocked loop.

Leases are renewed here, on a dedicated thread with its own connection, because the event loop
runs handlers the worker does not control: an async handler that calls ``time.sleep(60)`` stops
the loop, and with it anything scheduled on it. If renewal lived there, every job of the worker
would look abandoned, be rescued and run a second time elsewhere. The same thread watches the
loop's heartbeat tick and logs the job that blocks it.

What the thread learns (cancel requests, claims lost to a rescue) is handed to the loop with
``call_soon_threadsafe``; when the loop is blocked that waits, which is harmless.

The claimer asks :meth:`LeaseKeeper.renewable` before each claim: a job claimed while the
heartbeat cannot reach the database (a pooler with no server connection to spare, a dropped
connection) keeps its lease only until the lease runs out, then another worker rescues it and
runs it a second time while this one still runs it. So claiming starts with the first renewal,
pauses while renewals are overdue and resumes, woken, with the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from pgqueue._connections import prepared_statements_enabled
from pgqueue._rows import dataclass_row
from pgqueue._sql import Queries
from pgqueue.worker.db import PLAN_AT_EVERY_RUN, SLOW_ANSWER, connect_kwargs

log = logging.getLogger("pgqueue.worker")
TICK = 0.1  # how often the loop proves it is alive
WATCH = 0.25  # how often the thread looks
REPEAT_WARNING = 10.0  # a long block is reported again this often
RETRY = 1.0  # seconds before a failed renewal is tried again (sooner when the interval is shorter)
SLOW_HEARTBEAT = (
    "heartbeat: no answer from the database after %.0f s (a pooler with no free server "
    "connection, or a lock?); still waiting and claiming nothing meanwhile, leases run out "
    "%.0f s after the last renewal"
)


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat sends besides the held claims."""

    worker_id: str
    queues: list[str]
    concurrency: int
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class Renewed:
    """A claim whose lease the heartbeat renewed, and whether someone asked it to stop."""

    id: int
    cancel_requested: bool


class LeaseKeeper:
    def __init__(
        self,
        dsn: str,
        queries: Queries,
        beat: Beat,
        loop: asyncio.AbstractEventLoop,
        *,
        held: Callable[[], list[tuple[int, UUID]]],
        abandoned: Callable[[], int],
        on_renewed: Callable[[dict[int, UUID], set[int], set[int]], None],
        blocker: Callable[[], str | None],
        block_warning: float,
        on_renewable: Callable[[], None],
    ) -> None:
        self._dsn = dsn
        self._queries = queries
        self._beat = beat
        self._loop = loop
        self._held = held
        self._abandoned = abandoned
        self._on_renewed = on_renewed  # (sent, renewed, cancel requested), called on the loop
        self._blocker = blocker
        self._block_warning = block_warning
        self._on_renewable = on_renewable  # renewals are on schedule again; called on the loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pgqueue-lease-keeper", daemon=True)
        self._conn: psycopg.Connection[Any] | None = None
        self.alive_at = time.monotonic()
        self.interval = beat.lease_seconds / 3
        self.renewed_at: float | None = None  # when the last renewal that succeeded was sent
        self._abandoned_sent = 0
        self._blocked_since: float | None = None  # the loop's last tick before it stalled
        self._warned_at = 0.0

    # ------------------------------------------------------------------ the loop's side

    def start(self) -> None:
        self._thread.start()

    async def tick(self) -> None:
        """Runs on the loop: proves it turns."""
        while True:
            self.alive_at = time.monotonic()
            await asyncio.sleep(TICK)

    def renewable(self) -> bool:
        """Whether leases are renewed on schedule, so a job claimed now keeps its lease.

        A renewal is due every ``interval`` and looked for every ``WATCH``; one that is a whole
        interval late means the heartbeat is stuck (or failing), well before the leases it
        renewed last run out (three intervals).
        """
        renewed_at = self.renewed_at
        return renewed_at is not None and time.monotonic() - renewed_at <= 2 * self.interval + WATCH

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # not started when the worker never got its database
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        """Until stopped: watch the loop, renew on schedule. Nothing may end this thread while
        the worker runs (its jobs would lose their leases and run twice), so a round that fails
        in an unforeseen way is logged, and the next one comes as usual."""
        next_beat = time.monotonic()  # the first renewal at once: claiming waits for it
        ok = True
        while not self._stop.wait(WATCH):
            try:
                self._watch_loop()
            except Exception:
                log.exception("watching the event loop failed")
            try:
                # A change in abandoned threads shows on the worker's row at once, not a beat later.
                if time.monotonic() >= next_beat or (ok and self._abandoned() != self._abandoned_sent):
                    ok = self._renew()
                    # After a failure, try again soon: leases run out while we are away.
                    next_beat = time.monotonic() + (self.interval if ok else min(RETRY, self.interval))
            except Exception:
                log.exception("heartbeat failed; leases expire in %.0fs", self._beat.lease_seconds)
                ok, next_beat = False, time.monotonic() + min(RETRY, self.interval)
        self._close()

    def _watch_loop(self) -> None:
        """Log an event loop blocked past the warning, naming the job that blocks it, and again
        every REPEAT_WARNING; then once when it turns again."""
        now = time.monotonic()
        stalled = now - self.alive_at
        if stalled >= self._block_warning:
            if self._blocked_since is None:
                self._blocked_since = self.alive_at
            if now - self._warned_at >= REPEAT_WARNING:
                self._warned_at = now
                log.warning("event loop blocked %.1f s by %s", stalled, self._blocker() or "worker code")
        elif self._blocked_since is not None:
            log.warning("event loop free again after %.1f s", self.alive_at - self._blocked_since)
            self._blocked_since, self._warned_at = None, 0.0

    def _renew(self) -> bool:
        held = self._held()
        abandoned = self._abandoned()
        params = {
            "id": self._beat.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self._beat.queues,
            "concurrency": self._beat.concurrency,
            "abandoned": abandoned,
            "lease": self._beat.lease_seconds,
            "held": [job_id for job_id, _ in held],
            "token": [token for _, token in held],
        }
        slow = threading.Timer(
            SLOW_ANSWER, log.warning, (SLOW_HEARTBEAT, SLOW_ANSWER, self._beat.lease_seconds)
        )
        slow.daemon = True
        slow.start()
        sent_at = time.monotonic()
        try:
            with self._connection().cursor(row_factory=dataclass_row(Renewed)) as cur:
                rows = cur.execute(self._queries.heartbeat, params).fetchall()
        except Exception as exc:
            self._close()
            log.warning("heartbeat failed (%s); leases expire in %.0fs", exc, self._beat.lease_seconds)
            return False
        finally:
            slow.cancel()
        self._abandoned_sent = abandoned
        was_renewable = self.renewable()
        self.renewed_at = sent_at
        if not was_renewable:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._on_renewable)
        renewed = {row.id for row in rows}
        cancels = {row.id for row in rows if row.cancel_requested}
        sent = dict(held)
        if cancels or renewed != sent.keys():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._on_renewed, sent, renewed, cancels)
        return True

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = psycopg.connect(self._dsn, autocommit=True, **connect_kwargs("lease", self._dsn))
            if prepared_statements_enabled():  # the heartbeat's plan depends on the table's size too
                conn.execute(PLAN_AT_EVERY_RUN)
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
