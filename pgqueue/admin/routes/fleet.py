"""``/api/workers`` and ``/api/schedules``: who is working, and what fires on a timer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from pgqueue.admin import actions
from pgqueue.admin.context import AdminContext
from pgqueue.admin.routes.common import ERRORS, WRITE_ERRORS, action_errors
from pgqueue.admin.schemas import AlertList, ScheduleList, ScheduleOut, WorkerList

ScheduleName = Annotated[
    str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]+$", description="Schedule name")
]


def build(ctx: AdminContext) -> APIRouter:
    router = APIRouter(prefix="/api", dependencies=[ctx.read], route_class=ctx.route_class)

    @router.get("/workers", response_model=WorkerList, responses=ERRORS, tags=["workers"])
    def list_workers() -> WorkerList:
        """Registered workers, their heartbeat age and the running jobs each holds."""
        with ctx.connection() as conn:
            return ctx.reads.workers(conn, ctx.options.worker_stale_seconds)

    @router.get("/schedules", response_model=ScheduleList, responses=ERRORS, tags=["schedules"])
    def list_schedules() -> ScheduleList:
        """Recurring schedules with their next and last fire times."""
        with ctx.connection() as conn:
            return ctx.reads.schedules(conn, ctx.redact)

    def set_paused(name: str, paused: bool) -> ScheduleOut:
        with ctx.connection() as conn, action_errors():
            return actions.set_schedule_paused(ctx.queue, conn, name, paused=paused, redact=ctx.redact)

    @router.post(
        "/schedules/{name}/pause",
        response_model=ScheduleOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
        tags=["schedules"],
    )
    def pause_schedule(name: ScheduleName) -> ScheduleOut:
        """Schedulers skip a paused schedule's fire times until it is resumed."""
        return set_paused(name, True)

    @router.post(
        "/schedules/{name}/resume",
        response_model=ScheduleOut,
        responses=WRITE_ERRORS,
        dependencies=[ctx.write],
        tags=["schedules"],
    )
    def resume_schedule(name: ScheduleName) -> ScheduleOut:
        return set_paused(name, False)

    @router.get("/alerts", response_model=AlertList, responses=ERRORS, tags=["alerts"])
    def firing_alerts() -> AlertList:
        """What the alert loop found firing in its last round (empty when alerts are off)."""
        return AlertList(firing=ctx.monitor.firing if ctx.monitor is not None else [])

    return router
