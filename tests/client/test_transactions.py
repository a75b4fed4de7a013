"""Enqueue in the caller's transaction: psycopg (sync, async) and SQLAlchemy (Session, Connection,
AsyncSession, AsyncConnection). Rolled back together, invisible until commit, one NOTIFY per queue
per transaction delivered at commit."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from pgqueue import AsyncQueue, ConfigurationError, JobNotFoundError, JobState, PgQueueError, Queue
from pgqueue._enqueue import COPY_CHUNK_ROWS

SYNC_KINDS = ["psycopg", "sqlalchemy-session", "sqlalchemy-connection"]
ASYNC_KINDS = ["psycopg-async", "sqlalchemy-async-session", "sqlalchemy-async-connection"]
DEEP = COPY_CHUNK_ROWS * 2 + 5  # a bulk job checked while its batch's COPY streams


class Listener:
    """A connection LISTENing on a queue's wake-up channel."""

    def __init__(self, conn: psycopg.Connection[Any], channel: str) -> None:
        self.conn = conn
        self.channel = channel

    def received(self, timeout: float = 0.3, stop_after: int | None = None) -> list[str]:
        """Payloads (queue names) delivered within ``timeout`` seconds."""
        return [n.payload for n in self.conn.notifies(timeout=timeout, stop_after=stop_after)]


@pytest.fixture
def listener_for(postgres_dsn: str) -> Iterator[Callable[[Queue | AsyncQueue], Listener]]:
    conns: list[psycopg.Connection[Any]] = []

    def listen(q: Queue | AsyncQueue) -> Listener:
        conn = psycopg.connect(postgres_dsn, autocommit=True)
        conns.append(conn)
        channel = q.queries.channel
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return Listener(conn, channel)

    yield listen
    for conn in conns:
        conn.close()


@dataclass
class Tx:
    """A caller's open transaction: the object passed as ``conn=`` and how to use and end it."""

    handle: Any
    execute: Callable[[str], Any]
    commit: Callable[[], Any]
    rollback: Callable[[], Any]


@contextmanager
def sync_tx(kind: str, dsn: str, engine: Engine) -> Iterator[Tx]:
    if kind == "psycopg":
        with psycopg.connect(dsn) as conn:
            yield Tx(conn, conn.execute, conn.commit, conn.rollback)
    elif kind == "sqlalchemy-session":
        with Session(engine) as session:
            yield Tx(session, lambda q: session.execute(text(q)), session.commit, session.rollback)
    else:
        with engine.connect() as connection:
            yield Tx(
                connection,
                lambda q: connection.execute(text(q)),
                connection.commit,
                connection.rollback,
            )


@asynccontextmanager
async def async_tx(kind: str, dsn: str, engine: AsyncEngine) -> AsyncIterator[Tx]:
    if kind == "psycopg-async":
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            yield Tx(conn, conn.execute, conn.commit, conn.rollback)
    elif kind == "sqlalchemy-async-session":
        async with AsyncSession(engine) as session:
            yield Tx(session, lambda q: session.execute(text(q)), session.commit, session.rollback)
    else:
        async with engine.connect() as connection:
            yield Tx(
                connection,
                lambda q: connection.execute(text(q)),
                connection.commit,
                connection.rollback,
            )


@pytest.fixture
def orders(db: psycopg.Connection[Any], pgqueue_schema: str) -> str:
    """An application table next to the jobs, to show both commit or roll back together."""
    name = f'"{pgqueue_schema}".orders'
    db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    return name


def visible_jobs(db: psycopg.Connection[Any], schema: str) -> list[tuple[str, Any]]:
    return db.execute(
        sql.SQL("SELECT task, args FROM {}.jobs ORDER BY id").format(sql.Identifier(schema))
    ).fetchall()


def visible_orders(db: psycopg.Connection[Any], orders: str) -> list[int]:
    return [r[0] for r in db.execute(f"SELECT id FROM {orders} ORDER BY id")]


def assert_woken_once_per_queue(listener: Listener, queues: set[str]) -> None:
    got = listener.received(timeout=5, stop_after=len(queues))
    got += listener.received(timeout=0.2)  # and nothing more trickles in
    assert sorted(got) == sorted(queues)


# ---------------------------------------------------------------------------- sync


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_rollback_discards_the_jobs_with_the_transaction(
    kind: str,
    queue: Queue,
    postgres_dsn: str,
    sa_engine: Engine,
    db: psycopg.Connection[Any],
    orders: str,
    listener_for: Callable[..., Listener],
    count: Callable[..., int],
) -> None:
    listener = listener_for(queue)
    with sync_tx(kind, postgres_dsn, sa_engine) as tx:
        tx.execute(f"INSERT INTO {orders} VALUES (1)")
        job_id = queue.enqueue("ship", {"order": 1}, conn=tx.handle)
        queue.enqueue_many([{"task": "bulk", "args": {"i": i}} for i in range(5)], conn=tx.handle)
        queue.enqueue("keyed", unique_key="order:1", conn=tx.handle)
        queue.enqueue_many([{"task": "keyed", "unique_key": "order:2"}], conn=tx.handle)
        assert queue.get_job(job_id, conn=tx.handle).state is JobState.QUEUED
        tx.rollback()
    assert count() == 0
    assert visible_orders(db, orders) == []
    with pytest.raises(JobNotFoundError):
        queue.get_job(job_id)
    assert listener.received(timeout=0.2) == []
    # The keys were never held: they are free for the next enqueue.
    assert queue.enqueue("keyed", unique_key="order:1") != job_id


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_commit_publishes_the_jobs_and_wakes_each_queue_once(
    kind: str,
    queue: Queue,
    postgres_dsn: str,
    sa_engine: Engine,
    db: psycopg.Connection[Any],
    orders: str,
    listener_for: Callable[..., Listener],
    pgqueue_schema: str,
) -> None:
    listener = listener_for(queue)
    with sync_tx(kind, postgres_dsn, sa_engine) as tx:
        first = queue.enqueue("ship", {"order": 2}, conn=tx.handle)
        tx.execute(f"INSERT INTO {orders} VALUES (2)")
        for i in range(20):
            queue.enqueue("ship", {"order": 2, "n": i}, queue="email", conn=tx.handle)
        queue.enqueue_many([{"task": "bulk", "queue": "email"}, {"task": "bulk"}], conn=tx.handle)

        # Before commit: nobody else sees anything, and no worker has been woken.
        assert visible_jobs(db, pgqueue_schema) == []
        assert visible_orders(db, orders) == []
        with pytest.raises(JobNotFoundError):
            queue.get_job(first)  # the queue's own pool is another connection
        assert listener.received(timeout=0.2) == []

        tx.commit()
    assert len(visible_jobs(db, pgqueue_schema)) == 23
    assert visible_orders(db, orders) == [2]
    assert queue.get_job(first).args == {"order": 2}
    assert_woken_once_per_queue(listener, {"default", "email"})


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_a_refused_enqueue_leaves_the_callers_transaction_usable(
    kind: str,
    queue: Queue,
    postgres_dsn: str,
    sa_engine: Engine,
    db: psycopg.Connection[Any],
    pgqueue_schema: str,
) -> None:
    with sync_tx(kind, postgres_dsn, sa_engine) as tx:
        queue.enqueue("good", conn=tx.handle)
        with pytest.raises(PgQueueError):
            queue.enqueue("bad", {"x": object()}, conn=tx.handle)
        with pytest.raises(PgQueueError):
            queue.enqueue_many([{"task": "good"}, {"task": "bad", "priority": 0}], conn=tx.handle)
        with pytest.raises(PgQueueError, match=f"job #{DEEP}"):  # refused while its COPY streams
            queue.enqueue_many([{"task": "good"}] * DEEP + [{"task": "bad", "priority": 0}], conn=tx.handle)
        queue.enqueue("also_good", conn=tx.handle)
        tx.commit()
    assert [t for t, _ in visible_jobs(db, pgqueue_schema)] == ["good", "also_good"]


def test_sqlalchemy_engine_begin_block(
    queue: Queue, sa_engine: Engine, db: psycopg.Connection[Any], pgqueue_schema: str
) -> None:
    with sa_engine.begin() as connection:
        queue.enqueue("in.begin", conn=connection)
    with pytest.raises(RuntimeError), sa_engine.begin() as connection:
        queue.enqueue("in.failed.begin", conn=connection)
        raise RuntimeError("the app fails after enqueueing")
    assert [t for t, _ in visible_jobs(db, pgqueue_schema)] == ["in.begin"]


def test_notify_off_sends_nothing(
    postgres_dsn: str,
    pgqueue_schema: str,
    listener_for: Callable[..., Listener],
    count: Callable[..., int],
) -> None:
    with Queue(postgres_dsn, schema=pgqueue_schema, notify=False) as quiet:
        listener = listener_for(quiet)
        with psycopg.connect(postgres_dsn) as conn:
            quiet.enqueue("x", conn=conn)
            quiet.enqueue_many([{"task": "y", "queue": "other"}], conn=conn)
            conn.commit()
        quiet.enqueue("z")
        quiet.enqueue_many([{"task": "z"}, {"task": "z", "unique_key": "k"}])
        assert listener.received(timeout=0.3) == []
    assert count() == 5


def _waiting_worker(db: psycopg.Connection[Any], schema: str, worker_id: str, queues: list[str]) -> None:
    """A worker row on the waiting list, as a worker's unsaturated claim leaves it."""
    db.execute(
        f'INSERT INTO "{schema}".workers (id, host, pid, queues, concurrency, waiting_until)'
        " VALUES (%s, 'h', 1, %s, 1, now() + interval '1 minute')",
        (worker_id, queues),
    )
    db.commit()


def test_without_conn_an_enqueue_wakes_one_waiting_worker_or_nobody(
    queue: Queue,
    listener_for: Callable[..., Listener],
    db: psycopg.Connection[Any],
    pgqueue_schema: str,
) -> None:
    """An enqueue that commits by itself tells one waiting worker of its queue, by name, and
    takes it off the list; with no worker waiting it sends nothing at all (busy workers claim
    when they have room), which spares the commit NOTIFY's lock."""
    listener = listener_for(queue)
    queue.enqueue("a", queue="one")
    assert len(visible_jobs(db, pgqueue_schema)) == 1  # committed already
    queue.enqueue_many([{"task": "c", "queue": "one"}, {"task": "d", "queue": "three"}])
    assert listener.received(timeout=0.3) == []  # nobody waits: nothing sent
    _waiting_worker(db, pgqueue_schema, "w-one", ["one", "two"])
    _waiting_worker(db, pgqueue_schema, "w-three", ["three"])
    queue.enqueue("b", queue="two")
    assert listener.received(timeout=5, stop_after=1) == ["!wake w-one"]
    queue.enqueue("b", queue="two")  # w-one is woken already: it claims everything there is
    assert listener.received(timeout=0.3) == []
    queue.enqueue_many([{"task": "c", "queue": "one"}, {"task": "d", "queue": "three"}])
    assert listener.received(timeout=5, stop_after=1) == ["!wake w-three"]
    waiting = db.execute(f'SELECT id FROM "{pgqueue_schema}".workers WHERE waiting_until IS NOT NULL')
    assert waiting.fetchall() == []


def test_an_expired_waiting_worker_is_not_woken(
    queue: Queue,
    listener_for: Callable[..., Listener],
    db: psycopg.Connection[Any],
    pgqueue_schema: str,
) -> None:
    """A worker that stopped renewing its lease (dead, frozen) is off the list by then."""
    listener = listener_for(queue)
    _waiting_worker(db, pgqueue_schema, "w-gone", ["one"])
    db.execute(f"UPDATE \"{pgqueue_schema}\".workers SET waiting_until = now() - interval '1 second'")
    db.commit()
    queue.enqueue("a", queue="one")
    assert listener.received(timeout=0.3) == []


def test_conn_of_the_wrong_kind_is_refused(
    queue: Queue, postgres_dsn: str, sa_async_engine: AsyncEngine, count: Callable[..., int]
) -> None:
    for wrong in ("postgresql://x", 42, object(), AsyncSession(sa_async_engine)):
        with pytest.raises(ConfigurationError):
            queue.enqueue("x", conn=wrong)
        with pytest.raises(ConfigurationError):
            queue.enqueue_many([{"task": "x"}], conn=wrong)
    assert count() == 0


async def test_sync_queue_refuses_an_async_psycopg_connection(
    queue: Queue, postgres_dsn: str, count: Callable[..., int]
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as aconn:
        with pytest.raises(ConfigurationError, match="AsyncQueue"):
            queue.enqueue("x", conn=aconn)
    assert count() == 0


# ---------------------------------------------------------------------------- async


@pytest.mark.parametrize("kind", ASYNC_KINDS)
async def test_async_rollback_discards_the_jobs(
    kind: str,
    async_queue: AsyncQueue,
    postgres_dsn: str,
    sa_async_engine: AsyncEngine,
    db: psycopg.Connection[Any],
    orders: str,
    listener_for: Callable[..., Listener],
    count: Callable[..., int],
) -> None:
    listener = listener_for(async_queue)
    async with async_tx(kind, postgres_dsn, sa_async_engine) as tx:
        await tx.execute(f"INSERT INTO {orders} VALUES (1)")
        job_id = await async_queue.enqueue("ship", {"order": 1}, conn=tx.handle)
        await async_queue.enqueue_many([{"task": "bulk", "args": {"i": i}} for i in range(5)], conn=tx.handle)
        await async_queue.enqueue("keyed", unique_key="order:1", conn=tx.handle)
        await async_queue.enqueue_many([{"task": "keyed", "unique_key": "k2"}], conn=tx.handle)
        assert (await async_queue.get_job(job_id, conn=tx.handle)).state is JobState.QUEUED
        await tx.rollback()
    assert count() == 0
    assert visible_orders(db, orders) == []
    with pytest.raises(JobNotFoundError):
        await async_queue.get_job(job_id)
    assert listener.received(timeout=0.2) == []


@pytest.mark.parametrize("kind", ASYNC_KINDS)
async def test_async_commit_publishes_the_jobs_and_wakes_each_queue_once(
    kind: str,
    async_queue: AsyncQueue,
    postgres_dsn: str,
    sa_async_engine: AsyncEngine,
    db: psycopg.Connection[Any],
    orders: str,
    listener_for: Callable[..., Listener],
    pgqueue_schema: str,
) -> None:
    listener = listener_for(async_queue)
    async with async_tx(kind, postgres_dsn, sa_async_engine) as tx:
        first = await async_queue.enqueue("ship", {"order": 2}, conn=tx.handle)
        await tx.execute(f"INSERT INTO {orders} VALUES (2)")
        for i in range(20):
            await async_queue.enqueue("ship", {"n": i}, queue="email", conn=tx.handle)
        await async_queue.enqueue_many([{"task": "bulk", "queue": "email"}, {"task": "bulk"}], conn=tx.handle)
        assert visible_jobs(db, pgqueue_schema) == []
        assert visible_orders(db, orders) == []
        with pytest.raises(JobNotFoundError):
            await async_queue.get_job(first)
        assert listener.received(timeout=0.2) == []
        await tx.commit()
    assert len(visible_jobs(db, pgqueue_schema)) == 23
    assert visible_orders(db, orders) == [2]
    assert (await async_queue.get_job(first)).args == {"order": 2}
    assert_woken_once_per_queue(listener, {"default", "email"})


@pytest.mark.parametrize("kind", ASYNC_KINDS)
async def test_async_refused_enqueue_leaves_the_transaction_usable(
    kind: str,
    async_queue: AsyncQueue,
    postgres_dsn: str,
    sa_async_engine: AsyncEngine,
    db: psycopg.Connection[Any],
    pgqueue_schema: str,
) -> None:
    async with async_tx(kind, postgres_dsn, sa_async_engine) as tx:
        await async_queue.enqueue("good", conn=tx.handle)
        with pytest.raises(PgQueueError):
            await async_queue.enqueue("bad", {"x": {1, 2}}, conn=tx.handle)
        with pytest.raises(PgQueueError):
            await async_queue.enqueue_many([{"task": "good"}, {"task": "bad", "delay": -1}], conn=tx.handle)
        with pytest.raises(PgQueueError, match=f"job #{DEEP}"):  # refused while its COPY streams
            await async_queue.enqueue_many(
                [{"task": "good"}] * DEEP + [{"task": "bad", "delay": -1}], conn=tx.handle
            )
        await async_queue.enqueue("also_good", conn=tx.handle)
        await tx.commit()
    assert [t for t, _ in visible_jobs(db, pgqueue_schema)] == ["good", "also_good"]


async def test_async_conn_of_the_wrong_kind_is_refused(
    async_queue: AsyncQueue, postgres_dsn: str, sa_engine: Engine, count: Callable[..., int]
) -> None:
    with psycopg.connect(postgres_dsn) as sync_conn, Session(sa_engine) as session:
        for wrong in (sync_conn, session, "postgresql://x", 42):
            with pytest.raises(ConfigurationError):
                await async_queue.enqueue("x", conn=wrong)
            with pytest.raises(ConfigurationError):
                await async_queue.enqueue_many([{"task": "x"}], conn=wrong)
    assert count() == 0


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_enqueue_as_the_only_statement_commits(
    kind: str, queue: Queue, postgres_dsn: str, sa_engine: Engine, count: Callable[..., int]
) -> None:
    """Nothing but pgqueue ran on the caller's connection: its commit() must still commit."""
    with sync_tx(kind, postgres_dsn, sa_engine) as tx:
        job_id = queue.enqueue("only", conn=tx.handle)
        tx.commit()
    assert queue.get_job(job_id).task == "only"
    assert count() == 1


@pytest.mark.parametrize("kind", ASYNC_KINDS)
async def test_async_enqueue_as_the_only_statement_commits(
    kind: str,
    async_queue: AsyncQueue,
    postgres_dsn: str,
    sa_async_engine: AsyncEngine,
    count: Callable[..., int],
) -> None:
    async with async_tx(kind, postgres_dsn, sa_async_engine) as tx:
        ids = await async_queue.enqueue_many([{"task": "only"}], conn=tx.handle)
        await tx.commit()
    assert (await async_queue.get_job(ids[0])).task == "only"
    assert count() == 1


async def test_async_queue_without_sqlalchemy_asyncio_still_refuses_clearly(
    async_queue: AsyncQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy's asyncio extension needs greenlet; without it a wrong conn= is still a
    ConfigurationError, not an ImportError."""
    monkeypatch.setitem(sys.modules, "sqlalchemy.ext.asyncio", None)
    with pytest.raises(ConfigurationError):
        await async_queue.enqueue("x", conn=object())
