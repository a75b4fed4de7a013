"""One reconnecting database connection per worker service.

Each service (claimer, completer, maintenance, …) owns its connection instead of borrowing from
a shared pool: a dead connection is replaced by the service that met it, on its next use, with
nothing to reopen, no pool-wide timeout to wait out and no service starved by another's burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads

from pgqueue._connections import connection_kwargs, prepared_statements_enabled
from pgqueue._timestamps import register_timestamp_loaders
from pgqueue.worker.execution import decode_args

log = logging.getLogger("pgqueue.worker")
Conn = psycopg.AsyncConnection[Any]


def reconnect_delay(failures: int) -> float:
    """Backoff between attempts to reach the database: 0.1 s doubling to 2 s.

    Capped low so a worker resumes within a couple of seconds of the database (or a promoted
    standby) becoming reachable again.
    """
    return float(min(2.0, 0.1 * 2 ** min(failures, 5)))


def connect_kwargs(role: str, dsn: str) -> dict[str, Any]:
    """Keyword arguments for every connection a worker opens (named, bounded connect time)."""
    return connection_kwargs(f"worker{'-' + role if role else ''}", dsn=dsn)


async def execute_together(
    conn: Conn, statements: list[tuple[str, dict[str, Any]]]
) -> list[psycopg.AsyncCursor[Any]]:
    """Run independent statements in one round trip (a pipeline), or one by one where libpq is
    older than 14 and cannot pipeline (psycopg without its binary package, an old system libpq).
    Returns their cursors, in order, to fetch from."""
    if not psycopg.AsyncPipeline.is_supported():
        return [await conn.execute(query, params) for query, params in statements]
    async with conn.pipeline():
        return [await conn.execute(query, params) for query, params in statements]


# Set on every worker connection that prepares statements: see ServiceConnection.
PLAN_AT_EVERY_RUN = "SET plan_cache_mode = force_custom_plan"

SLOW_ANSWER = 5.0  # seconds without an answer before a worker says it is waiting


@contextlib.contextmanager
def say_if_slow(what: str, seconds: float = SLOW_ANSWER) -> Iterator[None]:
    """Log once if the block takes longer than ``seconds``: a pooler in session mode with no free
    server connection, or a locked table, holds a statement silently; the log says so."""
    handle = asyncio.get_running_loop().call_later(
        seconds,
        log.warning,
        "%s: no answer from the database after %.0f s (a pooler with no free server connection, "
        "or a lock?); still waiting",
        what,
        seconds,
    )
    try:
        yield
    finally:
        handle.cancel()


class ServiceConnection:
    """A lazily opened autocommit connection that is dropped as soon as it fails.

    Where prepared statements are allowed (:attr:`prepare`), the services prepare theirs, and the
    connection has the server plan them at every run (``plan_cache_mode = force_custom_plan``):
    preparing saves the parse, while a plan the server would otherwise keep can be one made when
    ``jobs`` was a page or two. A queue table swings from empty to millions of rows, and such a
    plan finds the claimed rows again, and deletes finished ones, by reading the whole table at
    every run until autovacuum happens to invalidate it (263 ms a claim at 50,000 queued jobs; a
    worker at 90 % load fell behind for good). Where they are not allowed (a transaction pooler)
    nothing is prepared and every statement is planned at each run anyway. The lease keeper's
    connection, the one worker connection not opened here, does the same.
    """

    def __init__(self, dsn: str, role: str, *, on_read_only: Callable[[], None] | None = None) -> None:
        self.dsn = dsn
        self.role = role
        self._on_read_only = on_read_only  # a write was refused as read-only (a switchover?)
        self.prepare = prepared_statements_enabled()
        self._conn: Conn | None = None

    async def get(self) -> Conn:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = None
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, **connect_kwargs(self.role, self.dsn)
            )
            # A due job with run_at = '-infinity' (written by hand) must not jam the claim.
            register_timestamp_loaders(conn)
            set_json_loads(decode_args, conn)  # job arguments, at every claim
            if self.prepare:
                await conn.execute(PLAN_AT_EVERY_RUN)
            self._conn = conn
        return conn

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Conn]:
        """The connection; on a connection-level failure it is discarded and the error re-raised.

        A use that gets no answer for a while says so (a pooler with no free server connection
        holds a statement silently, and a worker that cannot renew its leases must not be quiet).
        """
        with say_if_slow(f"worker {self.role or 'claim'} connection"):
            conn = await self.get()
            try:
                yield conn
            except (
                psycopg.OperationalError,
                psycopg.InterfaceError,
                psycopg.errors.ReadOnlySqlTransaction,
            ) as exc:
                # Read-only: the next connection may reach the primary (a multi-host DSN with
                # target_session_attrs=read-write, an address moved to the promoted standby).
                await self.discard()
                if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction) and self._on_read_only is not None:
                    self._on_read_only()
                raise

    async def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        await self.discard()
