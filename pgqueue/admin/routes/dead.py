"""``/api/dead``: the dead-letter table — list, detail, retry (back to its queue), discard."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from pgqueue.admin import actions
from pgqueue.admin.context import AdminContext
from pgqueue.admin.readmodel import JobFilter
from pgqueue.admin.routes.common import ERRORS, WRITE_ERRORS, action_errors
from pgqueue.admin.routes.jobs import JobId
from pgqueue.admin.schemas import (
    MAX_JOB_ID,
    QUEUE_PATTERN,
    TASK_PATTERN,
    ActionOut,
    JobDetail,
    JobPage,
    RetryOut,
)


def build(ctx: AdminContext) -> APIRouter:
    router = APIRouter(
        prefix="/api/dead", tags=["dead letter"], dependencies=[ctx.read], route_class=ctx.route_class
    )

    @router.get("", response_model=JobPage, responses=ERRORS)
    def list_dead(
        queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
        task: Annotated[str | None, Query(pattern=TASK_PATTERN)] = None,
        before_id: Annotated[int | None, Query(ge=1, le=MAX_JOB_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> JobPage:
        """Dead-lettered jobs, newest first (finished_at is when they died)."""
        where = JobFilter(queue=queue, task=task, state="dead")
        with ctx.connection() as conn:
            return ctx.reads.list_jobs(conn, where, before_id=before_id, limit=limit, redact=ctx.redact)

    @router.get("/{job_id}", response_model=JobDetail, responses=ERRORS)
    def get_dead(job_id: JobId) -> JobDetail:
        with ctx.connection() as conn:
            job = ctx.reads.get_job(conn, job_id, ctx.redact)
        if job is None or job.state != "dead":
            raise HTTPException(404, f"no dead-lettered job with id {job_id}")
        return job

    @router.post("/{job_id}/retry", response_model=RetryOut, responses=WRITE_ERRORS, dependencies=[ctx.write])
    def retry_dead(job_id: JobId) -> RetryOut:
        """Back to its queue with fresh attempts, same id, error history kept."""
        with ctx.connection() as conn:
            job = ctx.reads.get_job(conn, job_id, ctx.redact)
            if job is None or job.state != "dead":
                raise HTTPException(404, f"no dead-lettered job with id {job_id}")
            with action_errors():
                return actions.retry(ctx.queue, conn, job_id, redact=ctx.redact)

    @router.delete("/{job_id}", response_model=ActionOut, responses=WRITE_ERRORS, dependencies=[ctx.write])
    def discard(job_id: JobId) -> ActionOut:
        """Drop a dead job for good."""
        with ctx.connection() as conn, action_errors():
            actions.discard_dead(ctx.queue, conn, job_id)
        return ActionOut(ok=True, message=f"dead job {job_id} discarded", count=1)

    return router
