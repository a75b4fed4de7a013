"""What the operator's buttons do: retry, cancel, delete, discard and clean jobs; pause schedules.

Writes the client has a method for (cancel, retry of dead jobs, pause and limits of a queue,
pause of a schedule) go through :class:`pgqueue.Queue`, so the admin changes state exactly the
way the library and the CLI do. The others (run now, copy a finished job, delete, clean) are
the shared statements of ``jobs.sql`` and ``maintenance.sql``, the clean being the pruner's own
deletes with the operator's cut-off. Each decision reads the job through the admin's
:class:`~pgqueue.admin.readmodel.ReadModel`. Outcomes a caller must tell apart (nothing there,
the wrong state) are exceptions the HTTP layer maps to 404 and 409.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgqueue._jobs import JobRow
from pgqueue._queue import Queue
from pgqueue.admin.readmodel import ReadModel
from pgqueue.admin.redaction import Redactor, default_redact, redact_value
from pgqueue.admin.schemas import CleanIn, RetryOut, ScheduleOut
from pgqueue.errors import ConflictError, JobNotFoundError, ScheduleNotFoundError

Conn = psycopg.Connection[Any]


def _notify_params(queue: Queue, job_id: int) -> dict[str, Any]:
    return {"id": job_id, "notify": queue.notify, "channel": queue.queries.channel}


def _job(queue: Queue, conn: Conn, job_id: int) -> JobRow:
    row = ReadModel(queue.queries).job_row(conn, job_id)
    if row is None:
        raise JobNotFoundError(f"no job with id {job_id}")
    return row


def retry(queue: Queue, conn: Conn, job_id: int, *, redact: Redactor = default_redact) -> RetryOut:
    """Make a job run (again), whatever state it is in, except while it runs.

    - dead: moved back to its queue with fresh attempts, keeping its id and error history;
    - queued or delayed (e.g. backing off): due now;
    - completed or cancelled: a copy is enqueued with a new id, the original kept as history.

    ``redact`` applies to the unique key a refusal names, as it does wherever keys are shown.
    """
    job = _job(queue, conn, job_id)
    key = redact_value(redact, job.unique_key)
    if job.state == "dead":
        if not queue.retry_dead(job_id, conn=conn):
            raise ConflictError(f"job {job_id} stays dead: a live job holds its unique key {key!r}")
        return RetryOut(job_id=job_id, action="moved_from_dead_letter")
    if job.state == "running":
        raise ConflictError(f"job {job_id} is running; cancel it first or let it finish")
    if job.state == "queued":
        if conn.execute(queue.queries.run_now, _notify_params(queue, job_id)).fetchone():
            return RetryOut(job_id=job_id, action="run_now")
        raise ConflictError(f"job {job_id} left the queue meanwhile; reload")
    row = conn.execute(queue.queries.copy_finished_job, _notify_params(queue, job_id)).fetchone()
    if row is None:
        raise ConflictError(f"job {job_id} was not copied: a live job holds its unique key {key!r}")
    return RetryOut(job_id=int(row[0]), action="copied")


def run_retrying(queue: Queue, conn: Conn, name: str) -> int:
    """Make every job of the queue that is backing off after a failure due now."""
    params = {"queue": name, "notify": queue.notify, "channel": queue.queries.channel}
    row = conn.execute(queue.queries.run_retrying, params).fetchone()
    return int(row[0]) if row else 0


def cancel(queue: Queue, conn: Conn, job_id: int) -> str:
    """Cancel a waiting job, or ask a running one to stop; finished jobs are a conflict."""
    job = _job(queue, conn, job_id)
    if not queue.cancel(job_id, conn=conn):
        state = "delayed" if job.delayed else job.state
        raise ConflictError(f"job {job_id} is {state}: only queued or running jobs can be cancelled")
    return "cancellation requested" if job.state == "running" else "cancelled"


def _delete(queue: Queue, conn: Conn, job_id: int, *, live: bool) -> int:
    row = conn.execute(queue.queries.delete_job, {"id": job_id, "live": live}).fetchone()
    return int(row[0]) if row else 0


def delete(queue: Queue, conn: Conn, job_id: int) -> None:
    """Remove a job row for good (queued, finished or dead-lettered); running jobs must be cancelled
    first."""
    if _delete(queue, conn, job_id, live=True) > 0:
        return
    _job(queue, conn, job_id)  # raises when there is no such job
    raise ConflictError(f"job {job_id} is running; cancel it first")


def discard_dead(queue: Queue, conn: Conn, job_id: int) -> None:
    """Remove a dead-lettered job for good; a live job of that id is not touched."""
    if _delete(queue, conn, job_id, live=False) == 0:
        raise JobNotFoundError(f"no dead-lettered job with id {job_id}")


def clean(queue: Queue, conn: Conn, request: CleanIn, batch: int) -> int:
    """Delete finished jobs older than the cut-off, in batches; returns how many went.

    The pruner's deletes with the operator's cut-off in place of each queue's retention.
    """
    total = 0
    params: dict[str, Any] = {
        "queue": request.queue,
        "older_than": request.older_than_seconds,
        "queue_retention": False,
        "limit": batch,
    }
    live_states = [s for s in request.states if s != "dead"]
    statements: list[tuple[str, dict[str, Any]]] = []
    if live_states:
        statements.append((queue.queries.delete_finished_jobs, {**params, "states": live_states}))
    if "dead" in request.states:
        statements.append((queue.queries.delete_dead_jobs, params))
    for statement, values in statements:
        while True:
            deleted = conn.execute(statement, values).rowcount
            total += max(deleted, 0)
            if deleted < batch:
                break
    return total


def set_schedule_paused(
    queue: Queue, conn: Conn, name: str, *, paused: bool, redact: Redactor
) -> ScheduleOut:
    """Pause or resume a schedule through the client, then show it as it is now."""
    if paused:
        queue.pause_schedule(name)
    else:
        queue.resume_schedule(name)
    schedule = ReadModel(queue.queries).schedule(conn, name, redact)
    if schedule is None:  # removed in between
        raise ScheduleNotFoundError(f"no schedule named {name!r}")
    return schedule
