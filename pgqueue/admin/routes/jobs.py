"""``/api/jobs``: list with filters and keyset pagination, detail, retry, cancel, delete, clean."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from pgqueue.admin import actions
from pgqueue.admin.context import AdminContext
from pgqueue.admin.readmodel import JobFilter
from pgqueue.admin.routes.common import ERRORS, WRITE_ERRORS, action_errors
from pgqueue.admin.schemas import (
    MAX_JOB_ID,
    QUEUE_PATTERN,
    TASK_PATTERN,
    ActionOut,
    CleanIn,
    JobDetail,
    JobPage,
    RetryOut,
    StateFilter,
)

JobId = Annotated[int, Path(ge=1, le=MAX_JOB_ID, description="A job id.")]


def aware(value: datetime | None) -> datetime | None:
    """Times without a zone are taken as UTC, as the dashboard shows them."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def build(ctx: AdminContext) -> APIRouter:
    router = APIRouter(
        prefix="/api/jobs", tags=["jobs"], dependencies=[ctx.read], route_class=ctx.route_class
    )

    @router.get("", response_model=JobPage, responses=ERRORS)
    def list_jobs(
        queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
        state: StateFilter | None = None,
        task: Annotated[str | None, Query(pattern=TASK_PATTERN)] = None,
        created_after: Annotated[datetime | None, Query(description="Inclusive; UTC if naive")] = None,
        created_before: Annotated[datetime | None, Query(description="Exclusive; UTC if naive")] = None,
        before_id: Annotated[
            int | None, Query(ge=1, le=MAX_JOB_ID, description="next_cursor of the last page")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> JobPage:
        """Live and dead-lettered jobs, newest first. Pages by id, so deep pages stay fast."""
        where = JobFilter(
            queue=queue,
            state=state,
            task=task,
            created_after=aware(created_after),
            created_before=aware(created_before),
        )
        with ctx.connection() as conn:
            return ctx.reads.list_jobs(conn, where, before_id=before_id, limit=limit, redact=ctx.redact)

    @router.post("/clean", response_model=ActionOut, responses=WRITE_ERRORS, dependencies=[ctx.write])
    def clean(body: CleanIn) -> ActionOut:
        """Delete finished jobs older than a cut-off: completed/cancelled by finished_at, dead
        ones by when they died."""
        with ctx.connection() as conn:
            count = actions.clean(ctx.queue, conn, body, ctx.options.clean_batch)
        return ActionOut(ok=True, message=f"{count} finished jobs deleted", count=count)

    @router.get("/{job_id}", response_model=JobDetail, responses=ERRORS)
    def get_job(job_id: JobId) -> JobDetail:
        """Arguments and result (redacted), progress, every attempt's error and traceback."""
        with ctx.connection() as conn:
            job = ctx.reads.get_job(conn, job_id, ctx.redact)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return job

    @router.post("/{job_id}/retry", response_model=RetryOut, responses=WRITE_ERRORS, dependencies=[ctx.write])
    def retry(job_id: JobId) -> RetryOut:
        """Run it (again): dead → back to its queue (same id); waiting → due now; completed or
        cancelled → a copy with a new id. A running job is a 409."""
        with ctx.connection() as conn, action_errors():
            return actions.retry(ctx.queue, conn, job_id, redact=ctx.redact)

    @router.post(
        "/{job_id}/cancel",
        response_model=ActionOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
    )
    def cancel(job_id: JobId) -> ActionOut:
        """A waiting job never runs; a running one is asked to stop (its handler sees it)."""
        with ctx.connection() as conn, action_errors():
            message = actions.cancel(ctx.queue, conn, job_id)
        return ActionOut(ok=True, message=f"job {job_id}: {message}", count=1)

    @router.delete("/{job_id}", response_model=ActionOut, responses=WRITE_ERRORS, dependencies=[ctx.write])
    def delete(job_id: JobId) -> ActionOut:
        """Remove the row for good, live or dead-lettered (not while it runs)."""
        with ctx.connection() as conn, action_errors():
            actions.delete(ctx.queue, conn, job_id)
        return ActionOut(ok=True, message=f"job {job_id} deleted", count=1)

    return router
