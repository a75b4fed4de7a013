"""Counters of what one worker did, for its log lines and for tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    requeued: int = 0

    def count_all(self, kinds: Iterable[str]) -> None:
        """Count written outcomes of these kinds (outcome kinds of the completer)."""
        for kind, n in Counter(kinds).items():
            name = _COUNTER[kind]
            setattr(self, name, getattr(self, name) + n)


_COUNTER = {
    "completed": "completed",
    "retry": "retried",
    "dead": "dead",
    "cancelled": "cancelled",
    "requeue": "requeued",
    "release": "requeued",
}
