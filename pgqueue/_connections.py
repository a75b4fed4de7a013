"""How pgqueue connects to PostgreSQL, and what a failure to connect means.

* Every connection pgqueue opens takes its keyword arguments from :func:`connection_kwargs`: it is
  named (``application_name``, so ``pg_stat_activity`` tells which process holds it), gives up on
  a host that does not answer within seconds, and can do without server-side prepared statements
  (PgBouncer in transaction mode).
* :func:`classify_connection_error` sorts failures into those that retrying can fix (server down,
  starting, restarting, out of connection slots: :class:`DatabaseUnavailableError`) and those it
  cannot (bad credentials, no such database or role, unparsable DSN, unknown host), so the second
  kind is reported at once with the server's own words instead of after a long wait.
* :func:`connect` / :func:`connect_async` open one connection that way, waiting a bounded time for
  a server that is only briefly away; :func:`connection_is_stale` spots, without a round trip, a
  pooled connection the server has already closed (a restart, ``pg_terminate_backend``).
* :func:`sync_connection` / :func:`async_connection` turn what a caller passes as ``conn=`` into the
  psycopg connection underneath it. Enqueueing on the caller's own connection is what makes a job
  part of the caller's transaction: rolled back with it, visible to workers only at its commit.
  psycopg 3 connections are used as they are; SQLAlchemy 2 sessions and connections are unwrapped
  to their psycopg driver connection, inside the transaction the session already has open (or
  begins).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import select
import socket
import time
from collections.abc import Iterator
from typing import Any, Literal, Self

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolClosed, PoolTimeout

from pgqueue.errors import (
    AuthenticationError,
    ConfigurationError,
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    PgQueueError,
    SchemaNotReadyError,
)

# Seconds libpq waits for one connection attempt: a blackholed host must not hold a call for the
# OS default of minutes, while a slow but live server still gets through.
DEFAULT_CONNECT_TIMEOUT = 5
# Seconds a call keeps retrying a server that refuses or is restarting before it gives up with
# DatabaseUnavailableError: long enough to ride out a restart, short enough that a request fails
# while its client still waits for an answer.
DEFAULT_CONNECT_WAIT = 5.0

_SQLALCHEMY_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://")


def resolve_dsn(dsn: str | None) -> str:
    """The DSN given, else ``PGQUEUE_DSN``, else ``DATABASE_URL``; SQLAlchemy URLs are accepted."""
    value = dsn
    if not value:  # only now read the environment: a DSN given in code needs nothing from it
        from pgqueue._settings import ClientEnv  # pydantic loads on first use, not at import

        env = ClientEnv.load(only=("dsn", "database_url"))
        value = env.dsn or env.database_url
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


def commits_alone(conn: Any) -> bool:
    """Whether a statement run on the caller's ``conn`` (None: on one of ours) commits as soon
    as it ends: an autocommit psycopg connection outside any transaction block. Anything else
    (a SQLAlchemy session, a transaction the caller opened) commits when the caller says."""
    if conn is None:
        return True
    return (
        isinstance(conn, psycopg.BaseConnection)
        and conn.autocommit
        and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
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


# ---------------------------------------------------------------------------- settings


def application_name(role: str) -> str:
    """``pgqueue-<role> <hostname>:<pid>``: which pgqueue process, on which host, holds a backend."""
    return f"pgqueue-{role} {socket.gethostname()}:{os.getpid()}"


def prepared_statements_enabled() -> bool:
    """False when ``PGQUEUE_PREPARED_STATEMENTS`` is off: PgBouncer in transaction mode hands each
    transaction another server connection, where a statement prepared on the last one is missing."""
    from pgqueue._settings import ClientEnv

    return ClientEnv.load(only=("prepared_statements",)).prepared_statements is not False


def connect_wait(value: float | None = None) -> float:
    """Seconds to keep retrying an unavailable server: the value given, else
    ``PGQUEUE_CONNECT_WAIT``, else :data:`DEFAULT_CONNECT_WAIT`."""
    if value is None:
        from pgqueue._settings import ClientEnv

        value = ClientEnv.load(only=("connect_wait",)).connect_wait
        if value is None:
            return DEFAULT_CONNECT_WAIT
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"connect_wait must be a number of seconds >= 0, got {value!r}")
    return float(value)


def connection_kwargs(
    role: str, *, dsn: str | None = None, prepared_statements: bool | None = None
) -> dict[str, Any]:
    """The psycopg connect keyword arguments of every connection pgqueue opens.

    ``role`` names the kind of process in ``application_name`` (``client``, ``cli``, ``migrate``,
    ``scheduler``, ``worker``…). What the environment (``PGAPPNAME``, ``PGCONNECT_TIMEOUT``) or,
    when given, the DSN already sets is left to them: an operator's choice wins over ours.
    ``prepared_statements`` defaults to :func:`prepared_statements_enabled`; when off, psycopg
    never prepares (``prepare_threshold=None``).
    """
    given = _dsn_parameters(dsn)
    kwargs: dict[str, Any] = {}
    if "PGAPPNAME" not in os.environ and "application_name" not in given:
        kwargs["application_name"] = application_name(role)
    if "PGCONNECT_TIMEOUT" not in os.environ and "connect_timeout" not in given:
        kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    if not (prepared_statements if prepared_statements is not None else prepared_statements_enabled()):
        kwargs["prepare_threshold"] = None
    return kwargs


def _dsn_parameters(dsn: str | None) -> dict[str, Any]:
    if not dsn:
        return {}
    try:
        return conninfo_to_dict(dsn)
    except psycopg.Error:
        return {}  # connecting reports it, classified


# ---------------------------------------------------------------------------- failures

# Connection-time failures carry no SQLSTATE in psycopg, only libpq's text (which quotes the
# server's FATAL message): these phrases sort them. Anything unrecognised counts as transient, so
# the worst a new message can cost is the bounded wait before it is reported.
_TRANSIENT_PHRASES = (
    "starting up",
    "shutting down",
    "in recovery",
    "not yet accepting connections",
    "too many clients",
    "too many connections",
    "connection slots are reserved",
    "temporary failure",
    "try again",
    "timeout expired",
    "timed out",
    "connection refused",
    "no such file or directory",
    "closed the connection",
    "connection reset",
    "could not receive data",
    "could not send data",
    "eof detected",
    "ssl syscall",
    "terminating connection",
    "no route to host",
    "network is unreachable",
    "out of memory",
)
_AUTHENTICATION_PHRASES = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "pg_hba.conf rejects",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "password is required",
)
_CONFIGURATION_PHRASES = (
    "does not exist",
    "failed to resolve host",
    "could not translate host name",
    "name or service not known",
    "nodename nor servname",
    "servname not supported",
    "no address associated",
    "ssl",
    "certificate",
    "invalid",
    "not currently accepting connections",
    "permission denied",
    "unsupported frontend protocol",
)
# SQLSTATEs of failures after a connection was made. Class 08: connection exceptions; 53:
# insufficient resources (too many connections, out of memory, disk full); 57P01-57P03, 57P05:
# administrator or crash shutdown, cannot connect now, idle-session timeout; 25006: a read-only
# transaction (a standby behind a moved address, a managed database locked read-only when its
# storage fills, default_transaction_read_only for maintenance); 40: serialization failure,
# deadlock.
_TRANSIENT_CLASSES = frozenset({"08", "53", "40"})
_TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03", "57P05", "25006"})
_AUTHENTICATION_STATES = frozenset({"28000", "28P01"})
_CONFIGURATION_STATES = frozenset({"3D000", "57P04", "42501"})
# A schema that is missing (3F000), lacks a table (42P01) or a column (42703): not migrated, or
# migrated by an older pgqueue.
_SCHEMA_STATES = frozenset({"3F000", "42P01", "42703"})


def describe(exc: BaseException) -> str:
    """The failure's text on one line: the server's primary message when there is one (without
    the statement excerpt psycopg appends), else libpq's, its hint lines folded in."""
    primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
    text = " ".join((primary or str(exc)).split())
    return text or type(exc).__name__


def classify_connection_error(exc: BaseException) -> PgQueueError:
    """The pgqueue error that says what a failure to connect (or a lost connection) means.

    :class:`DatabaseUnavailableError` for what retrying can fix: refused, unreachable, the
    server starting up, shutting down or out of connection slots, a connection cut by a restart or
    ``pg_terminate_backend``. :class:`AuthenticationError` for refused credentials;
    :class:`DatabaseConfigurationError` for a database or role that does not exist, an
    unparsable DSN, an unknown host, an SSL mismatch. A pgqueue error comes back as it is; any
    other exception as a plain :class:`PgQueueError` naming it (it is no connection failure: a
    caller normally re-raises it as it was).
    """
    if isinstance(exc, PgQueueError):
        return exc
    cause = describe(exc)
    if isinstance(exc, PoolTimeout | PoolClosed | TimeoutError):
        return DatabaseUnavailableError(f"no database connection: {cause}")
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is not None:
            if state in _AUTHENTICATION_STATES:
                return AuthenticationError(f"the database refused the credentials: {cause}")
            if state in _CONFIGURATION_STATES:
                return DatabaseConfigurationError(f"cannot use the database: {cause}")
            if state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES:
                return DatabaseUnavailableError(f"database unavailable: {cause}")
            return PgQueueError(f"database error: {cause}")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return _classify_text(exc, cause)
        # Without a SQLSTATE, a ProgrammingError at connect time is libpq refusing the DSN itself.
        return DatabaseConfigurationError(f"cannot use the DSN given: {cause}")
    if isinstance(exc, OSError):
        return DatabaseUnavailableError(f"database unavailable: {cause}")
    return PgQueueError(f"database error: {cause}")


def _classify_text(exc: BaseException, cause: str) -> PgQueueError:
    text = cause.lower()
    if any(phrase in text for phrase in _TRANSIENT_PHRASES):
        return DatabaseUnavailableError(f"database unavailable: {cause}")
    if any(phrase in text for phrase in _AUTHENTICATION_PHRASES):
        return AuthenticationError(f"the database refused the credentials: {cause}")
    if any(phrase in text for phrase in _CONFIGURATION_PHRASES):
        return DatabaseConfigurationError(f"cannot connect to the database: {cause}")
    return DatabaseUnavailableError(f"database unavailable: {cause}")


def is_transient(exc: BaseException) -> bool:
    """True for a failure that trying again later may fix (see :func:`classify_connection_error`)."""
    return isinstance(classify_connection_error(exc), DatabaseUnavailableError)


def schema_not_ready(exc: BaseException, schema: str) -> SchemaNotReadyError | None:
    """A :class:`SchemaNotReadyError` when ``exc`` says pgqueue's tables are missing or outdated."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate in _SCHEMA_STATES:
        return SchemaNotReadyError(
            f"schema {schema!r} is not migrated (or is older than this pgqueue): "
            f"run `pgqueue migrate` ({describe(exc)})"
        )
    return None


def connection_lost(exc: BaseException, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True when ``exc`` left ``conn`` unusable: the server closed it, or it was cut."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and (conn.closed or conn.broken)


def unavailable_after(waited: float, exc: BaseException) -> DatabaseUnavailableError:
    """The error of a bounded wait that ran out, naming the last cause."""
    return DatabaseUnavailableError(f"no database connection after {waited:.1f} s: {_cause_of(exc)}")


def _cause_of(exc: BaseException) -> str:
    text = describe(exc)
    for prefix in ("database unavailable: ", "no database connection: "):
        if isinstance(exc, PgQueueError) and text.startswith(prefix):
            return text[len(prefix) :]
    return text


# ---------------------------------------------------------------------------- stale connections

if hasattr(select, "poll"):

    def _readable(fd: int) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

else:  # pragma: no cover - Windows

    def _readable(fd: int) -> bool:
        return bool(select.select([fd], [], [], 0)[0])


def connection_is_stale(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True for an idle connection the server has given up, found without a round trip.

    An idle backend sends nothing unasked: when its socket has something to read, the server is
    saying goodbye (a restart's or ``pg_terminate_backend``'s FATAL, then end of file). Checking
    costs one ``poll`` system call, where ``SELECT 1`` would cost a round trip per checkout; it is
    what lets a statement that must not be repeated (an enqueue) go to a fresh connection instead
    of failing on a dead one.
    """
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK or pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return True
    try:
        return _readable(pgconn.socket)
    except (OSError, ValueError, psycopg.Error):
        return True


# ---------------------------------------------------------------------------- connecting


def retry_delays() -> Iterator[float]:
    """Pauses between attempts: 50 ms doubling to 1 s, with jitter so clients spread out."""
    delay = 0.05
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(1.0, delay * 2)


def _attempt_kwargs(kwargs: dict[str, Any], remaining: float) -> dict[str, Any]:
    """Cap libpq's per-attempt timeout by the time left (libpq counts at least 2 s)."""
    timeout = kwargs.get("connect_timeout")
    if timeout is None:
        return kwargs
    return {**kwargs, "connect_timeout": max(2, min(int(timeout), math.ceil(remaining)))}


def connect(
    dsn: str,
    role: str,
    *,
    wait: float | None = None,
    prepared_statements: bool | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """One connection, named for ``role``; transient failures are retried for ``wait`` seconds.

    Raises :class:`AuthenticationError` / :class:`DatabaseConfigurationError` at the first attempt
    that shows retrying cannot help, :class:`DatabaseUnavailableError` with the last cause when
    the wait runs out. ``kwargs`` go to psycopg (``autocommit=True``…).
    """
    budget = connect_wait(wait)
    started = time.monotonic()
    params = {**connection_kwargs(role, dsn=dsn, prepared_statements=prepared_statements), **kwargs}
    delays = retry_delays()
    while True:
        remaining = budget - (time.monotonic() - started)
        try:
            return psycopg.Connection.connect(dsn, **_attempt_kwargs(params, remaining))
        except psycopg.Error as exc:
            error = classify_connection_error(exc)
            if not isinstance(error, DatabaseUnavailableError):
                raise error from exc
            remaining = budget - (time.monotonic() - started)
            if remaining <= 0:
                raise unavailable_after(time.monotonic() - started, exc) from exc
            time.sleep(min(next(delays), remaining))


async def connect_async(
    dsn: str,
    role: str,
    *,
    wait: float | None = None,
    prepared_statements: bool | None = None,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """The asyncio twin of :func:`connect`."""
    budget = connect_wait(wait)
    started = time.monotonic()
    params = {**connection_kwargs(role, dsn=dsn, prepared_statements=prepared_statements), **kwargs}
    delays = retry_delays()
    while True:
        remaining = budget - (time.monotonic() - started)
        try:
            return await psycopg.AsyncConnection.connect(dsn, **_attempt_kwargs(params, remaining))
        except psycopg.Error as exc:
            error = classify_connection_error(exc)
            if not isinstance(error, DatabaseUnavailableError):
                raise error from exc
            remaining = budget - (time.monotonic() - started)
            if remaining <= 0:
                raise unavailable_after(time.monotonic() - started, exc) from exc
            await asyncio.sleep(min(next(delays), remaining))


# ---------------------------------------------------------------------------- pools


class ConnectHealth:
    """What a pool's latest connection attempt did, for a caller left waiting on the pool.

    psycopg_pool connects in background threads and only logs their failures; a caller waiting
    for a connection would learn nothing but a timeout. The pool's connection class reports each
    attempt here, so the caller can tell a busy pool (keep waiting) from a server that refuses
    (say why, and when retrying cannot help, say it at once).
    """

    def __init__(self) -> None:
        self._failure: BaseException | None = None
        self._failed_at = 0.0
        self._connected_at = 0.0

    def connected(self) -> None:
        self._connected_at = time.monotonic()

    def failed(self, exc: BaseException) -> None:
        self._failure, self._failed_at = exc, time.monotonic()

    def failure(self) -> BaseException | None:
        """The error of the latest attempt, if it failed (None once one succeeded after it)."""
        return self._failure if self._failed_at > self._connected_at else None


def observed_connection_class(health: ConnectHealth) -> type[psycopg.Connection[Any]]:
    """A psycopg connection class reporting every connection attempt to ``health``."""

    class ObservedConnection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            try:
                conn = super().connect(conninfo, **kwargs)
            except Exception as exc:
                health.failed(exc)
                raise
            health.connected()
            return conn

    ObservedConnection.__qualname__ = ObservedConnection.__name__
    return ObservedConnection


def observed_async_connection_class(health: ConnectHealth) -> type[psycopg.AsyncConnection[Any]]:
    """The asyncio twin of :func:`observed_connection_class`."""

    class ObservedAsyncConnection(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            try:
                conn = await super().connect(conninfo, **kwargs)
            except Exception as exc:
                health.failed(exc)
                raise
            health.connected()
            return conn

    ObservedAsyncConnection.__qualname__ = ObservedAsyncConnection.__name__
    return ObservedAsyncConnection


# Seconds a call waits for a connection while the server answers but every pooled connection is
# in use (a busy app, not an outage): psycopg_pool's own default.
POOL_WAIT = 30.0
# Seconds between looks at why the pool has not handed out a connection yet.
CHECKOUT_SLICE = 1.0
# How long a pool keeps reconnecting in the background when nobody waits on it.
RECONNECT_TIMEOUT = 60.0
# Seconds between two retirements of a pool's connections while the server refuses writes.
READ_ONLY_DRAIN_INTERVAL = 1.0

Retry = Literal["read", "transaction", "never"]
"""When a statement on a pooled connection may run again on a fresh one after the first was lost.

``read``: it changes nothing. ``transaction``: pgqueue runs it in a transaction of its own, and
the connection was lost before COMMIT went out, so nothing of it was kept. ``never``: it may
have taken effect (an autocommit write: the statement is its own commit). A connection the
server had closed before the statement was sent is replaced at checkout in every case
(:func:`connection_is_stale`).
"""


def pool_wait_verdict(
    health: ConnectHealth, waited: float, connect_wait: float, pool_size: int
) -> tuple[PgQueueError | None, BaseException | None]:
    """After ``waited`` seconds without a connection from the pool: keep waiting (None), or the
    error to raise and, when the server is the cause, the connection failure behind it."""
    failure = health.failure()
    if failure is None:
        if waited < POOL_WAIT:
            return None, None
        busy = f"all {pool_size} connections of the pool stayed in use for {waited:.0f} s"
        return DatabaseUnavailableError(busy), None
    error = classify_connection_error(failure)
    if isinstance(error, DatabaseUnavailableError):
        if waited < connect_wait:
            return None, None
        return unavailable_after(waited, failure), failure
    return error, failure


def translate_failure(
    exc: BaseException,
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    schema: str,
    *,
    unsure: bool,
) -> PgQueueError | None:
    """The pgqueue error a statement's failure stands for, or None to let it through as it is.

    ``unsure``: the statement may have taken effect before the connection went, which the
    message then says (the caller cannot know whether to repeat it).
    """
    not_ready = schema_not_ready(exc, schema)
    if not_ready is not None:
        return not_ready
    if connection_lost(exc, conn):
        note = " (the statement may or may not have taken effect)" if unsure else ""
        return DatabaseUnavailableError(f"lost the database connection: {describe(exc)}{note}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):  # refused whole: nothing was written
        return DatabaseUnavailableError(f"the database takes no writes now: {describe(exc)}")
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("53"):
        # Disk full, out of memory: the statement was refused whole, and a later try may pass.
        return DatabaseUnavailableError(f"the database is out of resources, nothing written: {describe(exc)}")
    return None
