"""Jobs handed over by their enqueue (``!take``): reading one, judging whether it is still
fresh, and giving back those whose notification never arrived.

An enqueue that picks a waiting worker may insert its job already claimed for that worker and
send the row in the notification (see the ``enqueue`` statement), so the job starts without a
claim's round trip. The row is the worker's from that commit, under a lease the worker does not
renew until it has read the notification. Two ways a hand-off can go wrong, and the rule for each:

- *It arrives late.* It sat in a frozen or blocked worker while its lease ran, and may have been
  rescued and run elsewhere: one older than :data:`HANDOFF_FRESH` by the server's clock goes back.
  The clock is read with each sign-up (``start_waiting`` returns it), so no wall clock is
  compared across hosts, and the hand-off's time is its lease's start (its end, less the lease).
- *It never arrives.* It went to a listening connection that was gone: each connect reports when
  it began to listen, and what was handed over before is given back. Or its producer never sent
  it: the notice goes out after the enqueue's commit (see ``notify_after``), and a producer can
  die or be cancelled in between. So every poll interval a worker that has signed up gives back
  what was handed to it more than :data:`HANDOFF_STRANDED` ago and never came.
  Both give-backs (``release_missed_handoffs``) work the same way: the worker first stops taking
  what was handed over before a boundary, then gives back what it does not hold from before it.
  Both sides use the same instant, so a job is either given back or taken, never both.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pgqueue._enqueue import wake_params
from pgqueue._sql import Queries
from pgqueue.worker.db import Conn
from pgqueue.worker.execution import ClaimedJob

log = logging.getLogger("pgqueue.worker")
HANDOFF_FRESH = 1.0  # seconds: a job handed over longer ago than this goes back, uncharged
# Seconds after which a hand-off whose notice has not come is given back: well past any notice
# in flight (their producers send them a round trip after the commit), and twice HANDOFF_FRESH,
# so the worker's estimate of the server's clock has a second to be wrong in.
HANDOFF_STRANDED = 2 * HANDOFF_FRESH


def read_handoff(payload: str) -> tuple[ClaimedJob, float]:
    """A ``!take`` notification's job, as a claim's row (its start not yet charged), and when its
    lease ends (epoch seconds)."""
    row = json.loads(payload)
    timeout = row["timeout"]
    job = ClaimedJob(
        id=int(row["id"]),
        queue=str(row["queue"]),
        task=str(row["task"]),
        args=row["args"],
        priority=int(row["priority"]),
        attempt=int(row["attempt"]),
        max_attempts=int(row["max_attempts"]),
        timeout=None if timeout is None else float(timeout),
        scheduled_for=None,
        started=False,
        token=UUID(row["token"]),
    )
    return job, float(row["lease"])


@dataclass(slots=True)
class HandoffClock:
    """What a worker knows of the server's clock, and from when on it takes hand-offs."""

    lease_seconds: float
    server_offset: float | None = None  # the server's epoch seconds minus time.monotonic()
    taking_since: float | None = None  # server epoch seconds: what was handed over before goes back
    give_back_before: datetime | None = None  # a give-back still to run

    def read(self, server_epoch: float, sent: float, received: float) -> None:
        """The server's clock as a statement sent at ``sent`` and answered at ``received``
        (monotonic) read it."""
        self.server_offset = server_epoch - (sent + received) / 2

    def listening_again(self, since: datetime) -> None:
        """The listener hears from ``since`` (the server's clock) on."""
        self._stop_taking_before(since)

    def give_up_on_stranded(self) -> bool:
        """Stop taking what was handed over more than HANDOFF_STRANDED ago (by the server's
        clock), to give it back; False before the clock was read (nothing was handed over yet)."""
        if self.server_offset is None:
            return False
        now = time.monotonic() + self.server_offset
        self._stop_taking_before(datetime.fromtimestamp(now - HANDOFF_STRANDED, UTC))
        return True

    def _stop_taking_before(self, boundary: datetime) -> None:
        epoch = boundary.timestamp()
        if self.taking_since is None or epoch > self.taking_since:
            self.taking_since = epoch
        if self.give_back_before is None or boundary > self.give_back_before:
            self.give_back_before = boundary

    def staleness(self, lease_ends: float) -> str | None:
        """Why a hand-off whose lease ends at ``lease_ends`` must not start here (None: fresh)."""
        handed_at = lease_ends - self.lease_seconds
        # The margin errs towards giving back: the give-back statement takes what is earlier.
        if self.taking_since is not None and handed_at < self.taking_since + 0.001:
            return "its notice came too late (it is given back with the others)"
        if self.server_offset is None:
            return "no reading of the server's clock yet"
        age = time.monotonic() + self.server_offset - handed_at
        if age > HANDOFF_FRESH:
            return f"handed over {age:.1f} s ago (the worker was stalled?)"
        return None


async def give_back(
    c: Conn, queries: Queries, worker_id: str, lease_seconds: float, before: datetime, held: list[int]
) -> list[str]:
    """Give back the jobs handed to this worker before ``before`` that it does not hold
    (``held``: ids), and wake a worker for their queues; one entry per job, its queue."""
    params: dict[str, Any] = {"worker_id": worker_id, "since": before, "lease": lease_seconds, "held": held}
    queues = [r[0] for r in await (await c.execute(queries.release_missed_handoffs, params)).fetchall()]
    if queues:
        await c.execute(queries.wake_queues, wake_params(queries, sorted(set(queues))))
    return queues
