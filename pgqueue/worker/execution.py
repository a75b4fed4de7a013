"""Run one job's handler and decide what happens to the job next.

The decision (complete, retry with backoff, dead-letter, cancelled) is made here, from the
handler's outcome and the task's options; the worker only hands it to the completer. Nothing a
handler does escapes as an exception: a ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``)
raised by handler code is a failed attempt like any other, never the worker's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pgqueue._jsonb import decode_stored
from pgqueue._retry import DEFAULT_BACKOFF, Abort, Retry, valid_delay
from pgqueue._tasks import CONTEXT_PARAMETER, Task
from pgqueue.errors import (
    HandlerProcessDied,
    JobCancelled,
    JobTimeout,
    UndecodableArguments,
    UnknownTaskError,
    UnstorableResult,
)
from pgqueue.worker.context import JobContext
from pgqueue.worker.outcomes import dump_result, error_entry, exception_entry, to_jsonb
from pgqueue.worker.processes import ProcessOutcome, ProcessSlots

log = logging.getLogger("pgqueue.worker")
OutcomeKind = Literal["completed", "retry", "dead", "cancelled", "requeue", "release"]


@dataclass(slots=True)
class ClaimedJob:
    """A claimed job as the claim statement returned it, with the token of that claim.

    The fields up to ``started`` are the columns of the claim statements (``claim``,
    ``claim_limited``), by name; the claimer adds the token (:func:`pgqueue._rows.dataclass_row`).
    Mutable only for the executor, which records a prefetched job's start on it (a copy per
    job would cost more than the rest of the hot path).
    """

    id: int
    queue: str
    task: str
    args: dict[str, Any] | Undecodable
    priority: int
    attempt: int
    max_attempts: int
    timeout: float | None
    scheduled_for: datetime | None
    started: bool  # charged: started by the claim, or its start recorded / to be recorded
    token: UUID
    # When a prefetched job left the buffer (its start, written with the next flush).
    began_at: datetime | None = None


@dataclass(slots=True)
class Outcome:
    """What to write back for one claim; ``error_json`` is the entry appended to the job.

    ``charge`` is set by the completer when the job's start is recorded by this same write.
    """

    job: ClaimedJob
    kind: OutcomeKind
    result_json: str | None = None
    error_json: str | None = None
    delay: float = 0.0
    charge: int = 0


def decide(
    job: ClaimedJob, task: Task[Any] | None, error_json: str, *, final: bool, retry_in: float | None
) -> Outcome:
    """Retry with backoff (or when asked), or dead-letter when nothing is left to try."""
    if final or task is None or job.attempt >= job.max_attempts:
        return Outcome(job, "dead", error_json=error_json)
    if retry_in is None or not valid_delay(retry_in):  # Retry checks its wait; this is a guard
        retry_in = backoff_seconds(task, job.attempt)
    return Outcome(job, "retry", error_json=error_json, delay=retry_in)


def backoff_seconds(task: Task[Any], attempt: int) -> float:
    """The task's backoff after ``attempt``; the default one if it raises or returns what is not
    a wait (infinity, text). A backoff is user code: were its failure to escape here, the job
    would get no outcome and keep its slot, renewed and running, for good."""
    try:
        seconds = float(task.options.backoff(attempt))
        problem = None if valid_delay(seconds) else f"returned {seconds!r}"
    except BaseException as exc:  # user code, as a handler is: SystemExit & co included
        problem = f"raised {type(exc).__name__}: {exc}"
    if problem is None:
        return seconds
    log.error(
        "task %s: its backoff %s for attempt %d; retrying after the default backoff",
        task.name,
        problem,
        attempt,
    )
    return DEFAULT_BACKOFF(attempt)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in a claimed row for arguments the worker could not decode: the job then fails by
    name, alone. Raised from the driver's row loading, the error would fail the whole claim (the
    rows stay claimed, are rescued, claimed and fail again, the batch's other jobs with them)."""

    reason: str


def decode_args(data: bytes | str) -> Any:
    """The jsonb loader of worker connections: job arguments as stored, or :class:`Undecodable`.

    The server holds what Python's decoder refuses, which any client that writes jobs itself can
    store: JSON nested deeper than the decoder goes (RecursionError), an integer of more than
    4,300 digits (ValueError, Python's limit on converting text to int).
    """
    try:
        return decode_stored(data)
    except (RecursionError, ValueError) as exc:
        return Undecodable(f"{type(exc).__name__}: {exc}")


def decide_exception(job: ClaimedJob, task: Task[Any] | None, exc: BaseException) -> Outcome:
    """The outcome of an attempt that raised ``exc`` (Abort and ``abort_on`` types are final)."""
    final = isinstance(exc, Abort | UnknownTaskError | UndecodableArguments) or bool(
        task is not None and task.options.abort_on and isinstance(exc, task.options.abort_on)
    )
    retry_in = exc.delay if isinstance(exc, Retry) else None
    return decide(job, task, exception_entry(job.attempt, exc), final=final, retry_in=retry_in)


@dataclass(slots=True)
class Runners:
    """Where handlers run: the thread pool for sync handlers, the child processes if isolated."""

    threads: Executor
    processes: ProcessSlots | None
    # Told about a handler thread still running after its job got an outcome (timeout,
    # shutdown): it keeps its slot until it ends.
    on_abandoned: Callable[[asyncio.Future[Any]], None]
    default_isolation: str = "thread"

    def isolated(self, task: Task[Any]) -> bool:
        isolation = task.options.isolation or self.default_isolation
        return isolation == "process" and self.processes is not None


async def execute(
    job: ClaimedJob,
    task: Task[Any] | None,
    ctx: JobContext | None,
    cancel: asyncio.Event,
    runners: Runners,
    on_progress: Callable[[str], None],
) -> Outcome:
    """Run the handler under the job's timeout; never raises but for the worker's own shutdown.

    ``ctx`` is built only for handlers that take one; ``cancel`` is set when the job itself is
    cancelled, which tells a cancellation of the job apart from the worker shutting down.
    """
    try:
        if task is None:
            raise UnknownTaskError(f"no handler is registered for task {job.task!r} on this worker")
        args = job.args
        if isinstance(args, Undecodable):
            raise UndecodableArguments(f"the job's arguments as stored cannot be decoded ({args.reason})")
        if runners.isolated(task):
            return await _run_isolated(job, args, task, ctx, cancel, runners, on_progress)
        kwargs: Mapping[str, Any] = {**args, CONTEXT_PARAMETER: ctx} if task.takes_context else args
        if task.is_async:
            result = await _run_async(task, kwargs, job.timeout)
        else:
            result = await _run_sync(task, kwargs, job.timeout, runners)
        if cancel.is_set():
            raise JobCancelled("cancelled while running")
        return Outcome(job, "completed", result_json=dump_result(result))
    except asyncio.CancelledError:
        if cancel.is_set():
            return Outcome(
                job,
                "cancelled",
                error_json=exception_entry(job.attempt, JobCancelled("cancelled while running")),
            )
        raise  # the worker's shutdown, or the handler's own: the executor tells them apart
    except BaseException as exc:  # handler code may raise SystemExit & co: a failed attempt,
        # unless the job was cancelled: a handler that stops when told often says so by raising.
        if cancel.is_set() or isinstance(exc, JobCancelled):
            return Outcome(job, "cancelled", error_json=exception_entry(job.attempt, exc))
        return decide_exception(job, task, exc)


async def _run_async(task: Task[Any], kwargs: Mapping[str, Any], timeout: float | None) -> Any:
    if timeout is None:
        return await task.fn(**kwargs)
    began = time.monotonic()
    # asyncio.timeout (not wait_for) keeps the handler in this task, so a blocked loop can be
    # traced to the job that blocks it, and a SystemExit stays inside this coroutine.
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            result = await task.fn(**kwargs)
    except TimeoutError as exc:
        if deadline.expired():
            raise JobTimeout(f"timed out after {timeout:g}s (handler cancelled)") from exc
        raise
    elapsed = time.monotonic() - began
    if elapsed > timeout:  # it blocked the loop, so no cancel could land
        raise JobTimeout(f"ran {elapsed:.1f}s, past its timeout of {timeout:g}s, blocking the event loop")
    return result


async def _run_sync(
    task: Task[Any], kwargs: Mapping[str, Any], timeout: float | None, runners: Runners
) -> Any:
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()

    def call() -> Any:
        loop.call_soon_threadsafe(_resolve, started)
        try:
            return task.fn(**kwargs)
        except BaseException as exc:
            # Carried across the future wrapped: a GeneratorExit set on a future is thrown into
            # the awaiting coroutine, which closes the whole chain instead of raising in it.
            raise _Raised(exc) from None

    future = loop.run_in_executor(runners.threads, call)
    try:
        # The timeout counts from the handler's start, never while it waits for a thread.
        await asyncio.wait({started, future}, return_when=asyncio.FIRST_COMPLETED)
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except _Raised as raised:
        raise raised.original from None
    except TimeoutError as exc:
        if future.done():
            raise  # the handler itself raised TimeoutError
        runners.on_abandoned(future)
        raise JobTimeout(
            f"timed out after {timeout:g}s (thread abandoned; it keeps its slot until it ends)"
        ) from exc
    except asyncio.CancelledError:
        if not future.done():
            runners.on_abandoned(future)
        raise


class _Raised(Exception):
    """What a handler thread raised, in a wrapper any future can carry."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _run_isolated(
    job: ClaimedJob,
    args: dict[str, Any],
    task: Task[Any],
    ctx: JobContext | None,
    cancel: asyncio.Event,
    runners: Runners,
    on_progress: Callable[[str], None],
) -> Outcome:
    assert runners.processes is not None
    context = None
    if ctx is not None:
        context = {
            "job_id": ctx.job_id,
            "queue": ctx.queue,
            "task": ctx.task,
            "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts,
            "scheduled_for": ctx.scheduled_for,
            "worker_id": ctx.worker_id,
        }

    def progress(value: Any) -> None:
        # The child checked it; check again, what crosses a pipe is not trusted blindly.
        with contextlib.suppress(ValueError):
            on_progress(value if isinstance(value, str) else to_jsonb(value))

    out = await runners.processes.run(
        job.task, dict(args), timeout=job.timeout, context=context, on_progress=progress, cancel=cancel
    )
    return process_outcome(job, task, out)


def process_outcome(job: ClaimedJob, task: Task[Any], out: ProcessOutcome) -> Outcome:
    """Map what a child process reported to the job's outcome."""
    if out.kind == "ok":
        try:
            result = None if out.result_json is None else to_jsonb(json.loads(out.result_json))
        except ValueError as exc:
            return decide_exception(
                job, task, UnstorableResult(f"the handler's result cannot be stored: {exc}")
            )
        return Outcome(job, "completed", result_json=result)
    if out.kind == "cancelled":
        return Outcome(
            job, "cancelled", error_json=exception_entry(job.attempt, JobCancelled("cancelled while running"))
        )
    if out.kind == "timeout":
        timeout = JobTimeout(f"timed out after {job.timeout:g}s (process killed)")
        return decide_exception(job, task, timeout)
    if out.kind == "died":
        died = HandlerProcessDied(f"the handler's process exited with code {out.exitcode} before finishing")
        return decide_exception(job, task, died)
    name = out.error_type or "Exception"
    entry = error_entry(job.attempt, name, out.error_message or "", out.traceback)
    final = name in ("Abort", "UnknownTaskError") or any(t.__name__ == name for t in task.options.abort_on)
    return decide(job, task, entry, final=final, retry_in=out.retry_in)
