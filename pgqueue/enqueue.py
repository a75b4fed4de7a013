"""What the sync and async queues share: turning calls into validated rows and query parameters.

The twins (:mod:`pgqueue.queue`, :mod:`pgqueue.aqueue`) only add the I/O around these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from pgqueue.errors import InvalidJobError
from pgqueue.jobs import JobRequest, build_request
from pgqueue.sql import Queries
from pgqueue.tasks import Registry, TaskOptions

COPY_TYPES = [
    "int8",
    "text",
    "text",
    "jsonb",
    "int2",
    "timestamptz",
    "int4",
    "float8",
    "timestamptz",
]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job for :meth:`Queue.enqueue_many`; unset options take the task's defaults."""

    task: str
    args: Mapping[str, Any] | None = None
    queue: str | None = None
    priority: int | None = None
    delay: timedelta | float | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    unique_key: str | None = None
    scheduled_for: datetime | None = None


_SPEC_FIELDS = frozenset(f.name for f in fields(JobSpec))


def as_spec(item: JobSpec | Mapping[str, Any]) -> JobSpec:
    if isinstance(item, JobSpec):
        return item
    if isinstance(item, Mapping):
        if not item.keys() <= _SPEC_FIELDS:
            unknown = set(item) - _SPEC_FIELDS
            raise InvalidJobError(f"unknown job fields {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}")
        if "task" not in item:
            raise InvalidJobError(f"job {dict(item)!r} has no 'task'")
        return JobSpec(**item)
    raise InvalidJobError(f"enqueue_many takes JobSpec objects or dicts, not {type(item).__name__}")


def make_request(registry: Registry, spec: JobSpec) -> JobRequest:
    """Validate one job against its task's signature and defaults (unknown tasks get defaults)."""
    task = registry.get(spec.task) if isinstance(spec.task, str) else None
    defaults = task.options if task is not None else TaskOptions()
    request = build_request(
        spec.task,
        spec.args,
        queue=spec.queue if spec.queue is not None else defaults.queue,
        priority=spec.priority if spec.priority is not None else defaults.priority,
        delay=spec.delay,
        run_at=spec.run_at,
        max_attempts=spec.max_attempts if spec.max_attempts is not None else defaults.max_attempts,
        timeout=spec.timeout if spec.timeout is not None else defaults.timeout,
        unique_key=spec.unique_key,
        scheduled_for=spec.scheduled_for,
    )
    if task is not None:
        task.check_args(request.args)
    return request


def make_requests(registry: Registry, jobs: Iterable[JobSpec | Mapping[str, Any]]) -> list[JobRequest]:
    """Validate every job before any is written: a bad one refuses the whole batch."""
    requests = []
    for index, item in enumerate(jobs):
        try:
            requests.append(make_request(registry, as_spec(item)))
        except InvalidJobError as exc:
            raise InvalidJobError(f"job #{index}: {exc}") from exc
    return requests


def enqueue_params(queries: Queries, request: JobRequest, notify: bool) -> dict[str, Any]:
    return {
        "queue": request.queue,
        "task": request.task,
        "args": request.args_json,
        "priority": request.priority,
        "run_at": request.run_at,
        "delay": request.delay_seconds,
        "max_attempts": request.max_attempts,
        "timeout": request.timeout,
        "unique_key": request.unique_key,
        "scheduled_for": request.scheduled_for,
        "notify": notify,
        "channel": queries.channel,
    }


def copy_rows(requests: Sequence[JobRequest], ids: Sequence[int], now: datetime) -> Iterable[tuple[Any, ...]]:
    """Rows for COPY; delays resolve against the transaction's clock, as single enqueues do."""
    for job_id, r in zip(ids, requests, strict=True):
        run_at = r.run_at if r.run_at is not None else now + timedelta(seconds=r.delay_seconds)
        yield (
            job_id,
            r.queue,
            r.task,
            r.args_json,
            r.priority,
            run_at,
            r.max_attempts,
            r.timeout,
            r.scheduled_for,
        )


def unique_params(requests: Sequence[JobRequest], ids: Sequence[int]) -> dict[str, Any]:
    return {
        "id": list(ids),
        "queue": [r.queue for r in requests],
        "task": [r.task for r in requests],
        "args": [r.args_json for r in requests],
        "priority": [r.priority for r in requests],
        "run_at": [r.run_at for r in requests],
        "delay": [r.delay_seconds for r in requests],
        "max_attempts": [r.max_attempts for r in requests],
        "timeout": [r.timeout for r in requests],
        "unique_key": [r.unique_key for r in requests],
        "scheduled_for": [r.scheduled_for for r in requests],
    }


def resolve_conflicts(
    requests: Sequence[JobRequest],
    reserved: Sequence[int],
    inserted: set[int],
    existing: Mapping[tuple[str, str], int],
) -> list[int]:
    """For each request, its new id, or the id of the live job that already holds its unique key."""
    result = []
    for job_id, r in zip(reserved, requests, strict=True):
        if job_id in inserted:
            result.append(job_id)
        else:
            assert r.unique_key is not None  # only keyed rows can conflict
            result.append(existing[(r.queue, r.unique_key)])
    return result


def distinct_queues(requests: Iterable[JobRequest]) -> list[str]:
    return sorted({r.queue for r in requests})
