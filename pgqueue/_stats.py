"""Read-only views of the queues for the CLI and the admin app."""

from __future__ import annotations

from dataclasses import dataclass

from pgqueue._queue import Queue
from pgqueue._rows import QueueOverview, dataclass_row


@dataclass(frozen=True, slots=True)
class QueueCounts:
    queue: str
    queued: int
    delayed: int
    running: int
    completed: int
    cancelled: int
    dead: int


def queue_counts(queue: Queue) -> list[QueueCounts]:
    """Jobs per state for every queue that has jobs, dead jobs or settings."""
    with queue.connection() as c, c.cursor(row_factory=dataclass_row(QueueOverview)) as cur:
        rows = cur.execute(queue.queries.queue_overview).fetchall()
    return [
        QueueCounts(r.queue, r.queued, r.delayed, r.running, r.completed, r.cancelled, r.dead)
        for r in sorted(rows, key=lambda r: r.queue)
    ]
