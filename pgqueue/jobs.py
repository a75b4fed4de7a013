"""Jobs as plain typed data, and the checks that turn an enqueue request into a row to insert."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pgqueue.errors import InvalidJobError
from pgqueue.naming import check_queue_name, check_task_name

# A JSON "\u0000" escape (not an escaped backslash followed by "u0000").
# One encoder for every job: building one per call costs more than the encoding itself.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 1, 10, 5
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3


class JobState(StrEnum):
    """Where a job is in its life. ``DEAD`` jobs live in the dead-letter table."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job as stored, live or dead-lettered."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    priority: int
    state: JobState
    run_at: datetime | None
    attempts: int
    max_attempts: int
    timeout: float | None
    unique_key: str | None
    scheduled_for: datetime | None
    worker_id: str | None
    progress: Any
    result: Any
    errors: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def is_delayed(self) -> bool:
        """Queued but not yet due: "delayed" is derived from ``run_at``, not stored."""
        if self.state is not JobState.QUEUED or self.run_at is None:
            return False
        return self.run_at > datetime.now(self.run_at.tzinfo)


JOB_COLUMNS = (
    "id, queue, task, args, priority, state::text AS state, run_at, attempts, max_attempts, "
    "timeout, unique_key, scheduled_for, worker_id, progress, result, errors, created_at, "
    "started_at, finished_at"
)


def job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(**{**row, "state": JobState(row["state"])})


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One validated job, ready to insert. Build it with :func:`build_request`."""

    queue: str
    task: str
    args_json: str
    priority: int
    delay_seconds: float
    run_at: datetime | None
    max_attempts: int
    timeout: float | None
    unique_key: str | None
    scheduled_for: datetime | None = None
    args: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def with_args(self, args: Mapping[str, Any], args_json: str, unique_key: str | None) -> JobRequest:
        """The same options for another job (validated args and key): bulk enqueue's fast path."""
        return JobRequest(
            self.queue,
            self.task,
            args_json,
            self.priority,
            self.delay_seconds,
            self.run_at,
            self.max_attempts,
            self.timeout,
            unique_key,
            self.scheduled_for,
            args,
        )


def dump_args(args: object) -> str:
    """Arguments are stored as a JSON object and passed to the handler as keyword arguments."""
    if type(args) is not dict and not isinstance(args, Mapping):
        raise InvalidJobError(f"job args must be a mapping of keyword arguments, not {type(args).__name__}")
    for key in args:
        if type(key) is not str and not isinstance(key, str):
            raise InvalidJobError(f"job args keys must be strings, got {key!r}")
    try:
        text = _ENCODER.encode(args)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(f"job args are not JSON-serialisable: {exc}") from exc
    # What JSON allows but PostgreSQL's jsonb refuses: refused here, before anything is written.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidJobError(f"job args hold a string that is not valid Unicode: {exc}") from exc
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise InvalidJobError("job args hold a NUL character (\\x00): PostgreSQL cannot store it")
    return text


def check_unique_key(unique_key: object) -> None:
    if unique_key is not None and (not isinstance(unique_key, str) or not unique_key or "\x00" in unique_key):
        raise InvalidJobError(
            f"unique_key must be a non-empty string without NUL characters, got {unique_key!r}"
        )


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidJobError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _delay_seconds(delay: timedelta | float | int | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise InvalidJobError(f"delay must be a timedelta or a number of seconds, got {delay!r}")
    if seconds < 0:
        raise InvalidJobError(f"delay must not be negative, got {delay!r}")
    try:  # bulk enqueue resolves delays in Python: they must give a representable datetime
        datetime.now(UTC) + timedelta(seconds=seconds)
    except OverflowError as exc:
        raise InvalidJobError(f"delay is too long, got {delay!r}") from exc
    return float(seconds)


def build_request(
    task: str,
    args: Mapping[str, Any] | None,
    *,
    queue: str,
    priority: int,
    delay: timedelta | float | None,
    run_at: datetime | None,
    max_attempts: int,
    timeout: float | None,
    unique_key: str | None,
    scheduled_for: datetime | None = None,
) -> JobRequest:
    """Validate every field of one enqueue; raises :class:`InvalidJobError` on the first bad one."""
    if delay is not None and run_at is not None:
        raise InvalidJobError("give either delay or run_at, not both")
    if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
        raise InvalidJobError(f"run_at must be a timezone-aware datetime, got {run_at!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise InvalidJobError(f"timeout must be a positive number of seconds, got {timeout!r}")
    check_unique_key(unique_key)
    args = {} if args is None else args
    return JobRequest(
        queue=check_queue_name(queue),
        task=check_task_name(task),
        args_json=dump_args(args),
        priority=_check_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY),
        delay_seconds=_delay_seconds(delay),
        run_at=run_at,
        max_attempts=_check_int("max_attempts", max_attempts, 1, 1_000_000),
        timeout=float(timeout) if timeout is not None else None,
        unique_key=unique_key,
        scheduled_for=scheduled_for,
        args=args,
    )
