"""What every admin route needs, built once per router: the queue, its read model, the guard,
the hook, options.

It also owns the one translation from database trouble to HTTP: an unreachable server or a
pool that cannot hand out a connection in time is a 503 with a sentence, a schema that was
never migrated says to run ``pgqueue migrate`` — never a bare 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from fastapi import HTTPException
from fastapi.routing import APIRoute
from psycopg_pool import PoolTimeout

from pgqueue._queue import Queue
from pgqueue.admin.alerts import AlertMonitor, AlertSettings
from pgqueue.admin.auth import Guard
from pgqueue.admin.readmodel import ReadModel
from pgqueue.admin.redaction import Redactor
from pgqueue.admin.settings import AdminOptions
from pgqueue.admin.shield import route_class
from pgqueue.errors import ConfigurationError, DatabaseUnavailableError, SchemaNotReadyError


@dataclass(slots=True)
class AdminContext:
    queue: Queue
    guard: Guard
    redact: Redactor
    options: AdminOptions
    alerts: AlertSettings
    monitor: AlertMonitor | None = None
    reads: ReadModel = field(init=False)
    """Every read a route makes; writes go through :mod:`pgqueue.admin.actions`."""
    read: Any = field(init=False)
    write: Any = field(init=False)
    route_class: type[APIRoute] = field(init=False)
    """Every admin router's ``route_class``: routes that refuse by headers before any body."""

    def __post_init__(self) -> None:
        self.reads = ReadModel(self.queue.queries)
        self.read = self.guard.read_dependency()
        self.write = self.guard.write_dependency()
        self.route_class = route_class(
            self.guard, read=self.read, write=self.write, max_body=self.options.max_body_bytes
        )

    @contextmanager
    def db_errors(self) -> Iterator[None]:
        try:
            yield
        except (psycopg.errors.UndefinedTable, SchemaNotReadyError) as exc:
            raise HTTPException(
                503, f"schema {self.queue.schema!r} is not migrated: run `pgqueue migrate`"
            ) from exc
        except (PoolTimeout, psycopg.OperationalError, DatabaseUnavailableError, ConfigurationError) as exc:
            raise HTTPException(503, f"database unavailable: {exc}".strip()) from exc

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A live pooled autocommit connection (stale ones replaced); 503 when there is none."""
        with (
            self.db_errors(),
            self.queue.connection(wait=self.options.db_timeout) as conn,
        ):
            yield conn
