"""What a handler can know and do about the job it runs: ``def handler(..., ctx: JobContext)``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgqueue.errors import InvalidJobError, UnstorableProgress
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
    # Set by the worker: receives (job id, attempt, progress as checked JSON text).
    _report_progress: Callable[[int, int, str], None] | None = field(default=None, repr=False)
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

        A value that could not be stored raises :class:`UnstorableProgress` here, at the call,
        so the handler sees it; the background write only ever gets checked JSON.
        """
        if isinstance(progress, bool) or not isinstance(progress, int | float | Mapping):
            raise InvalidJobError(f"progress must be a number 0-100 or a dict, got {progress!r}")
        if isinstance(progress, int | float) and not 0 <= progress <= 100:
            raise InvalidJobError(f"progress must be within 0-100, got {progress!r}")
        try:
            text = to_jsonb(progress)
        except ValueError as exc:
            raise UnstorableProgress(f"progress cannot be stored: {exc}") from None
        if self._report_progress is not None:
            self._report_progress(self.job_id, self.attempt, text)
