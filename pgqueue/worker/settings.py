"""Worker settings from keyword arguments or ``PGQUEUE_*`` environment variables (for systemd)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

from pgqueue._naming import check_queue_name
from pgqueue._settings import EnvSettings, Stripped, strip
from pgqueue._tasks import ISOLATIONS, Isolation
from pgqueue.errors import ConfigurationError


def parse_queue_limits(text: str) -> dict[str, int]:
    """``"email=10,reports=2"`` → ``{"email": 10, "reports": 2}``."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ConfigurationError(f"queue limit {part!r} is not NAME=N with N >= 1")
        limits[check_queue_name(name.strip())] = int(value)
    return limits


def parse_queue_list(text: str) -> tuple[str, ...]:
    return tuple(check_queue_name(q.strip()) for q in text.split(",") if q.strip())


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker runs. Every field has a ``PGQUEUE_<FIELD>`` environment variable."""

    queues: tuple[str, ...] = ("default",)
    concurrency: int = 10
    # Jobs claimed ahead into memory so a freed slot starts its next job without a round trip;
    # -1 means "as many as concurrency". They count as running (and are leased) while they wait.
    prefetch: int = -1
    queue_concurrency: Mapping[str, int] = field(default_factory=dict)
    # Free slots are dealt out round robin across the queues with ready jobs; a queue of weight
    # w gets w jobs a round (default 1): "email=3,imports=1".
    queue_weights: Mapping[str, int] = field(default_factory=dict)
    poll_interval: float = 2.0
    lease_seconds: float = 30.0
    grace_period: float = 30.0
    rescue_interval: float = 5.0
    keep_completed_seconds: float = 86400.0
    prune_interval: float = 60.0
    prune_batch: int = 1000
    rate_burst_seconds: float = 0.1
    # Where sync handlers run: "thread" (a thread cannot be stopped: past its timeout it keeps
    # its slot until it returns) or "process" (a child process, killed at the job's timeout).
    # A task's own ``isolation=`` option wins over this.
    isolation: Isolation = "thread"
    # The app's ``module:attribute`` import path; child processes import it to find handlers.
    app: str | None = None
    # The event loop blocked longer than this is logged with the job that blocks it.
    block_warning: float = 1.0
    # Where the LISTEN connection goes, if not the worker's DSN: straight to PostgreSQL or to a
    # session-mode pool when the DSN is a transaction-mode pooler (which never delivers NOTIFY).
    listen_dsn: str | None = None

    def __post_init__(self) -> None:
        if not self.queues:
            raise ConfigurationError("a worker needs at least one queue")
        for name in self.queues:
            check_queue_name(name)
        if self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {self.concurrency}")
        for name, limit in self.queue_concurrency.items():
            if name not in self.queues:
                raise ConfigurationError(f"queue_concurrency names {name!r}, which is not in queues")
            if limit < 1:
                raise ConfigurationError(f"queue_concurrency for {name!r} must be at least 1")
        for name, weight in self.queue_weights.items():
            if name not in self.queues:
                raise ConfigurationError(f"queue_weights names {name!r}, which is not in queues")
            if weight < 1:
                raise ConfigurationError(f"queue_weights for {name!r} must be at least 1")
        for name in ("poll_interval", "lease_seconds", "rescue_interval", "prune_interval"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.prefetch < -1:
            raise ConfigurationError("prefetch must be >= 0 (or -1 for as many as concurrency)")
        if self.prefetch == -1:
            object.__setattr__(self, "prefetch", self.concurrency)
        if self.grace_period < 0:
            raise ConfigurationError("grace_period must not be negative")
        if self.isolation not in ISOLATIONS:
            raise ConfigurationError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        if self.block_warning <= 0:
            raise ConfigurationError("block_warning must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Defaults, overlaid by ``PGQUEUE_*`` variables (:class:`WorkerEnv`, read now), overlaid
        by non-None ``overrides`` (keyword arguments, CLI flags)."""
        values: dict[str, Any] = WorkerEnv.load(environ).model_dump(exclude_none=True)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _env_text(parse: Callable[[str], object]) -> BeforeValidator:
    """A validator applying ``parse`` to the variable's text, its refusal reported as pydantic's
    so the error names the variable."""

    def validate(value: Any) -> Any:
        value = strip(value)
        if not isinstance(value, str):
            return value
        try:
            return parse(value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from exc

    return BeforeValidator(validate)


QueueList = Annotated[tuple[str, ...] | None, NoDecode, _env_text(parse_queue_list)]
QueueLimits = Annotated[dict[str, int] | None, NoDecode, _env_text(parse_queue_limits)]


class WorkerEnv(EnvSettings):
    """What the environment says about a worker: ``PGQUEUE_<FIELD>`` for every field of
    :class:`WorkerSettings`, ``None`` where unset. Only the text is parsed here; ranges and
    cross-field rules stay in :class:`WorkerSettings`, which checks keyword arguments alike."""

    queues: QueueList = None
    """``PGQUEUE_QUEUES``: ``email,reports``."""
    concurrency: int | None = None
    prefetch: int | None = None
    queue_concurrency: QueueLimits = None
    """``PGQUEUE_QUEUE_CONCURRENCY``: ``email=10,reports=2``."""
    queue_weights: QueueLimits = None
    """``PGQUEUE_QUEUE_WEIGHTS``: ``email=3,imports=1``."""
    poll_interval: float | None = None
    lease_seconds: float | None = None
    grace_period: float | None = None
    rescue_interval: float | None = None
    keep_completed_seconds: float | None = None
    prune_interval: float | None = None
    prune_batch: int | None = None
    rate_burst_seconds: float | None = None
    isolation: Stripped = None
    app: Stripped = None
    block_warning: float | None = None
    listen_dsn: Stripped = None
