"""What the operator's buttons do to jobs: retry, cancel, delete, discard, clean.

Queue-level writes (pause, limits, retry of dead jobs) go through :class:`pgqueue.Queue`'s own
methods, so the admin changes state exactly the way the library and the CLI do. The rest are the
admin's named statements in ``admin.sql``. Outcomes a caller must tell apart (nothing there, the
wrong state) are exceptions the HTTP layer maps to 404 and 409.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgqueue.admin.redaction import Redactor, default_redact, no_redaction, redact_value
from pgqueue.admin.schemas import CleanIn, RetryOut
from pgqueue.admin.store import get_job
from pgqueue.queue import Queue

Conn = psycopg.Connection[Any]


class NotFound(LookupError):
    """No such job (or schedule)."""


class Conflict(RuntimeError):
    """The job exists but its state does not allow the action."""


def _notify_params(queue: Queue, job_id: int) -> dict[str, Any]:
    return {"id": job_id, "notify": queue.notify, "channel": queue.queries.channel}


def retry(queue: Queue, conn: Conn, job_id: int, *, redact: Redactor = default_redact) -> RetryOut:
    """Make a job run (again), whatever state it is in, except while it runs.

    - dead: moved back to its queue with fresh attempts, keeping its id and error history;
    - queued or delayed (e.g. backing off): due now;
    - completed or cancelled: a copy is enqueued with a new id, the original kept as history.

    ``redact`` applies to the unique key a refusal names, as it does wherever keys are shown.
    """
    job = get_job(conn, queue.queries, job_id, no_redaction)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    key = redact_value(redact, job.unique_key)
    if job.state == "dead":
        if not queue.retry_dead(job_id, conn=conn):
            raise Conflict(f"job {job_id} stays dead: a live job holds its unique key {key!r}")
        return RetryOut(job_id=job_id, action="moved_from_dead_letter")
    if job.state == "running":
        raise Conflict(f"job {job_id} is running; cancel it first or let it finish")
    if job.state in ("queued", "delayed"):
        if conn.execute(queue.queries.admin_run_now, _notify_params(queue, job_id)).fetchone():
            return RetryOut(job_id=job_id, action="run_now")
        raise Conflict(f"job {job_id} left the queue meanwhile; reload")
    row = conn.execute(queue.queries.admin_copy_job, _notify_params(queue, job_id)).fetchone()
    if row is None:
        raise Conflict(f"job {job_id} was not copied: a live job holds its unique key {key!r}")
    return RetryOut(job_id=int(row[0]), action="copied")


def run_retrying(queue: Queue, conn: Conn, name: str) -> int:
    """Make every job of the queue that is backing off after a failure due now."""
    params = {"queue": name, "notify": queue.notify, "channel": queue.queries.channel}
    row = conn.execute(queue.queries.admin_run_retrying, params).fetchone()
    return int(row[0]) if row else 0


def cancel(queue: Queue, conn: Conn, job_id: int) -> str:
    """Cancel a waiting job, or ask a running one to stop; finished jobs are a conflict."""
    job = get_job(conn, queue.queries, job_id, no_redaction)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    if not queue.cancel(job_id, conn=conn):
        raise Conflict(f"job {job_id} is {job.state}: only queued or running jobs can be cancelled")
    return "cancellation requested" if job.state == "running" else "cancelled"


def delete(queue: Queue, conn: Conn, job_id: int) -> None:
    """Remove a job row for good (live or dead-lettered); running jobs must be cancelled first."""
    row = conn.execute(queue.queries.admin_delete_job, {"id": job_id}).fetchone()
    if row is not None and int(row[0]) > 0:
        return
    job = get_job(conn, queue.queries, job_id, no_redaction)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    raise Conflict(f"job {job_id} is running; cancel it first")


def discard_dead(queue: Queue, conn: Conn, job_id: int) -> None:
    if conn.execute(queue.queries.admin_discard_dead, {"id": job_id}).fetchone() is None:
        raise NotFound(f"no dead-lettered job with id {job_id}")


def clean(queue: Queue, conn: Conn, request: CleanIn, batch: int) -> int:
    """Delete finished jobs older than the cut-off, in batches; returns how many went."""
    total = 0
    params: dict[str, Any] = {
        "queue": request.queue,
        "older_than": request.older_than_seconds,
        "limit": batch,
    }
    live_states = [s for s in request.states if s != "dead"]
    statements: list[tuple[str, dict[str, Any]]] = []
    if live_states:
        statements.append((queue.queries.admin_clean_finished, {**params, "states": live_states}))
    if "dead" in request.states:
        statements.append((queue.queries.admin_clean_dead, params))
    for statement, values in statements:
        while True:
            deleted = conn.execute(statement, values).rowcount
            total += max(deleted, 0)
            if deleted < batch:
                break
    return total
