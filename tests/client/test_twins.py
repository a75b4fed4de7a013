"""Every public method of both queues, through one suite run once per twin.

:class:`pgqueue.Queue` is generated from :class:`pgqueue.AsyncQueue`; each test here runs on
both (``twin`` is ``sync`` or ``async``) and awaits what the async one returns, so a method that
works on one twin and not the other fails here. The last test reads this file and fails when a
public method of either queue (or of its schedule store) is called nowhere in it.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from admin_support import bury

from pgqueue import (
    AsyncQueue,
    InvalidQueueSettingsError,
    JobNotFoundError,
    JobSpec,
    JobState,
    Queue,
    ScheduleNotFoundError,
)
from pgqueue._aqueue import AsyncScheduleStore
from pgqueue._queue import ScheduleStore
from pgqueue.scheduler import Scheduler

AnyQueue = Queue | AsyncQueue


async def done(value: Any) -> Any:
    """What a twin's call gives: awaited for the async one, as it is for the sync one."""
    return await value if inspect.isawaitable(value) else value


@pytest.fixture(params=["sync", "async"])
async def q(
    request: pytest.FixtureRequest, postgres_dsn: str, pgqueue_schema: str
) -> AsyncIterator[AnyQueue]:
    kind = Queue if request.param == "sync" else AsyncQueue
    queue: AnyQueue = kind(postgres_dsn, schema=pgqueue_schema)
    yield queue
    await done(queue.close())


@pytest.fixture
def db(postgres_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield conn


def state_of(db: psycopg.Connection[Any], schema: str, job_id: int) -> str | None:
    row = db.execute(
        f'SELECT state::text FROM "{schema}".jobs WHERE id = %s'
        f' UNION ALL SELECT state::text FROM "{schema}".finished_jobs WHERE id = %s',
        [job_id, job_id],
    ).fetchone()
    return None if row is None else str(row[0])


async def caller_connection(q: AnyQueue, dsn: str) -> Any:
    """A connection of the caller's own, of the kind the twin takes (sync or async)."""
    if isinstance(q, AsyncQueue):
        return await psycopg.AsyncConnection.connect(dsn)
    return psycopg.connect(dsn)


async def test_enqueue_stores_every_option_and_get_job_reads_it(q: AnyQueue) -> None:
    run_at = datetime(2031, 5, 4, 3, 2, 1, tzinfo=UTC)
    job_id = await done(
        q.enqueue(
            "report",
            {"n": 1},
            queue="reports",
            priority=3,
            run_at=run_at,
            max_attempts=7,
            timeout=9.5,
            unique_key="r-1",
        )
    )
    job = await done(q.get_job(job_id))
    assert (job.task, job.args, job.queue, job.priority) == ("report", {"n": 1}, "reports", 3)
    assert (job.run_at, job.max_attempts, job.timeout, job.unique_key) == (run_at, 7, 9.5, "r-1")
    assert job.state is JobState.QUEUED and job.is_delayed
    assert await done(q.enqueue("report", {"n": 2}, queue="reports", unique_key="r-1")) == job_id
    delayed = await done(q.get_job(await done(q.enqueue("report", delay=timedelta(hours=1)))))
    assert delayed.is_delayed
    with pytest.raises(JobNotFoundError):
        await done(q.get_job(10**12))


async def test_enqueue_on_the_callers_connection_rolls_back_with_it(
    q: AnyQueue, postgres_dsn: str, db: psycopg.Connection[Any]
) -> None:
    conn = await caller_connection(q, postgres_dsn)
    try:
        job_id = await done(q.enqueue("t", conn=conn))
        assert (await done(q.get_job(job_id, conn=conn))).state is JobState.QUEUED
        ids = await done(q.enqueue_many([JobSpec("t"), {"task": "t"}], conn=conn))
        await done(conn.rollback())
    finally:
        await done(conn.close())
    for rolled_back in (job_id, *ids):
        assert state_of(db, q.schema, rolled_back) is None


async def test_enqueue_many_in_order_with_unique_keys(q: AnyQueue) -> None:
    ids = await done(
        q.enqueue_many(
            [
                JobSpec("t", {"i": 0}, unique_key="k"),
                {"task": "t", "args": {"i": 1}, "queue": "other", "priority": 1},
                JobSpec("t", {"i": 2}, unique_key="k"),
            ]
        )
    )
    assert ids[0] == ids[2] and ids[1] > ids[0]
    assert (await done(q.get_job(ids[1]))).queue == "other"
    assert await done(q.enqueue_many([])) == []


async def test_cancel_and_cancel_by_key(q: AnyQueue) -> None:
    job_id = await done(q.enqueue("t"))
    assert await done(q.cancel(job_id)) is True
    assert await done(q.cancel(job_id)) is False
    assert (await done(q.get_job(job_id))).state is JobState.CANCELLED
    keyed = await done(q.enqueue("t", unique_key="moot", queue="a"))
    await done(q.enqueue("t", unique_key="moot", queue="b"))
    assert await done(q.cancel_by_key("moot", queue="a")) == 1
    assert (await done(q.get_job(keyed))).state is JobState.CANCELLED
    assert await done(q.cancel_by_key("moot")) == 1
    assert await done(q.cancel_by_key("moot")) == 0


async def test_retry_dead_and_retry_all_dead(q: AnyQueue, db: psycopg.Connection[Any]) -> None:
    first = bury(db, q.schema, queue="email")
    others = [bury(db, q.schema, queue="reports") for _ in range(2)]
    assert await done(q.retry_dead(first)) is True
    assert await done(q.retry_dead(first)) is False
    assert state_of(db, q.schema, first) == "queued"
    assert await done(q.retry_all_dead("reports")) == 2
    assert [state_of(db, q.schema, i) for i in others] == ["queued", "queued"]
    assert await done(q.retry_all_dead()) == 0


async def test_configure_pause_and_resume_a_queue(q: AnyQueue) -> None:
    settings = await done(q.configure_queue("reports", concurrency=2, rate_limit=5.0, keep_completed=60))
    assert (settings.name, settings.paused) == ("reports", False)
    assert (settings.concurrency, settings.rate_limit) == (2, 5.0)
    assert (await done(q.pause("reports"))).paused is True
    resumed = await done(q.resume("reports"))
    assert (resumed.paused, resumed.concurrency) == (False, 2)
    assert (await done(q.configure_queue("reports", concurrency=None))).concurrency is None
    for bad in ({"concurrency": 0}, {"rate_limit": -1}, {"keep_completed_count": -1}):
        with pytest.raises(InvalidQueueSettingsError):
            await done(q.configure_queue("reports", **bad))
    with pytest.raises(InvalidQueueSettingsError, match="invalid queue name"):
        await done(q.pause("no spaces"))
    assert (await done(q.configure_queue("reports"))).rate_limit == 5.0  # refusals changed nothing


async def test_schedules_at_run_time(q: AnyQueue) -> None:
    added = await done(q.add_schedule("nightly", "report", {"n": 1}, cron="0 2 * * *", queue="reports"))
    assert added.name == "nightly"
    [stored] = await done(q.list_schedules())
    assert (stored.task, stored.args, stored.queue) == ("report", {"n": 1}, "reports")
    assert stored.cron == "0 2 * * *"
    assert stored.next_fire_at is not None
    await done(q.pause_schedule("nightly"))
    assert [s.paused for s in await done(q.list_schedules())] == [True]
    await done(q.resume_schedule("nightly"))
    assert [s.paused for s in await done(q.list_schedules())] == [False]
    await done(q.remove_schedule("nightly"))
    assert await done(q.list_schedules()) == []
    for change in (q.pause_schedule, q.resume_schedule, q.remove_schedule):
        with pytest.raises(ScheduleNotFoundError):
            await done(change("nightly"))


async def test_schedule_store_fires_each_fire_time_once(q: AnyQueue) -> None:
    store = q.schedule_store
    assert isinstance(store, ScheduleStore if isinstance(q, Queue) else AsyncScheduleStore)
    declared = q.schedule("hourly", {"x": 1}, cron="0 * * * *")
    await done(store.sync_declared([declared]))
    assert (await done(store.get("hourly"))).args == {"x": 1}
    with pytest.raises(ScheduleNotFoundError):
        await done(store.get("missing"))
    runtime = q.schedule("minutely", every=timedelta(minutes=1))
    assert await done(store.upsert(runtime)) is True
    assert await done(store.upsert(runtime)) is False
    await done(store.sync_declared([]))  # forgets code schedules only
    assert [s.name for s in await done(store.list())] == ["minutely"]

    fire_at = datetime(2030, 1, 1, 10, tzinfo=UTC)
    following = fire_at + timedelta(minutes=1)
    job_id = await done(store.fire("minutely", fire_at, following, "minutely@10:00"))
    assert job_id is not None
    assert await done(store.fire("minutely", fire_at, following, "minutely@10:00")) is None
    job = await done(q.get_job(job_id))
    assert (job.task, job.scheduled_for, job.unique_key) == ("minutely", fire_at, "minutely@10:00")
    await done(store.set_next_fire("minutely", None))
    assert (await done(store.get("minutely"))).next_fire_at is None
    await done(store.set_paused("minutely", True))
    assert await done(store.fire("minutely", following, None, "minutely@10:01")) is None
    await done(store.delete("minutely"))
    with pytest.raises(ScheduleNotFoundError):
        await done(store.delete("minutely"))


async def test_connection_pool_close_and_migrate(q: AnyQueue, postgres_dsn: str) -> None:
    await done(q.migrate())  # already at head: changes nothing
    pool = await done(q.pool())
    assert pool.max_size == q.pool_size
    if isinstance(q, AsyncQueue):
        async with q.connection(wait=5) as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    else:
        with q.connection(wait=5) as sync_conn:
            assert sync_conn.execute("SELECT 1").fetchone() == (1,)
    await done(q.close())
    assert pool.closed
    assert await done(q.enqueue("t")) > 0  # a closed queue opens a new pool on the next call
    q.use_dsn(postgres_dsn)
    assert q.dsn == postgres_dsn


async def test_tasks_and_periodic_enqueue_through_either_twin(q: AnyQueue, postgres_dsn: str) -> None:
    @q.task(queue="email", max_attempts=5)
    def send(to: str) -> None: ...

    @q.periodic(every=timedelta(hours=1))
    def tick() -> None: ...

    job = await done(q.get_job(await done(send.enqueue(to="a@b.c"))))
    assert (job.queue, job.max_attempts, job.args) == ("email", 5, {"to": "a@b.c"})
    conn = await caller_connection(q, postgres_dsn)
    try:
        bound = send.with_options(priority=1, conn=conn)
        bound_id = await done(bound.enqueue(to="x@y.z"))
        await done(conn.rollback())
    finally:
        await done(conn.close())
    with pytest.raises(JobNotFoundError):
        await done(q.get_job(bound_id))
    assert [s.name for s in q.declared_schedules] == ["tick"]


@pytest.mark.parametrize("kind", [Queue, AsyncQueue])
def test_like_keeps_every_setting(kind: type[AnyQueue], postgres_dsn: str) -> None:
    """The scheduler's and the admin's sync twin of an app's queue: ``notify=False`` and the
    connection settings survive (a scheduler of an ``AsyncQueue(notify=False)`` notified)."""
    original = kind(postgres_dsn, schema="elsewhere", notify=False, pool_size=3, connect_wait=1.5)
    original.schedule("s", every=timedelta(minutes=5))
    for twin in (Queue.like(original), AsyncQueue.like(original), Scheduler(original).queue):
        assert (twin.dsn, twin.schema) == (postgres_dsn, "elsewhere")
        assert (twin.notify, twin.connect_wait) == (False, 1.5)
        assert twin.registry is original.registry and twin.declared_schedules == original.declared_schedules
    assert Queue.like(original, pool_size=2).pool_size == 2


def _public(kind: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(kind) if not name.startswith("_")}


def test_every_public_method_of_both_twins_is_called_in_this_suite() -> None:
    assert _public(Queue) == _public(AsyncQueue)
    assert _public(ScheduleStore) == _public(AsyncScheduleStore)
    called = {
        node.attr
        for node in ast.walk(ast.parse(Path(__file__).read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
    }
    attributes = {"queries", "notify", "pool_size", "registry", "declared_schedules", "connection_role"}
    untested = (_public(Queue) | _public(ScheduleStore)) - called - attributes - {"connect_wait"}
    untested -= {"prepared_statements", "queue"}  # settings, not methods
    assert not untested, f"public methods no twin test calls: {sorted(untested)}"
