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
- *It never arrives.* It went to a listening connection that was gone. Each connect reports when
  it began to listen; what was handed over before is given back
  (``release_missed_handoffs``), and a notification of such a job that arrives all the same is
  not taken: both sides use the same instant, so a job is either given back or taken, never both.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from pgqueue._enqueue import wake_params
from pgqueue._sql import Queries
from pgqueue.worker.db import Conn
from pgqueue.worker.execution import ClaimedJob

log = logging.getLogger("pgqueue.worker")
HANDOFF_FRESH = 1.0  # seconds: a job handed over longer ago than this goes back, uncharged


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
    """What a worker knows of the server's clock, and since when its listener hears."""

    lease_seconds: float
    server_offset: float | None = None  # the server's epoch seconds minus time.monotonic()
    listening_since: float | None = None  # server epoch seconds
    missed_since: datetime | None = None  # a give-back still to run

    def read(self, server_epoch: float, sent: float, received: float) -> None:
        """The server's clock as a statement sent at ``sent`` and answered at ``received``
        (monotonic) read it."""
        self.server_offset = server_epoch - (sent + received) / 2

    def listening_again(self, since: datetime) -> None:
        self.listening_since = since.timestamp()
        self.missed_since = since

    def staleness(self, lease_ends: float) -> str | None:
        """Why a hand-off whose lease ends at ``lease_ends`` must not start here (None: fresh)."""
        handed_at = lease_ends - self.lease_seconds
        # The margin errs towards giving back: the give-back statement takes what is earlier.
        if self.listening_since is not None and handed_at < self.listening_since + 0.001:
            return "handed over before the listener connected again (given back with the others)"
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
