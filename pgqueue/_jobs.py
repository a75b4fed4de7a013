"""Jobs as plain typed data, and the checks that turn an enqueue request into a row to insert."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypedDict

from pgqueue import _jsonb as jsonb
from pgqueue._naming import check_queue_name, check_task_name
from pgqueue.errors import InvalidJobError

# A JSON "\u0000" escape (not an escaped backslash followed by "u0000").
# One encoder for every job: building one per call costs more than the encoding itself.
_CONTAINERS = (dict, list, tuple)

MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 1, 10, 5
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 1_000_000

# Limits on what one job may hold, each checked before anything is written.
#
# Nesting: Python's JSON decoder gives up near its recursion limit (1000 frames, less when the
# stack is already deep), and every reader of a job (workers, get_job, the admin) decodes its
# args. 100 levels is far more than real arguments use and far below where any reader breaks.
MAX_ARGS_DEPTH = 100
# Integers: PostgreSQL's jsonb holds far larger numbers, but Python refuses to read an integer of
# more than 4300 digits (its default int_max_str_digits), so a bigger one could never be decoded.
MAX_INT_DIGITS = 4300
_TOO_MANY_DIGITS = 10**MAX_INT_DIGITS  # the smallest integer of MAX_INT_DIGITS + 1 digits
# Unique keys live in a btree index on (queue, unique_key), whose entries must stay under about
# 2700 bytes; 1000 UTF-8 bytes leaves room for the queue name and the index's own overhead.
MAX_UNIQUE_KEY_BYTES = 1000
# A timeout longer than a year is no timeout: pass None for that. The bound keeps it a finite float.
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600
# Run times must fit both PostgreSQL's timestamptz and Python's datetime (which ends with year
# 9999). Delays resolve against the database's clock, not this process's: stopping a day short
# keeps a skewed clock from pushing the run time over the end.
LATEST_RUN_AT = datetime.max.replace(tzinfo=UTC)
LATEST_DELAYED_RUN_AT = LATEST_RUN_AT - timedelta(days=1)
# The name rules of pgqueue._naming, checked first so an enormous name is never cached there.
MAX_QUEUE_NAME_LENGTH = 63
MAX_TASK_NAME_LENGTH = 200


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


_JOB_FIELDS = tuple(f.name for f in fields(Job) if f.name != "state")


@dataclass(frozen=True, slots=True)
class JobRow(Job):
    """A row of the ``get_job`` statement, by column name (:func:`pgqueue._rows.dataclass_row`):
    a :class:`Job`, then what only the admin shows — the lease, the cancel flag, and whether a
    queued job waits for its run time by the database's clock."""

    lease_expires_at: datetime | None
    cancel_requested: bool
    delayed: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", JobState(self.state))  # the column is text


def job_from_row(row: Mapping[str, Any]) -> Job:
    """The :class:`Job` of a ``get_job`` row read as a mapping; columns it has no field for
    (the admin's) are left out."""
    return Job(**{f: row[f] for f in _JOB_FIELDS}, state=JobState(row["state"]))


class JobOptions(TypedDict, total=False):
    """The options of one enqueue, as keyword arguments; unset ones take the task's defaults.

    The one list of them: ``enqueue``, ``Task.with_options`` and :class:`JobSpec` all take it.
    """

    queue: str | None
    priority: int | None
    delay: timedelta | float | None
    run_at: datetime | None
    max_attempts: int | None
    timeout: float | None
    unique_key: str | None


OPTION_NAMES = frozenset(JobOptions.__annotations__)


@dataclass(slots=True)
class JobRequest:
    """One validated job, ready to insert. Built by :func:`pgqueue._enqueue.build_request`.

    Not frozen: a bulk enqueue builds one per job, and a frozen dataclass's constructor (every
    field set through ``object.__setattr__``) was a tenth of its time. Nothing changes one.
    """

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

    @staticmethod
    def checked(
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
        scheduled_for: datetime | None,
    ) -> JobRequest:
        """The request for resolved options, each checked; raises :class:`InvalidJobError` on the
        first bad one (see :func:`pgqueue._enqueue.build_request`, which resolves them)."""
        if run_at is not None:
            _check_time("run_at", run_at)
        if scheduled_for is not None:
            _check_time("scheduled_for", scheduled_for)
        _check_name_length("queue", queue, MAX_QUEUE_NAME_LENGTH)
        _check_name_length("task", task, MAX_TASK_NAME_LENGTH)
        check_unique_key(unique_key)
        args = {} if args is None else args
        return JobRequest(
            queue=check_queue_name(queue),
            task=check_task_name(task),
            args_json=dump_args(args),
            priority=_check_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY),
            delay_seconds=_delay_seconds(delay),
            run_at=run_at,
            max_attempts=_check_int("max_attempts", max_attempts, 1, MAX_ATTEMPTS_LIMIT),
            timeout=_check_timeout(timeout),
            unique_key=unique_key,
            scheduled_for=scheduled_for,
            args=args,
        )

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


def short_repr(value: object, limit: int = 80) -> str:
    """A short repr for error messages: hostile values can be huge, or refuse ``repr`` outright
    (an integer past Python's digit limit does)."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _deepest_or_biggest(args: Mapping[str, Any], check_ints: bool) -> str | None:
    """What makes the args too deep (or, if asked, hold too long an integer), else None.

    Walked with an explicit stack, so any depth is measured without recursing; only containers
    are stacked. Lists, tuples and dicts are the only containers the encoder accepted.
    """
    stack: list[tuple[Any, int]] = [(args, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_ARGS_DEPTH:
            return _too_deep()
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, _CONTAINERS):
                stack.append((child, depth + 1))
            elif check_ints and isinstance(child, int) and abs(child) >= _TOO_MANY_DIGITS:
                return f"job args hold an integer of more than {MAX_INT_DIGITS} digits"
    return None


def _too_deep() -> str:
    return f"job args are nested more than {MAX_ARGS_DEPTH} levels deep (lists and objects)"


def dump_args(args: object) -> str:
    """Arguments are stored as a JSON object and passed to the handler as keyword arguments."""
    if type(args) is not dict and not isinstance(args, Mapping):
        raise InvalidJobError(f"job args must be a mapping of keyword arguments, not {type(args).__name__}")
    for key in args:
        if type(key) is not str and not isinstance(key, str):
            raise InvalidJobError(f"job args keys must be strings, got {short_repr(key)}")
    try:
        text = jsonb.encode(args)
    except RecursionError as exc:  # far deeper than the limit: the encoder itself gave up
        raise InvalidJobError(_too_deep()) from exc
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(f"job args are not JSON-serialisable: {exc}") from exc
    # Every list or object writes one bracket, so few brackets prove shallow args without a walk.
    # The integer check is needed only where this process lifted Python's own digit limit (the
    # encoder then accepts numbers that other processes cannot read back).
    check_ints = len(text) > MAX_INT_DIGITS and not 0 < sys.get_int_max_str_digits() <= MAX_INT_DIGITS
    if check_ints or text.count("[") + text.count("{") > MAX_ARGS_DEPTH:
        problem = _deepest_or_biggest(args, check_ints)
        if problem is not None:
            raise InvalidJobError(problem)
    too_large = jsonb.oversize(text)
    if too_large is not None:
        raise InvalidJobError(f"job args are {too_large}: pass a key to large data, not the data")
    # What JSON allows but PostgreSQL's jsonb refuses: refused here, before anything is written.
    surrogate = jsonb.lone_surrogate(text)
    if surrogate is not None:
        raise InvalidJobError(f"job args hold a string that is not valid Unicode: {surrogate}") from surrogate
    if jsonb.holds_nul(text):
        raise InvalidJobError("job args hold a NUL character (\\x00): PostgreSQL cannot store it")
    return text


def check_unique_key(unique_key: object) -> None:
    if unique_key is None:
        return
    if not isinstance(unique_key, str) or not unique_key or "\x00" in unique_key:
        raise InvalidJobError(
            f"unique_key must be a non-empty string without NUL characters, got {short_repr(unique_key)}"
        )
    if unique_key.isascii():
        size = len(unique_key)
    else:
        try:
            size = len(unique_key.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidJobError(f"unique_key is not valid Unicode: {exc}") from exc
    if size > MAX_UNIQUE_KEY_BYTES:
        raise InvalidJobError(
            f"unique_key is {size} bytes long in UTF-8; the limit is {MAX_UNIQUE_KEY_BYTES} bytes"
        )


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidJobError(f"{name} must be an integer from {low} to {high}, got {short_repr(value)}")
    return value


def _check_name_length(kind: str, name: object, limit: int) -> None:
    if isinstance(name, str) and len(name) > limit:
        raise InvalidJobError(f"{kind} name is {len(name)} characters long; the limit is {limit}")


def _check_time(name: str, value: object) -> None:
    """An aware datetime that is a valid instant in UTC, so PostgreSQL stores what Python reads."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidJobError(f"{name} must be a timezone-aware datetime, got {short_repr(value)}")
    try:
        value.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidJobError(
            f"{name} must fall within years 1 to 9999 in UTC (what both PostgreSQL and Python "
            f"datetimes hold), got {value.isoformat()}"
        ) from exc


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT_SECONDS  # also refuses NaN
    ):
        raise InvalidJobError(
            f"timeout must be a positive number of seconds up to {MAX_TIMEOUT_SECONDS} (365 days; "
            f"None for no timeout), got {short_repr(timeout)}"
        )
    return float(timeout)


def _delay_seconds(delay: object) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or (isinstance(seconds, float) and not math.isfinite(seconds))
    ):
        raise InvalidJobError(f"delay must be a timedelta or a number of seconds, got {short_repr(delay)}")
    if seconds < 0:
        raise InvalidJobError(f"delay must not be negative, got {short_repr(delay)}")
    # Compared as numbers, never converted first: an int too big for a float or a timedelta
    # (10**400) is refused here like any other delay that ends past the last storable time.
    if seconds > (LATEST_DELAYED_RUN_AT - datetime.now(UTC)).total_seconds():
        raise InvalidJobError(
            f"delay is too long: the job would run after {LATEST_DELAYED_RUN_AT:%Y-%m-%d} UTC "
            f"(the end of year 9999, less a day for clock skew), got {short_repr(delay)}"
        )
    return float(seconds)
