"""Counters of what one worker did, for its log lines and for tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    requeued: int = 0

    def count(self, kind: str) -> None:
        """Count one written outcome of ``kind`` (an outcome kind of the completer)."""
        name = _COUNTER[kind]
        setattr(self, name, getattr(self, name) + 1)


_COUNTER = {
    "completed": "completed",
    "retry": "retried",
    "dead": "dead",
    "cancelled": "cancelled",
    "requeue": "requeued",
    "release": "requeued",
}
