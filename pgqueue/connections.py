"""Turn what a caller passes as ``conn=`` into the psycopg connection underneath it.

Enqueueing on the caller's own connection is what makes a job part of the caller's transaction:
rolled back with it, visible to workers only at its commit. psycopg 3 connections are used as they
are; SQLAlchemy 2 sessions and connections are unwrapped to their psycopg driver connection, inside
the transaction the session already has open (or begins).
"""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg

from pgqueue.errors import ConfigurationError

_SQLALCHEMY_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://")


def resolve_dsn(dsn: str | None) -> str:
    """The DSN given, else ``PGQUEUE_DSN``, else ``DATABASE_URL``; SQLAlchemy URLs are accepted."""
    value = dsn or os.environ.get("PGQUEUE_DSN") or os.environ.get("DATABASE_URL")
    if not value:
        raise ConfigurationError("no database given: pass dsn=..., or set PGQUEUE_DSN or DATABASE_URL")
    return _SQLALCHEMY_SCHEME.sub("postgresql://", value, count=1)


def _not_psycopg(driver_conn: object) -> ConfigurationError:
    return ConfigurationError(
        "pgqueue needs SQLAlchemy's psycopg 3 driver (postgresql+psycopg://), "
        f"this session uses {type(driver_conn).__module__}.{type(driver_conn).__name__}"
    )


def sync_connection(conn: Any) -> psycopg.Connection[Any]:
    """The psycopg connection behind ``conn`` (psycopg's, or a SQLAlchemy Session/Connection's)."""
    if isinstance(conn, psycopg.Connection):
        return conn
    try:
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        SAConnection = Session = None  # type: ignore[assignment,misc]
    if Session is not None and isinstance(conn, Session):
        conn = conn.connection()
    if SAConnection is not None and isinstance(conn, SAConnection):
        if not conn.in_transaction():
            # Statements run on the driver connection bypass SQLAlchemy's autobegin: begin
            # here, or the Connection's commit() would be a no-op and the job rolled back.
            conn.begin()
        driver_conn = conn.connection.driver_connection
        if not isinstance(driver_conn, psycopg.Connection):
            raise _not_psycopg(driver_conn)
        return driver_conn
    raise ConfigurationError(
        "conn= takes a psycopg Connection or a SQLAlchemy Session/Connection, "
        f"not {type(conn).__name__} (use AsyncQueue for async connections)"
    )


async def async_connection(conn: Any) -> psycopg.AsyncConnection[Any]:
    """The psycopg async connection behind ``conn``: psycopg's own, or a SQLAlchemy
    AsyncSession/AsyncConnection's."""
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    try:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    except ImportError:  # no greenlet, so no SQLAlchemy asyncio objects: conn is none of them
        raise _not_async(conn) from None

    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if isinstance(conn, AsyncConnection):
        if not conn.in_transaction():
            await conn.begin()  # as in sync_connection: SQLAlchemy must know a transaction is open
        raw = await conn.get_raw_connection()
        driver_conn = raw.driver_connection
        if not isinstance(driver_conn, psycopg.AsyncConnection):
            raise _not_psycopg(driver_conn)
        return driver_conn
    raise _not_async(conn)


def _not_async(conn: object) -> ConfigurationError:
    return ConfigurationError(
        "conn= takes a psycopg AsyncConnection or a SQLAlchemy AsyncSession/AsyncConnection, "
        f"not {type(conn).__name__} (use Queue for sync connections)"
    )
