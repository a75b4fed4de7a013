"""Run one claimed job's handler and decide what happens to the job next.

The decision (complete, retry with backoff, dead-letter, cancelled) is made here, from the
handler's outcome and the task's options; the worker only buffers it for acknowledgement.
"""

from __future__ import annotations

import asyncio
import functools
import json
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pgqueue.errors import UnknownTaskError
from pgqueue.retry import Abort, Retry
from pgqueue.tasks import CONTEXT_PARAMETER, Task
from pgqueue.worker.context import JobContext

OutcomeKind = Literal["completed", "retry", "dead", "cancelled", "requeue"]


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    queue: str
    task: str
    args: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    timeout: float | None
    run_at: datetime
    scheduled_for: datetime | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ClaimedJob:
        return cls(*row)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to write back for one attempt; ``error`` is the JSON entry appended to the job."""

    job: ClaimedJob
    kind: OutcomeKind
    result_json: str | None = None
    error_json: str | None = None
    delay: float = 0.0


class JobTimeout(Exception):
    """The handler ran past the job's timeout."""


class JobCancelled(Exception):
    """The job was cancelled while it ran."""


def error_entry(job: ClaimedJob, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ is not None else None
    return json.dumps(
        {
            "attempt": job.attempt,
            "at": datetime.now(UTC).isoformat(),
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": tb,
        }
    )


def decide(job: ClaimedJob, task: Task[Any] | None, exc: BaseException) -> Outcome:
    """Retry with backoff, retry when asked, or dead-letter (last attempt, Abort, abort_on types)."""
    error = error_entry(job, exc)
    final = (
        task is None
        or isinstance(exc, Abort | UnknownTaskError)
        or (task.options.abort_on and isinstance(exc, task.options.abort_on))
        or job.attempt >= job.max_attempts
    )
    if final:
        return Outcome(job, "dead", error_json=error)
    assert task is not None
    delay = exc.delay if isinstance(exc, Retry) else float(task.options.backoff(job.attempt))
    return Outcome(job, "retry", error_json=error, delay=max(0.0, delay))


def dump_result(value: Any) -> str:
    return json.dumps(value, allow_nan=False)


async def execute(
    job: ClaimedJob,
    task: Task[Any] | None,
    ctx: JobContext | None,
    cancelled: Callable[[], bool],
    threads: Executor,
) -> Outcome:
    """Run the handler under the job's timeout; never raises (every failure becomes an Outcome).

    ``ctx`` is built only for handlers that take one; ``cancelled`` tells a cancellation of the
    job apart from the worker shutting down.
    """
    try:
        if task is None:
            raise UnknownTaskError(f"no handler is registered for task {job.task!r} on this worker")
        kwargs: Mapping[str, Any] = {**job.args, CONTEXT_PARAMETER: ctx} if task.takes_context else job.args
        if task.is_async:
            result = await _run_async(task, kwargs, job.timeout)
        else:
            result = await _run_sync(task, kwargs, job.timeout, threads)
        if cancelled():
            raise JobCancelled("cancelled while running")
        try:
            return Outcome(job, "completed", result_json=None if result is None else dump_result(result))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"handler returned a result that is not JSON-serialisable: {exc}") from exc
    except asyncio.CancelledError:
        if cancelled():
            return Outcome(
                job,
                "cancelled",
                error_json=error_entry(job, JobCancelled("cancelled while running")),
            )
        raise  # the worker itself is shutting down: it decides what to do with the job
    except JobCancelled as exc:
        return Outcome(job, "cancelled", error_json=error_entry(job, exc))
    except Exception as exc:
        return decide(job, task, exc)


async def _run_async(task: Task[Any], kwargs: Mapping[str, Any], timeout: float | None) -> Any:
    try:
        return await asyncio.wait_for(task.fn(**kwargs), timeout)
    except TimeoutError as exc:
        raise JobTimeout(f"timed out after {timeout:g}s (handler cancelled)") from exc


async def _run_sync(
    task: Task[Any], kwargs: Mapping[str, Any], timeout: float | None, threads: Executor
) -> Any:
    future = asyncio.get_running_loop().run_in_executor(threads, functools.partial(task.fn, **kwargs))
    try:
        # A thread cannot be killed: on timeout the attempt fails and the thread is abandoned.
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError as exc:
        raise JobTimeout(f"timed out after {timeout:g}s (thread abandoned)") from exc
