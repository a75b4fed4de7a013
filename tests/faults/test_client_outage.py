"""The client side against a PostgreSQL that goes away, restarts, refuses, or was never migrated.

``Queue``/``AsyncQueue``, the CLI, ``migrate`` and the scheduler must start and recover by
themselves, and say why when they cannot: a failure retrying cannot fix is named within 2 s with
the server's message, a transient one is retried for a bounded wait. Most tests run a server of
their own (``pgserver.py``) so they can stop and restart it; the backend-kill storm and the
unmigrated-schema tests use the session's server.

Run with ``-s`` to see the measured recovery times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgserver import SUPERUSER, PgServer, free_port, temporary_server
from psycopg import sql
from worker_helpers import PgqueueProcess as Proc
from worker_helpers import wait_until

from pgqueue import AsyncQueue, DatabaseUnavailableError, JobSpec, Queue, SchemaNotReadyError
from pgqueue._connections import (
    DEFAULT_CONNECT_WAIT,
    application_name,
    classify_connection_error,
    connection_kwargs,
    is_transient,
    prepared_statements_enabled,
)
from pgqueue._enqueue import make_request
from pgqueue.errors import AuthenticationError, ConfigurationError, DatabaseConfigurationError
from pgqueue.migrate import upgrade

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCHEMA = "outage"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a pgqueue subprocess: none of ours, no PGAPPNAME (so it names itself)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGQUEUE_") and k not in ("PGAPPNAME", "NOTIFY_SOCKET")
    }
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgqueue", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _no_appname(monkeypatch: pytest.MonkeyPatch) -> None:
    """pgqueue's own names are what these tests look at (PGAPPNAME would override them)."""
    for name in ("PGAPPNAME", "PGQUEUE_CONNECT_WAIT", "PGQUEUE_PREPARED_STATEMENTS", "PGCONNECT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def migrated() -> Iterator[PgServer]:
    """A server of the test's own with pgqueue migrated (schema ``outage``)."""
    with temporary_server() as server:
        upgrade(server.dsn(), schema=SCHEMA)
        yield server


@pytest.fixture
def down() -> Iterator[PgServer]:
    """The same, stopped: its socket is gone until ``start()``."""
    with temporary_server() as server:
        upgrade(server.dsn(), schema=SCHEMA)
        server.stop()
        yield server


@pytest.fixture(scope="module")
def auth_server() -> Iterator[PgServer]:
    """A server with a role that must give a password (scram over TCP), for the refusal tests."""
    with temporary_server() as server:
        server.execute("CREATE ROLE app_pw LOGIN PASSWORD 'right-password'")
        server.prepend_hba("host all app_pw 127.0.0.1/32 scram-sha-256")
        yield server


def backends_of(server: PgServer, where: str, params: Any = None) -> list[tuple[Any, ...]]:
    return server.execute(f"SELECT pid FROM pg_stat_activity WHERE {where}", params)


def start_later(server: PgServer, delay: float) -> tuple[threading.Thread, dict[str, float]]:
    """Start ``server`` after ``delay`` s in a thread; ``when["up"]`` is when it accepts connections."""
    when: dict[str, float] = {}

    def start() -> None:
        time.sleep(delay)
        server.start()
        when["up"] = time.monotonic()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread, when


# ---------------------------------------------------------------------------- connection settings


def test_connection_kwargs_name_the_process_and_bound_each_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = connection_kwargs("scheduler")
    assert kwargs == {
        "application_name": f"pgqueue-scheduler {socket.gethostname()}:{os.getpid()}",
        "connect_timeout": 5,
    }
    assert application_name("cli") == f"pgqueue-cli {socket.gethostname()}:{os.getpid()}"
    # What the operator set wins: the environment, or the DSN itself.
    assert "application_name" not in connection_kwargs("x", dsn="postgresql://h/db?application_name=mine")
    assert "connect_timeout" not in connection_kwargs("x", dsn="host=h connect_timeout=30")
    monkeypatch.setenv("PGAPPNAME", "found-by-tests")
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "9")
    assert connection_kwargs("worker") == {}


def test_prepared_statements_can_be_turned_off_for_pgbouncer(
    monkeypatch: pytest.MonkeyPatch, migrated: PgServer
) -> None:
    assert prepared_statements_enabled()
    assert "prepare_threshold" not in connection_kwargs("client")
    assert connection_kwargs("client", prepared_statements=False)["prepare_threshold"] is None
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "off")
    assert not prepared_statements_enabled()
    assert connection_kwargs("worker")["prepare_threshold"] is None
    assert "prepare_threshold" not in connection_kwargs("worker", prepared_statements=True)
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "sometimes")
    with pytest.raises(ConfigurationError, match="PGQUEUE_PREPARED_STATEMENTS"):
        prepared_statements_enabled()
    monkeypatch.delenv("PGQUEUE_PREPARED_STATEMENTS")

    with Queue(migrated.dsn(), schema=SCHEMA, prepared_statements=False) as queue:
        for _ in range(10):  # more than psycopg's threshold of 5: it would prepare by now
            queue.enqueue("t")
        with queue.connection() as conn:
            assert conn.prepare_threshold is None
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    with Queue(migrated.dsn(), schema=SCHEMA) as queue, queue.connection() as conn:
        assert conn.prepare_threshold == 5


def test_connect_wait_defaults_to_a_few_seconds_and_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_CONNECT_WAIT == 5.0
    assert Queue("postgresql://h/db").connect_wait == 5.0
    assert Queue("postgresql://h/db", connect_wait=0.5).connect_wait == 0.5
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", "12")
    assert AsyncQueue("postgresql://h/db").connect_wait == 12.0
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", "soon")
    with pytest.raises(ConfigurationError, match="PGQUEUE_CONNECT_WAIT"):
        Queue("postgresql://h/db")
    with pytest.raises(ConfigurationError, match="connect_wait"):
        Queue("postgresql://h/db", connect_wait=-1)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ('connection to server at "h", port 5432 failed: Connection refused', DatabaseUnavailableError),
        ('connection to server on socket "/s" failed: No such file or directory', DatabaseUnavailableError),
        ("failed: FATAL:  the database system is starting up", DatabaseUnavailableError),
        ("failed: FATAL:  the database system is shutting down", DatabaseUnavailableError),
        ("failed: FATAL:  sorry, too many clients already", DatabaseUnavailableError),
        ("failed: FATAL:  remaining connection slots are reserved for superuser", DatabaseUnavailableError),
        (
            "failed to resolve host 'db': [Errno -3] Temporary failure in name resolution",
            DatabaseUnavailableError,
        ),
        ("connection timeout expired", DatabaseUnavailableError),
        ("consuming input failed: server closed the connection unexpectedly", DatabaseUnavailableError),
        ('failed: FATAL:  password authentication failed for user "u"', AuthenticationError),
        ("failed: fe_sendauth: no password supplied", AuthenticationError),
        ('failed: FATAL:  pg_hba.conf rejects connection for host "h", user "u"', AuthenticationError),
        ('failed: FATAL:  database "nope" does not exist', DatabaseConfigurationError),
        ('failed: FATAL:  role "nope" does not exist', DatabaseConfigurationError),
        ("failed to resolve host 'nope': [Errno -2] Name or service not known", DatabaseConfigurationError),
        ("failed: server does not support SSL, but SSL was required", DatabaseConfigurationError),
        ("something nobody has seen yet", DatabaseUnavailableError),  # unknown: bounded retry
    ],
)
def test_connection_failures_are_sorted_by_what_retrying_can_fix(message: str, kind: type[Exception]) -> None:
    error = classify_connection_error(psycopg.OperationalError(message))
    assert type(error) is kind
    assert " ".join(message.split()) in str(error)
    assert is_transient(psycopg.OperationalError(message)) == (kind is DatabaseUnavailableError)


def test_failures_after_connecting_are_sorted_by_sqlstate() -> None:
    assert type(classify_connection_error(psycopg.errors.AdminShutdown("x"))) is DatabaseUnavailableError
    assert type(classify_connection_error(psycopg.errors.CannotConnectNow("x"))) is DatabaseUnavailableError
    assert type(classify_connection_error(psycopg.errors.TooManyConnections("x"))) is DatabaseUnavailableError
    assert type(classify_connection_error(psycopg.errors.InvalidPassword("x"))) is AuthenticationError
    assert (
        type(classify_connection_error(psycopg.errors.InvalidCatalogName("x"))) is DatabaseConfigurationError
    )
    assert (
        type(classify_connection_error(psycopg.ProgrammingError('missing "="'))) is DatabaseConfigurationError
    )
    read_only = psycopg.errors.ReadOnlySqlTransaction("x")
    assert type(classify_connection_error(read_only)) is DatabaseUnavailableError
    assert not is_transient(psycopg.errors.UniqueViolation("x"))


# ---------------------------------------------------------------------------- started while down


def test_sync_queue_started_while_the_server_is_down_works_once_it_is_up(down: PgServer) -> None:
    queue = Queue(down.dsn(), schema=SCHEMA, connect_wait=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match=r"after 1\.0 s: .*No such file or directory"):
            queue.enqueue("t")
        assert time.monotonic() - started < 3
        assert queue._pool is None, "a failed queue left a pool reconnecting in the background"

        # Calls keep failing fast while it is down, then work within seconds of it starting.
        thread, when = start_later(down, 1.0)
        first_ok = None
        while first_ok is None:
            with contextlib.suppress(DatabaseUnavailableError):
                queue.enqueue("t")
                first_ok = time.monotonic()
            assert time.monotonic() - started < 30, "never recovered"
        thread.join(30)
        recovered = first_ok - when["up"]
        print(f"\nsync Queue: first enqueue {recovered:.2f} s after the server accepted connections")
        assert recovered < 3
        assert queue.get_job(queue.enqueue("t")).task == "t"
    finally:
        queue.close()


def test_a_call_waiting_for_the_server_succeeds_when_it_comes_up(down: PgServer) -> None:
    with Queue(down.dsn(), schema=SCHEMA, connect_wait=20) as queue:
        thread, when = start_later(down, 1.5)
        job_id = queue.enqueue("t")  # waits through the outage instead of failing
        done = time.monotonic()
        thread.join(30)
        print(f"\nwaiting enqueue returned {done - when['up']:.2f} s after the server came up")
        assert done - when["up"] < 2.5
        assert queue.get_job(job_id).task == "t"


async def test_async_queue_started_while_the_server_is_down_works_once_it_is_up(down: PgServer) -> None:
    queue = AsyncQueue(down.dsn(), schema=SCHEMA, connect_wait=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match=r"after 1\.0 s"):
            await queue.enqueue("t")
        assert time.monotonic() - started < 3
        assert queue._pool is None

        thread, when = start_later(down, 1.0)
        first_ok = None
        while first_ok is None:
            with contextlib.suppress(DatabaseUnavailableError):
                await queue.enqueue("t")
                first_ok = time.monotonic()
            assert time.monotonic() - started < 30, "never recovered"
        await asyncio.to_thread(thread.join, 30)
        recovered = first_ok - when["up"]
        print(f"\nAsyncQueue: first enqueue {recovered:.2f} s after the server accepted connections")
        assert recovered < 3
        assert (await queue.get_job(await queue.enqueue("t"))).task == "t"
    finally:
        await queue.close()


# ---------------------------------------------------------------------------- restarts and kills


def grow_pool(queue: Queue, size: int) -> set[int]:
    """Have ``size`` pooled connections open at once; returns their backend pids."""
    pids: set[int] = set()
    barrier = threading.Barrier(size)

    def hold() -> None:
        with queue.connection() as conn:
            pids.add(conn.info.backend_pid)
            barrier.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(pids) == size
    return pids


def test_a_read_only_database_refuses_writes_by_name_and_serves_them_again_after(migrated: PgServer) -> None:
    with Queue(migrated.dsn(), schema=SCHEMA) as queue:
        job_id = queue.enqueue("t")
        migrated.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        migrated.reload()
        wait_until(lambda: _refuses_writes(queue), 10, "never read-only")
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match=r"takes no writes now: .*read-only transaction"):
            queue.enqueue_many([{"task": "t"}, {"task": "t"}])
        assert time.monotonic() - started < 2.0
        assert queue.get_job(job_id).state == "queued"  # reads still work
        migrated.execute("ALTER SYSTEM RESET default_transaction_read_only")
        migrated.reload()
        wait_until(lambda: not _refuses_writes(queue), 10, "still read-only")
        assert queue.enqueue("t") > job_id
        assert migrated.execute(f"SELECT count(*) FROM {SCHEMA}.jobs")[0][0] == 2  # none of the refused


class Switchover:
    """Two migrated servers behind one multi-host DSN with ``target_session_attrs=read-write``:
    the old primary first (where a queue's pool connects), the new one second."""

    def __init__(self, old: PgServer, new: PgServer) -> None:
        self.old, self.new = old, new
        self.dsn = (
            f"postgresql://{SUPERUSER}@127.0.0.1:{old.port},127.0.0.1:{new.port}/postgres"
            "?target_session_attrs=read-write"
        )

    def demote_old(self) -> None:
        """The old primary refuses writes from now on, on the sessions it already has too."""
        self.old.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        self.old.reload()

    def jobs(self) -> tuple[int, int]:
        """Jobs on (the old, the new) server."""
        count = f"SELECT count(*) FROM {SCHEMA}.jobs"
        return self.old.execute(count)[0][0], self.new.execute(count)[0][0]


@pytest.fixture
def switchover(migrated: PgServer) -> Iterator[Switchover]:
    with temporary_server() as new:
        upgrade(new.dsn(), schema=SCHEMA)
        yield Switchover(migrated, new)


READ_ONLY = "SHOW default_transaction_read_only"


def test_after_a_switchover_every_write_reaches_the_server_that_takes_writes(switchover: Switchover) -> None:
    """After a switchover the queue's pooled connections still reach the old primary, which now
    refuses writes (demoted to a standby, fenced read-only), while its multi-host DSN leads new
    connections to the new one. The first refused write retires the pool and runs again on a new
    connection: no call fails, no write is lost or lands twice; kept, the old connections
    refused every write until they expired."""
    with Queue(switchover.dsn, schema=SCHEMA) as queue:
        queue.enqueue("t")
        assert switchover.jobs() == (1, 0)
        switchover.demote_old()

        def pooled_session_is_read_only() -> bool:
            with queue.connection() as c:
                return c.execute(READ_ONLY).fetchone() == ("on",)

        wait_until(pooled_session_is_read_only, 10, "the pooled session stayed writable")
        ids = [queue.enqueue("t") for _ in range(10)]
        ids += queue.enqueue_many([{"task": "t"}] * 10)
    assert len(set(ids)) == 20
    assert switchover.jobs() == (1, 20)


def test_an_async_queue_leaves_the_old_primary_after_a_switchover_too(switchover: Switchover) -> None:
    """The asyncio queue (the source the sync one is generated from) on the same switchover."""

    async def scenario() -> list[int]:
        async with AsyncQueue(switchover.dsn, schema=SCHEMA) as queue:
            await queue.enqueue("t")
            switchover.demote_old()
            deadline = time.monotonic() + 10
            while True:
                async with queue.connection() as c:
                    if await (await c.execute(READ_ONLY)).fetchone() == ("on",):
                        break
                assert time.monotonic() < deadline, "the pooled session stayed writable"
                await asyncio.sleep(0.1)
            ids = [await queue.enqueue("t") for _ in range(10)]
            return ids + await queue.enqueue_many([{"task": "t"}] * 10)

    ids = asyncio.run(scenario())
    assert len(set(ids)) == 20
    assert switchover.jobs() == (1, 20)


def _refuses_writes(queue: Queue) -> bool:
    try:
        queue.cancel(2**62)  # a write that changes nothing
    except DatabaseUnavailableError:
        return True
    return False


def test_restart_under_a_running_queue_is_invisible_to_the_next_calls(migrated: PgServer) -> None:
    with Queue(migrated.dsn(), schema=SCHEMA, pool_size=4) as queue:
        job_id = queue.enqueue("t")
        before = grow_pool(queue, 4)
        for step in range(2):  # twice: the pool rebuilt after the first restart recovers too
            migrated.restart("immediate")
            started = time.monotonic()
            assert queue.get_job(job_id).task == "t"  # a read
            new_id = queue.enqueue("t")  # and a write that must not run twice
            assert queue.enqueue_many([{"task": "t"}, {"task": "t"}])
            assert queue.cancel(new_id)
            assert queue.list_schedules() == []
            print(f"\nrestart {step + 1}: calls after it took {time.monotonic() - started:.3f} s")
            with queue.connection() as conn:
                assert conn.info.backend_pid not in before
        assert queue.get_job(job_id).state == "queued"


async def test_restart_under_a_running_async_queue_is_invisible_to_the_next_calls(migrated: PgServer) -> None:
    async with AsyncQueue(migrated.dsn(), schema=SCHEMA, pool_size=4) as queue:
        job_id = await queue.enqueue("t")

        async def hold() -> None:
            async with queue.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.2)")

        await asyncio.gather(*(hold() for _ in range(4)))
        for _ in range(2):
            await asyncio.to_thread(migrated.restart, "immediate")
            assert (await queue.get_job(job_id)).task == "t"
            new_id = await queue.enqueue("t")
            assert await queue.enqueue_many([{"task": "t"}])
            assert await queue.cancel(new_id)
            assert await queue.list_schedules() == []


def test_server_stopped_under_a_running_queue_is_reported_then_recovered(migrated: PgServer) -> None:
    with Queue(migrated.dsn(), schema=SCHEMA, connect_wait=1.5) as queue:
        job_id = queue.enqueue("t")
        grow_pool(queue, 3)
        migrated.stop("fast")
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match="No such file or directory"):
            queue.get_job(job_id)
        elapsed = time.monotonic() - started
        assert elapsed > 1.4 and elapsed < 4, elapsed
        assert queue._pool is None, "the pool that cannot connect was left reconnecting"
        migrated.start()
        assert queue.get_job(job_id).task == "t"


def test_credentials_revoked_under_a_running_queue_are_named_quickly(auth_server: PgServer) -> None:
    auth_server.execute("CREATE ROLE app_rotated LOGIN PASSWORD 'old-password'")
    auth_server.prepend_hba("host all app_rotated 127.0.0.1/32 scram-sha-256")
    dsn = auth_server.dsn(user="app_rotated", password="old-password", tcp=True)
    with Queue(dsn, schema=SCHEMA) as queue:
        with queue.connection() as conn:
            conn.execute("SELECT 1")
        auth_server.execute("ALTER ROLE app_rotated PASSWORD 'new-password'")
        auth_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app_rotated'"
        )
        wait_until(lambda: not backends_of(auth_server, "usename = 'app_rotated'"), 10, "backends survived")
        started = time.monotonic()
        with pytest.raises(AuthenticationError, match="password authentication failed"), queue.connection():
            pass
        assert time.monotonic() - started < 2.5
        assert queue._pool is None


def test_terminated_idle_backends_are_replaced_before_use(migrated: PgServer) -> None:
    with Queue(migrated.dsn(), schema=SCHEMA, pool_size=3) as queue:
        pids = grow_pool(queue, 3)
        killed = migrated.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [list(pids)]
        )
        assert all(ok for (ok,) in killed)
        wait_until(lambda: not backends_of(migrated, "pid = ANY(%s)", [list(pids)]), 10, "backends survived")
        for _ in range(5):
            queue.enqueue("t")
        assert len(queue.enqueue_many([{"task": "t"}] * 3)) == 3


def test_a_read_is_retried_on_a_new_connection_a_write_is_not(migrated: PgServer) -> None:
    """A statement cut midway: reads and pgqueue's own transactions (before COMMIT) run once more,
    an autocommit write is reported, as it may have taken effect."""
    with Queue(migrated.dsn(), schema=SCHEMA) as queue:
        attempts: list[int] = []

        def cut_first(conn: psycopg.Connection[Any]) -> int:
            attempts.append(conn.info.backend_pid)
            if len(attempts) == 1:
                conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            row = conn.execute("SELECT 41 + 1").fetchone()
            assert row is not None
            return int(row[0])

        assert queue._run(None, cut_first, "read") == 42
        assert len(attempts) == 2 and attempts[0] != attempts[1]

        attempts.clear()
        with pytest.raises(DatabaseUnavailableError, match="may or may not have taken effect"):
            queue._run(None, cut_first, "never")
        assert len(attempts) == 1

        # In a transaction of pgqueue's own, cut before COMMIT: nothing was kept, run again.
        before = queue.enqueue("marker")
        attempts.clear()

        def insert_then_cut(conn: psycopg.Connection[Any]) -> int:
            job_id = queue._insert_one(conn, make_request(queue.registry, JobSpec("in-tx")), True)
            cut_first(conn)  # the first time, after the insert and before COMMIT
            return job_id

        job_id = queue._run(None, insert_then_cut, "transaction")
        assert len(attempts) == 2
        rows = migrated.execute(f"SELECT id FROM {SCHEMA}.jobs WHERE task = 'in-tx'")
        assert rows == [(job_id,)], "the cut attempt's insert was kept, or the retry's lost"
        assert job_id > before


# ---------------------------------------------------------------------------- errors retrying cannot fix


def _resolver_says_no_such_host() -> bool:
    try:
        socket.getaddrinfo("pgqueue-no-such-host.invalid", 5432)
    except socket.gaierror as exc:
        return exc.errno != socket.EAI_AGAIN
    return False


PERMANENT = {
    "wrong password": (
        lambda s: s.dsn(user="app_pw", password="wrong", tcp=True),
        AuthenticationError,
        'password authentication failed for user "app_pw"',
    ),
    "no password": (lambda s: s.dsn(user="app_pw", tcp=True), AuthenticationError, "no password supplied"),
    "missing database": (
        lambda s: s.dsn(dbname="no_such_db"),
        DatabaseConfigurationError,
        'database "no_such_db" does not exist',
    ),
    "missing role": (
        lambda s: s.dsn(user="no_such_role"),
        DatabaseConfigurationError,
        'role "no_such_role" does not exist',
    ),
    "not a dsn": (lambda s: "not a dsn", DatabaseConfigurationError, 'missing "=" after "not"'),
    "unknown host": (
        lambda s: "postgresql://u@pgqueue-no-such-host.invalid/db",
        DatabaseConfigurationError,
        "pgqueue-no-such-host.invalid",
    ),
}


@pytest.mark.parametrize("case", list(PERMANENT))
def test_errors_retrying_cannot_fix_are_named_at_once(auth_server: PgServer, case: str) -> None:
    make_dsn, kind, server_says = PERMANENT[case]
    if case == "unknown host" and not _resolver_says_no_such_host():
        pytest.skip("this machine's resolver cannot tell an unknown host from a DNS outage")
    assert auth_server.execute("SELECT 1") == [(1,)]  # the server itself is fine
    queue = Queue(make_dsn(auth_server), schema=SCHEMA)
    try:
        for call in (lambda: queue.enqueue("t"), lambda: queue.get_job(1), queue.list_schedules):
            started = time.monotonic()
            with pytest.raises(kind) as raised:
                call()
            assert time.monotonic() - started < 2
            assert server_says in str(raised.value)
            assert queue._pool is None
        started = time.monotonic()
        with pytest.raises(kind) as raised:
            queue.migrate()
        assert time.monotonic() - started < 2
        assert server_says in str(raised.value)
    finally:
        queue.close()


@pytest.mark.parametrize("case", ["wrong password", "missing database", "not a dsn"])
async def test_async_errors_retrying_cannot_fix_are_named_at_once(auth_server: PgServer, case: str) -> None:
    make_dsn, kind, server_says = PERMANENT[case]
    queue = AsyncQueue(make_dsn(auth_server), schema=SCHEMA)
    try:
        started = time.monotonic()
        with pytest.raises(kind) as raised:
            await queue.enqueue("t")
        assert time.monotonic() - started < 2
        assert server_says in str(raised.value)
    finally:
        await queue.close()


def test_right_password_works_and_refused_port_waits_a_bounded_time(auth_server: PgServer) -> None:
    right = auth_server.dsn(user="app_pw", password="right-password", tcp=True)
    with Queue(right, schema=SCHEMA) as queue, queue.connection() as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_pw",)

    refused = Queue(
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", schema=SCHEMA, connect_wait=1.5
    )
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match=r"after 1\.\d s: .*Connection refused"):
        refused.enqueue("t")
    elapsed = time.monotonic() - started
    print(f"\nrefused port: DatabaseUnavailableError after {elapsed:.2f} s (connect_wait=1.5)")
    assert elapsed > 1.4 and elapsed < 3.5, elapsed


def test_out_of_connection_slots_is_transient() -> None:
    with temporary_server(settings={"max_connections": 4, "superuser_reserved_connections": 0}) as server:
        upgrade(server.dsn(), schema=SCHEMA)
        held = [psycopg.connect(server.dsn()) for _ in range(4)]
        queue = Queue(server.dsn(), schema=SCHEMA, connect_wait=1.0)
        try:
            with pytest.raises(DatabaseUnavailableError, match="too many clients"):
                queue.enqueue("t")
            held.pop().close()
            assert queue.enqueue("t")
        finally:
            for conn in held:
                conn.close()
            queue.close()


# ---------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args", [["migrate"], ["status"], ["enqueue", "t"], ["schedules"]])
def test_cli_with_no_server_prints_one_line_and_exits_non_zero(args: list[str]) -> None:
    env = clean_env(
        PGQUEUE_DSN=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", PGQUEUE_CONNECT_WAIT="1"
    )
    started = time.monotonic()
    done = run_cli(env, *args)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert (
        lines[0].startswith("pgqueue: no database connection after 1.0 s:")
        and "Connection refused" in lines[0]
    )
    assert elapsed < 10, f"{args} took {elapsed:.1f} s"

    debug = run_cli(env, *args, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr


def test_cli_with_a_wrong_password_says_so_at_once(auth_server: PgServer) -> None:
    env = clean_env(PGQUEUE_DSN=auth_server.dsn(user="app_pw", password="wrong", tcp=True))
    for args in (["migrate"], ["status"]):
        done = run_cli(env, *args)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "password authentication failed" in lines[0], done.stderr


def test_before_migrate_every_call_says_run_migrate(postgres_dsn: str, new_schema: str) -> None:
    queue = Queue(postgres_dsn, schema=new_schema)
    try:
        calls: list[Callable[[], object]] = [
            lambda: queue.enqueue("t"),
            lambda: queue.enqueue_many([{"task": "t"}]),
            lambda: queue.get_job(1),
            lambda: queue.cancel(1),
            queue.list_schedules,
            lambda: queue.pause("default"),
        ]
        for call in calls:
            with pytest.raises(SchemaNotReadyError, match="run `pgqueue migrate`"):
                call()
        with psycopg.connect(postgres_dsn) as conn, pytest.raises(SchemaNotReadyError, match="migrate"):
            queue.enqueue("t", conn=conn)  # on the caller's connection too
    finally:
        queue.close()

    env = clean_env(PGQUEUE_DSN=postgres_dsn, PGQUEUE_SCHEMA=new_schema)
    for args in (["status"], ["schedules"], ["enqueue", "t"]):
        done = run_cli(env, *args)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "run `pgqueue migrate`" in lines[0], done.stderr


async def test_before_migrate_async_calls_say_run_migrate(postgres_dsn: str, new_schema: str) -> None:
    async with AsyncQueue(postgres_dsn, schema=new_schema) as queue:
        with pytest.raises(SchemaNotReadyError, match="run `pgqueue migrate`"):
            await queue.enqueue("t")
        with pytest.raises(SchemaNotReadyError):
            await queue.get_job(1)
        with pytest.raises(SchemaNotReadyError):
            await queue.list_schedules()


# ---------------------------------------------------------------------------- connection names


def test_connections_are_named_after_their_role(migrated: PgServer) -> None:
    with Queue(migrated.dsn(), schema=SCHEMA) as queue, queue.connection() as conn:
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == (
            f"pgqueue-client {socket.gethostname()}:{os.getpid()}",
        )

    env = clean_env(PGQUEUE_DSN=migrated.dsn(), PGQUEUE_SCHEMA=SCHEMA)
    assert run_cli(env, "migrate").returncode == 0
    assert run_cli(env, "status").returncode == 0
    named = run_cli({**env, "PGAPPNAME": "chosen-by-operator"}, "status")
    assert named.returncode == 0
    log = migrated.log_text()
    assert f"application_name=pgqueue-migrate {socket.gethostname()}:" in log
    assert f"application_name=pgqueue-cli {socket.gethostname()}:" in log
    assert "application_name=chosen-by-operator" in log


async def test_async_connections_are_named(migrated: PgServer) -> None:
    async with AsyncQueue(migrated.dsn(), schema=SCHEMA) as queue, queue.connection() as conn:
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert await cur.fetchone() == (f"pgqueue-client {socket.gethostname()}:{os.getpid()}",)


# ---------------------------------------------------------------------------- the scheduler


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(name: str, env: dict[str, str], *args: str) -> Proc:
        proc = Proc(name, list(args), env, tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(5)


def tick_times(dsn: str, schema: str) -> list[datetime]:
    query = sql.SQL("SELECT scheduled_for FROM {}.jobs WHERE task = 'tick' ORDER BY scheduled_for").format(
        sql.Identifier(schema)
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [row[0] for row in conn.execute(query)]


def test_scheduler_started_while_the_server_is_down_fires_once_it_is_up(
    down: PgServer, procs: Callable[..., Proc]
) -> None:
    env = clean_env(PGQUEUE_DSN=down.dsn(), PGQUEUE_SCHEMA=SCHEMA, PGQUEUE_CONNECT_WAIT="1")
    scheduler = procs("scheduler", env, "scheduler", "tests.support.scheduler_app:queue")
    scheduler.wait_for_log("cannot reach the database", 20)
    down.start()
    up = time.time()
    scheduler.wait_for_log("scheduler started", 15)
    first = wait_until(lambda: tick_times(down.dsn(), SCHEMA), 15, scheduler.tail)[0]
    print(f"\nscheduler: first fire enqueued {time.time() - up:.2f} s after the server came up")
    assert first.timestamp() - up < 4
    assert scheduler.stop() == 0, scheduler.tail()
    assert "Traceback" not in scheduler.log(), scheduler.tail()


def test_backend_kill_storm_loses_no_fire_time(
    procs: Callable[..., Proc], postgres_dsn: str, pgqueue_schema: str
) -> None:
    env = clean_env(PGQUEUE_DSN=postgres_dsn, PGQUEUE_SCHEMA=pgqueue_schema, PGQUEUE_LOG_LEVEL="INFO")
    app = "tests.support.scheduler_app:queue"
    schedulers = [procs(f"scheduler-{n}", env, "scheduler", app) for n in range(3)]
    for scheduler in schedulers:
        scheduler.wait_for_log("scheduler started", 20)
    names = [f"pgqueue-scheduler {socket.gethostname()}:{s.proc.pid}" for s in schedulers]
    admin = psycopg.connect(postgres_dsn, autocommit=True)

    def backends() -> Counter[str]:
        rows = admin.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name = ANY(%s)", [names]
        ).fetchall()
        return Counter(name for (name,) in rows)

    wait_until(lambda: len(backends()) == 3, 10, lambda: f"scheduler connections not named: {backends()}")

    kills: list[int] = []
    storming = threading.Event()
    storming.set()
    rng = random.Random(uuid.uuid4().int)

    def storm() -> None:
        with psycopg.connect(postgres_dsn, autocommit=True) as killer:
            while storming.is_set():
                rows = killer.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY(%s)",
                    [names],
                ).fetchall()
                kills.append(sum(1 for (ok,) in rows if ok))
                # Every 0.5-2 s; half the time just after a whole second, when the schedulers are
                # inside the fire's transaction rather than idle.
                now = time.time()
                at = now + rng.uniform(0.5, 2.0)
                if rng.random() < 0.5 and int(at) >= now + 0.5:
                    at = int(at) + rng.uniform(0.0, 0.02)
                time.sleep(at - now)

    all_up = time.time()
    killer = threading.Thread(target=storm, daemon=True)
    killer.start()
    time.sleep(15)
    storming.clear()
    killer.join(5)
    storm_end = time.time()
    time.sleep(2)  # fires caught by the last kills finish their retries
    for scheduler in schedulers:
        assert scheduler.stop() == 0, scheduler.tail()
    admin.close()

    times = tick_times(postgres_dsn, pgqueue_schema)
    per_fire = Counter(times)
    assert not {t: n for t, n in per_fire.items() if n != 1}, "a fire time was enqueued twice"
    wanted = {datetime.fromtimestamp(s, tz=UTC) for s in range(int(all_up) + 2, int(storm_end))}
    lost = sorted(wanted - set(times))
    retried = sum(s.log().count("; retrying") for s in schedulers)
    print(
        f"\nkill storm: {len(kills)} rounds killed {sum(kills)} backends over {storm_end - all_up:.1f} s; "
        f"{len(wanted)} fire times due, {len(lost)} lost; {retried} enqueue retries logged"
    )
    assert sum(kills) >= 10, "the storm never hit the schedulers' connections"
    assert not lost, f"fire times lost: {lost}"
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(sorted(wanted))), "bad window"
    for scheduler in schedulers:
        assert "Traceback" not in scheduler.log(), scheduler.tail()
        assert "dropped" not in scheduler.log(), scheduler.tail()
