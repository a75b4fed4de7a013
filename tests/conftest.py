"""Shared fixtures. The real PostgreSQL comes from the ``pgqueue.testing`` plugin (auto-loaded)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, create_engine

from pgqueue import AsyncQueue, Queue
from pgqueue.testing import count_rows

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# Fixture modules shared by several test files: the worker tests' app, database and processes
# (wapp, wdb, wprocs), and the admin tests' app, client and seeded data.
pytest_plugins = ["worker_helpers", "admin_support"]


@pytest.fixture
def queue(pgqueue_queue: Queue) -> Queue:
    """A sync queue on a freshly migrated schema of its own."""
    return pgqueue_queue


@pytest.fixture
def async_queue(pgqueue_async_queue: AsyncQueue) -> AsyncQueue:
    """An async queue on a freshly migrated schema of its own."""
    return pgqueue_async_queue


@pytest.fixture
def db(postgres_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for setting up and checking rows behind the queue's back."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def count(postgres_dsn: str, pgqueue_schema: str) -> Callable[..., int]:
    """``count()`` jobs, ``count("dead_letter")``, ``count("jobs", "queue = %s", ["x"])``."""

    def counter(table: str = "jobs", where: str = "true", params: Any = None) -> int:
        return count_rows(postgres_dsn, pgqueue_schema, table, where, params)

    return counter


@pytest.fixture
def new_schema(postgres_dsn: str) -> Iterator[str]:
    """A schema name nothing uses yet (not migrated); whatever is left of it is dropped after."""
    name = f"pgq_new_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def sa_engine(postgres_dsn: str) -> Iterator[Engine]:
    """SQLAlchemy on psycopg 3. The embedded server's DSN is a unix socket, hence the creator."""
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(postgres_dsn))
    yield engine
    engine.dispose()


@pytest.fixture
async def sa_async_engine(postgres_dsn: str) -> AsyncIterator[AsyncEngine]:
    # Imported here: SQLAlchemy's asyncio needs greenlet, which only these tests require.
    from sqlalchemy.ext.asyncio import create_async_engine

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(postgres_dsn)

    engine = create_async_engine("postgresql+psycopg://", async_creator=connect)
    yield engine
    await engine.dispose()
