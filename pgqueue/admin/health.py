"""``/health/*`` for load balancers and orchestrators.

- ``live``: the process answers (no database call, so a database outage never restarts it);
- ``ready``: the database answers and the schema is at the migration this code expects;
- ``detailed``: per-queue backlog, failures, oldest job and worker heartbeat, judged by the
  alert rules — 503 when one is crossed, so an uptime checker can page on it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import psycopg
from fastapi import APIRouter, Response
from psycopg_pool import PoolTimeout

from pgqueue.admin.checks import evaluate, queue_health
from pgqueue.admin.context import AdminContext
from pgqueue.admin.routes.common import ERRORS
from pgqueue.admin.schemas import DetailedHealthOut, LiveOut, ReadyOut
from pgqueue.errors import ConfigurationError, DatabaseUnavailableError, PgQueueError, SchemaNotReadyError
from pgqueue.migrate import head_revision


@cache
def expected_revision() -> str:
    """The head migration, read once: the script directory does not change under a process."""
    return head_revision()


def build(ctx: AdminContext) -> APIRouter:
    router = APIRouter(prefix="/health", tags=["health"], route_class=ctx.route_class)

    @router.get("/live", response_model=LiveOut)
    async def live() -> LiveOut:
        """The process is up."""
        return LiveOut()

    @router.get("/ready", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
    def ready(response: Response) -> ReadyOut:
        """503 until the database answers and the schema is migrated to head."""
        head = expected_revision()
        revision: str | None = None
        detail: str | None = None
        database = True
        try:
            with ctx.queue.connection(wait=ctx.options.db_timeout) as conn:
                revision = ctx.reads.schema_version(conn)
        except (psycopg.errors.UndefinedTable, SchemaNotReadyError):
            detail = f"schema {ctx.queue.schema!r} is not migrated: run `pgqueue migrate`"
        except (PoolTimeout, psycopg.OperationalError, DatabaseUnavailableError, ConfigurationError) as exc:
            database, detail = False, f"database unavailable: {exc}"
        if database and revision is not None and revision != head:
            detail = f"schema is at {revision}, this pgqueue expects {head}: run `pgqueue migrate`"
        ok = database and revision == head
        if not ok:
            response.status_code = 503
        return ReadyOut(
            status="ok" if ok else "unavailable",
            database=database,
            schema_revision=revision,
            head_revision=head,
            detail=detail,
        )

    responses: dict[int | str, dict[str, Any]] = {
        **ERRORS,
        503: {"model": DetailedHealthOut, "description": "A threshold is crossed."},
    }

    @router.get(
        "/detailed",
        response_model=DetailedHealthOut,
        responses=responses,
        dependencies=[] if ctx.options.public_health else [ctx.read],
    )
    def detailed(response: Response) -> DetailedHealthOut:
        """Per queue: backlog, failures in the window, oldest waiting job, last worker
        heartbeat. 503 when an alert rule's threshold is crossed or the database is down."""
        rules = ctx.alerts.rules
        try:
            with ctx.queue.connection(wait=ctx.options.db_timeout) as conn:
                snap = ctx.reads.snapshot(conn, rules, ctx.options.worker_stale_seconds)
        except (PoolTimeout, psycopg.Error, PgQueueError):
            response.status_code = 503
            return DetailedHealthOut(status="unavailable", queues=[], breaches=[], live_workers=0)
        breaches = evaluate(snap, rules)
        if breaches:
            response.status_code = 503
        return DetailedHealthOut(
            status="degraded" if breaches else "ok",
            queues=queue_health(snap, rules),
            breaches=breaches,
            live_workers=snap.live_workers,
        )

    return router
