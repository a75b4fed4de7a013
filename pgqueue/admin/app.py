"""Assemble the admin: a router an app mounts, or a standalone FastAPI app.

The router carries everything — dashboard at its root, JSON API under ``/api``, ``/health/*``,
``/metrics`` — and its own lifespan (the alert loop), which FastAPI merges into the app that
includes it. Credentials are required unless ``AdminAuth(insecure_no_auth=True)`` says otherwise.

Every route of the router refuses bad hosts, cross-site writes, missing credentials and
oversized bodies before its body is read (:mod:`pgqueue.admin.shield`); the standalone app adds
the host and origin checks around everything else it serves (the OpenAPI document, its docs
page, and the 404s).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

from pgqueue import __version__
from pgqueue._base import QueueBase
from pgqueue._queue import Queue
from pgqueue.admin import dashboard, health, metrics
from pgqueue.admin.alerts import AlertMonitor, AlertSettings
from pgqueue.admin.auth import AdminAuth, Guard
from pgqueue.admin.context import AdminContext
from pgqueue.admin.redaction import Redactor, default_redact
from pgqueue.admin.routes import dead, fleet, jobs, queues
from pgqueue.admin.settings import AdminOptions
from pgqueue.admin.shield import Shield
from pgqueue.errors import DatabaseUnavailableError


def sync_queue(queue: QueueBase[Any]) -> Queue:
    """The admin works through a sync :class:`Queue`; an AsyncQueue is mirrored by one."""
    if isinstance(queue, Queue):
        return queue
    return Queue.like(queue)


def create_admin_router(
    queue: QueueBase[Any],
    *,
    auth: AdminAuth | None = None,
    redact: Redactor = default_redact,
    alerts: AlertSettings | None = None,
    options: AdminOptions | None = None,
) -> APIRouter:
    """The whole admin as one router: ``app.include_router(router, prefix="/admin")``.

    ``auth`` defaults to :meth:`AdminAuth.from_env`, which refuses to build without
    credentials. ``redact`` sees every job's arguments, result, progress, errors and unique
    key before any view.
    """
    return _build_router(queue, auth=auth, redact=redact, alerts=alerts, options=options)[0]


def _build_router(
    queue: QueueBase[Any],
    *,
    auth: AdminAuth | None,
    redact: Redactor,
    alerts: AlertSettings | None,
    options: AdminOptions | None,
) -> tuple[APIRouter, AdminContext]:
    ctx = AdminContext(
        queue=sync_queue(queue),
        guard=Guard(auth if auth is not None else AdminAuth.from_env()),
        redact=redact,
        options=options or AdminOptions(),
        alerts=alerts or AlertSettings(),
    )
    if ctx.alerts.rules:
        ctx.monitor = AlertMonitor(
            ctx.queue,
            ctx.alerts,
            stale_seconds=ctx.options.worker_stale_seconds,
            db_timeout=ctx.options.db_timeout,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(ctx.monitor.run()) if ctx.monitor is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    router = APIRouter(lifespan=lifespan)
    for part in (dashboard, queues, jobs, dead, fleet, health, metrics):
        router.include_router(part.build(ctx))
    return router, ctx


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"database unavailable: {exc}"}, status_code=503)


def create_admin_app(
    queue: QueueBase[Any],
    *,
    auth: AdminAuth | None = None,
    redact: Redactor = default_redact,
    alerts: AlertSettings | None = None,
    options: AdminOptions | None = None,
    close_queue: bool = False,
    title: str = "pgqueue admin",
) -> FastAPI:
    """A standalone app: dashboard at ``/``, API under ``/api``, OpenAPI at ``/openapi.json``.

    ``close_queue`` closes the queue's pool at shutdown, for an app that made its own queue.
    """
    sync = sync_queue(queue)
    router, ctx = _build_router(sync, auth=auth, redact=redact, alerts=alerts, options=options)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_queue:
                await asyncio.to_thread(sync.close)

    app = FastAPI(
        title=title,
        version=__version__,
        description="Queues, jobs, dead letter, workers and schedules of a pgqueue database.",
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.include_router(router)
    app.add_middleware(Shield, guard=ctx.guard, max_body=None)  # routes enforce the size
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(DatabaseUnavailableError, _database_unavailable)
    app.add_exception_handler(psycopg.OperationalError, _database_unavailable)
    return app
