"""The admin API's request and response bodies: every route answers with one of these.

They are the contract the OpenAPI document publishes, so field descriptions live here rather
than in the routes. Inputs forbid unknown fields, so a typo is a 422, not a silent no-op, and
are strict, so ``true`` is not a number of seconds and ``"5"`` is not a concurrency (``5.0`` is:
JSON Schema counts it as an integer, and the OpenAPI document promises JSON Schema).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

JobStateName = Literal["queued", "delayed", "running", "completed", "cancelled", "dead"]
"""A job's state as the admin shows it: "delayed" is queued with a future run time."""

StateFilter = Literal["queued", "delayed", "retrying", "running", "completed", "cancelled", "dead"]
"""What the job list filters on: a state, or "retrying" (queued after at least one failure)."""

# The naming rules of pgqueue._naming, for the OpenAPI document and for request validation.
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$"
TASK_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$"
MAX_JOB_ID = 2**63 - 1
TEN_YEARS = 10 * 365 * 86400.0


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer includes ``5.0``; strict mode would refuse it, so it becomes ``5``
    here. Booleans, strings and ``2.5`` still reach strict validation, which refuses them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Concurrency = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_json_integer)]
"""A concurrency cap: an integer as JSON Schema (and so the OpenAPI document) defines one,
validated strictly. The bounds sit inside, next to ``int``, so the schema shows them as
``minimum``/``maximum``."""


class ErrorOut(BaseModel):
    """Every 4xx/5xx the admin raises itself: one human-readable sentence."""

    detail: str = Field(description="What went wrong, and what to do about it.")


class StateCounts(BaseModel):
    queued: int = Field(description="Due now and waiting for a worker.")
    delayed: int = Field(description="Waiting for their run_at (scheduled or backing off).")
    retrying: int = Field(description="Queued or delayed after at least one failed attempt.")
    running: int
    completed: int
    cancelled: int
    dead: int = Field(description="In the dead-letter table: out of attempts or aborted.")


class QueueStats(BaseModel):
    name: str
    counts: StateCounts
    paused: bool
    concurrency: int | None = Field(description="Global cap on running jobs across workers.")
    rate_limit: float | None = Field(description="Global claims per second across workers.")
    throughput: list[int] = Field(
        description="Jobs completed per minute, oldest minute first, the current minute last."
    )
    completed_recently: int = Field(description="Jobs completed within the run-time window.")
    avg_run_seconds: float | None = Field(description="Mean run time of recent completions.")
    p95_run_seconds: float | None = Field(description="95th percentile of recent run times.")
    oldest_waiting_seconds: float | None = Field(
        description="Age of the longest-waiting due job (since its run_at), if any."
    )


class QueueList(BaseModel):
    queues: list[QueueStats]
    throughput_minutes: int
    run_window_seconds: float


class QueueSettingsOut(BaseModel):
    name: str
    paused: bool
    concurrency: int | None
    rate_limit: float | None


class QueueLimitsIn(BaseModel):
    """Change a queue's global limits. Omit a field to keep it; send null to remove the limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    concurrency: Concurrency | None = None
    rate_limit: float | None = Field(default=None, gt=0, le=1_000_000, allow_inf_nan=False)


class JobSummary(BaseModel):
    id: int
    queue: str
    task: str
    state: JobStateName
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None = Field(description="Completed/cancelled, or dead-lettered at.")
    worker_id: str | None
    last_error: str | None = Field(description="Message of the last failed attempt.")


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: int | None = Field(
        description="Pass as before_id for the next (older) page; null on the last page."
    )


class AttemptError(BaseModel):
    """One failed attempt as the worker recorded it."""

    attempt: int | None = None
    at: str | None = None
    type: str | None = None
    message: str | None = None
    traceback: str | None = None


class JobDetail(JobSummary):
    args: dict[str, Any] = Field(description="Arguments, after the redaction hook.")
    result: Any = Field(description="The handler's return value, after the redaction hook.")
    progress: Any = Field(description="Last progress reported (a number or an object).")
    errors: list[AttemptError] = Field(description="Every failed attempt, oldest first.")
    timeout: float | None
    unique_key: str | None
    scheduled_for: datetime | None
    lease_expires_at: datetime | None
    cancel_requested: bool


class RetryOut(BaseModel):
    job_id: int = Field(description="The job that will run: the same id, or the copy's.")
    action: Literal["moved_from_dead_letter", "run_now", "copied"] = Field(
        description="Dead jobs move back (same id); waiting jobs become due now; finished jobs "
        "are re-enqueued as a copy with a new id."
    )


class ActionOut(BaseModel):
    ok: bool
    message: str
    count: int = Field(default=0, description="How many jobs the action touched.")


CleanState = Literal["completed", "cancelled", "dead"]


def _finished_states() -> list[CleanState]:
    return ["completed", "cancelled"]


class CleanIn(BaseModel):
    """Delete finished jobs older than a cut-off (by finished_at, or failed_at for dead ones)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    older_than_seconds: float = Field(ge=0, le=TEN_YEARS, allow_inf_nan=False)
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN, description="Default: all.")
    states: list[CleanState] = Field(default_factory=_finished_states, min_length=1, max_length=3)


class WorkerOut(BaseModel):
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    alive: bool = Field(description="Heartbeat younger than the admin's stale threshold.")
    running_jobs: int
    job_ids: list[int] = Field(description="Ids of the running jobs it holds (first 50).")


class WorkerList(BaseModel):
    workers: list[WorkerOut]


class ScheduleOut(BaseModel):
    name: str
    task: str
    args: dict[str, Any] = Field(description="Arguments, after the redaction hook.")
    queue: str | None
    cron: str | None
    every_seconds: float | None
    timezone: str
    paused: bool
    next_fire_at: datetime | None
    last_fire_at: datetime | None


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]


class LiveOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ok", "unavailable"]
    database: bool = Field(description="The database answered.")
    schema_revision: str | None = Field(description="The migration the schema is at.")
    head_revision: str = Field(description="The migration this pgqueue expects.")
    detail: str | None = None


class Breach(BaseModel):
    """A threshold crossed by a queue: what health/detailed reports and alerts send."""

    queue: str
    kind: Literal["backlog", "failures", "no_worker"]
    value: float | None = Field(description="The measured value (null: no worker ever seen).")
    threshold: float
    message: str


class QueueHealth(BaseModel):
    name: str
    backlog: int = Field(description="Jobs due now and not yet running.")
    oldest_waiting_seconds: float | None
    failures: int = Field(description="Failed attempts within the failures window.")
    failures_window_seconds: float
    worker_seen_seconds: float | None = Field(
        description="Seconds since a worker serving this queue last sent a heartbeat."
    )
    paused: bool


class DetailedHealthOut(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    queues: list[QueueHealth]
    breaches: list[Breach]
    live_workers: int


class AlertEvent(BaseModel):
    """The body of an alert webhook POST, and what an alert callback receives."""

    status: Literal["firing", "resolved"]
    queue: str
    kind: Literal["backlog", "failures", "no_worker"]
    value: float | None
    threshold: float
    message: str
    at: datetime
    source: str = "pgqueue-admin"


class AlertList(BaseModel):
    firing: list[Breach]
