"""What a handler can know and do about the job it runs: ``def handler(..., ctx: JobContext)``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgqueue.errors import UnstorableProgress
from pgqueue.worker.outcomes import to_jsonb

logger = logging.getLogger("pgqueue.job")


@dataclass(slots=True)
class JobContext:
    """Passed to handlers that declare a ``ctx`` parameter.

    ``cancelled`` is a :class:`threading.Event` so sync handlers (in threads) can poll it;
    async handlers are also cancelled outright when their job is cancelled.
    """

    job_id: int
    queue: str
    task: str
    attempt: int
    max_attempts: int
    scheduled_for: datetime | None
    worker_id: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Where set_progress sends (job id, attempt, checked JSON text): the worker's progress
    # writer; None for a handler called directly (its progress goes nowhere).
    progress_sink: Callable[[int, int, str], None] | None = field(default=None, repr=False)
    _log: logging.LoggerAdapter[logging.Logger] | None = field(default=None, repr=False)

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the job's id, task, queue and attempt."""
        if self._log is None:
            fields = {"job_id": self.job_id, "task": self.task, "queue": self.queue, "attempt": self.attempt}
            self._log = logging.LoggerAdapter(logger, fields)
        return self._log

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def set_progress(self, progress: int | float | Mapping[str, Any]) -> None:
        """Record progress (0-100, or a JSON dict); written to the job within a second, batched.

        A value that is out of range or could not be stored raises :class:`UnstorableProgress`
        here, at the call, so the handler sees it; the background write only ever gets checked JSON.
        """
        if isinstance(progress, bool) or not isinstance(progress, int | float | Mapping):
            raise UnstorableProgress(f"progress must be a number 0-100 or a dict, got {progress!r}")
        if isinstance(progress, int | float) and not 0 <= progress <= 100:
            raise UnstorableProgress(f"progress must be within 0-100, got {progress!r}")
        try:
            text = to_jsonb(progress)
        except ValueError as exc:
            raise UnstorableProgress(f"progress cannot be stored: {exc}") from None
        if self.progress_sink is not None:
            self.progress_sink(self.job_id, self.attempt, text)
