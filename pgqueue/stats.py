"""Read-only views of the queues for the CLI and the admin app."""

from __future__ import annotations

from dataclasses import dataclass

from pgqueue.queue import Queue


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
    with queue.connection() as c:
        return [QueueCounts(*row) for row in c.execute(queue.queries.queue_counts).fetchall()]
