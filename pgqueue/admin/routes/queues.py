"""``/api/queues``: per-queue counts and timings; pause, resume, limits, retry of dead jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from pgqueue._base import KEEP, QueueSettings
from pgqueue.admin import actions
from pgqueue.admin.context import AdminContext
from pgqueue.admin.routes.common import ERRORS, WRITE_ERRORS
from pgqueue.admin.schemas import (
    QUEUE_PATTERN,
    ActionOut,
    QueueLimitsIn,
    QueueList,
    QueueSettingsOut,
    QueueStats,
)
from pgqueue.errors import InvalidQueueSettingsError

QueueName = Annotated[str, Path(pattern=QUEUE_PATTERN, description="A queue name.")]


def _settings_out(s: QueueSettings) -> QueueSettingsOut:
    return QueueSettingsOut(name=s.name, paused=s.paused, concurrency=s.concurrency, rate_limit=s.rate_limit)


def build(ctx: AdminContext) -> APIRouter:
    router = APIRouter(
        prefix="/api/queues", tags=["queues"], dependencies=[ctx.read], route_class=ctx.route_class
    )

    @router.get("", response_model=QueueList, responses=ERRORS)
    def list_queues() -> QueueList:
        """Every queue with jobs, dead jobs or settings: counts by state, throughput, timings."""
        with ctx.connection() as conn:
            return ctx.reads.queue_stats(conn, ctx.options)

    @router.get("/{name}", response_model=QueueStats, responses=ERRORS)
    def get_queue(name: QueueName) -> QueueStats:
        with ctx.connection() as conn:
            for q in ctx.reads.queue_stats(conn, ctx.options).queues:
                if q.name == name:
                    return q
        raise HTTPException(404, f"no queue named {name!r} has jobs or settings")

    @router.post(
        "/{name}/pause",
        response_model=QueueSettingsOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
    )
    def pause(name: QueueName) -> QueueSettingsOut:
        """Stop claims at once (running jobs finish). Works before the queue has any job."""
        with ctx.db_errors():
            return _settings_out(ctx.queue.pause(name))

    @router.post(
        "/{name}/resume",
        response_model=QueueSettingsOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
    )
    def resume(name: QueueName) -> QueueSettingsOut:
        with ctx.db_errors():
            return _settings_out(ctx.queue.resume(name))

    @router.patch(
        "/{name}/limits",
        response_model=QueueSettingsOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
    )
    def set_limits(name: QueueName, body: QueueLimitsIn) -> QueueSettingsOut:
        """Global concurrency and rate limit across all workers; null removes a limit."""
        sent = body.model_fields_set
        try:
            with ctx.db_errors():
                settings = ctx.queue.configure_queue(
                    name,
                    concurrency=body.concurrency if "concurrency" in sent else KEEP,
                    rate_limit=body.rate_limit if "rate_limit" in sent else KEEP,
                )
        except InvalidQueueSettingsError as exc:
            raise HTTPException(400, str(exc)) from exc
        return _settings_out(settings)

    @router.post(
        "/{name}/retry-dead",
        response_model=ActionOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
    )
    def retry_dead(name: QueueName) -> ActionOut:
        """Move every dead-lettered job of the queue back, with fresh attempts."""
        with ctx.connection() as conn:
            count = ctx.queue.retry_all_dead(name, conn=conn)
        return ActionOut(ok=True, message=f"{count} dead jobs re-queued on {name!r}", count=count)

    @router.post(
        "/{name}/retry-failed",
        response_model=ActionOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
    )
    def retry_failed(name: QueueName) -> ActionOut:
        """Jobs backing off after a failed attempt run now instead of after their delay."""
        with ctx.connection() as conn:
            count = actions.run_retrying(ctx.queue, conn, name)
        return ActionOut(ok=True, message=f"{count} retrying jobs of {name!r} due now", count=count)

    return router
