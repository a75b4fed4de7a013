"""AsyncQueue is the twin of Queue: the same behaviour, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgqueue import AsyncQueue, JobNotFoundError, JobSpec, JobState, Queue


def bury(
    db: psycopg.Connection[Any],
    schema: str,
    job_id: int,
    queue_name: str = "default",
    unique_key: str | None = None,
) -> None:
    db.execute(
        sql.SQL(
            "INSERT INTO {}.dead_letter (id, queue, task, args, priority, attempts, max_attempts,"
            " unique_key, errors, created_at) VALUES (%s, %s, 'flaky', '{{\"n\": 1}}', 5, 2, 2,"
            ' %s, \'[{{"attempt": 1}}, {{"attempt": 2}}]\', now())'
        ).format(sql.Identifier(schema)),
        [job_id, queue_name, unique_key],
    )


def test_the_twins_have_the_same_public_methods() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    assert public(Queue) == public(AsyncQueue)


async def test_enqueue_and_get_job(async_queue: AsyncQueue) -> None:
    job_id = await async_queue.enqueue(
        "reports.build",
        {"month": "2026-11"},
        queue="reports",
        priority=2,
        max_attempts=4,
        timeout=1.5,
    )
    job = await async_queue.get_job(job_id)
    assert (job.id, job.task, job.args, job.queue, job.priority, job.max_attempts, job.timeout) == (
        job_id,
        "reports.build",
        {"month": "2026-11"},
        "reports",
        2,
        4,
        1.5,
    )
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.errors == []
    assert not job.is_delayed


async def test_get_job_of_unknown_id_raises(async_queue: AsyncQueue) -> None:
    with pytest.raises(JobNotFoundError):
        await async_queue.get_job(99999999)


async def test_task_decorator(async_queue: AsyncQueue) -> None:
    @async_queue.task(queue="email", priority=5, max_attempts=5, timeout=30)
    async def send_email(to: str, subject: str) -> None: ...

    job = await async_queue.get_job(await send_email.enqueue(to="a@b.c", subject="hi"))
    assert (job.task, job.queue, job.max_attempts, job.timeout, job.args) == (
        "send_email",
        "email",
        5,
        30.0,
        {"to": "a@b.c", "subject": "hi"},
    )
    delayed = await send_email.with_options(delay=timedelta(minutes=5)).enqueue(to="x", subject="y")
    assert (await async_queue.get_job(delayed)).is_delayed


async def test_enqueue_by_name_without_a_registered_task(postgres_dsn: str, pgqueue_schema: str) -> None:
    async with AsyncQueue(postgres_dsn, schema=pgqueue_schema) as producer:
        job = await producer.get_job(await producer.enqueue("elsewhere.defined", {"a": [1]}))
    assert (job.task, job.args, job.queue, job.priority) == (
        "elsewhere.defined",
        {"a": [1]},
        "default",
        5,
    )


async def test_delay_and_run_at(async_queue: AsyncQueue) -> None:
    when = datetime(2035, 6, 7, 8, 9, 10, tzinfo=UTC)
    assert (await async_queue.get_job(await async_queue.enqueue("x", run_at=when))).run_at == when
    job = await async_queue.get_job(await async_queue.enqueue("x", delay=120))
    assert job.is_delayed and job.run_at is not None
    assert job.run_at - job.created_at >= timedelta(seconds=120)


async def test_cancel(async_queue: AsyncQueue) -> None:
    job_id = await async_queue.enqueue("x")
    assert await async_queue.cancel(job_id) is True
    assert (await async_queue.get_job(job_id)).state is JobState.CANCELLED
    assert await async_queue.cancel(job_id) is False
    assert await async_queue.cancel(123456789) is False


async def test_cancel_by_key(async_queue: AsyncQueue) -> None:
    held = await async_queue.enqueue("x", unique_key="user:5", queue="q1")
    other = await async_queue.enqueue("x", unique_key="user:5", queue="q2")
    assert await async_queue.cancel_by_key("user:5", queue="q1") == 1
    assert (await async_queue.get_job(held)).state is JobState.CANCELLED
    assert (await async_queue.get_job(other)).state is JobState.QUEUED
    assert await async_queue.cancel_by_key("user:5") == 1
    assert await async_queue.cancel_by_key("user:5") == 0


async def test_unique_key(async_queue: AsyncQueue, count: Callable[..., int]) -> None:
    first = await async_queue.enqueue("x", {"v": 1}, unique_key="k")
    assert await async_queue.enqueue("x", {"v": 2}, unique_key="k") == first
    assert count() == 1


async def test_50_concurrent_connections_enqueue_one_key(
    async_queue: AsyncQueue, postgres_dsn: str, count: Callable[..., int]
) -> None:
    n = 50
    conns = [await psycopg.AsyncConnection.connect(postgres_dsn) for _ in range(n)]
    start = asyncio.Event()

    async def enqueue(conn: psycopg.AsyncConnection[Any]) -> int:
        async with conn.transaction():
            await start.wait()
            return await async_queue.enqueue("signup", unique_key="signup:1", conn=conn)

    try:
        tasks = [asyncio.create_task(enqueue(c)) for c in conns]
        await asyncio.sleep(0.05)
        start.set()
        results = await asyncio.gather(*tasks)
    finally:
        for c in conns:
            await c.close()
    assert len(set(results)) == 1
    assert count() == 1


async def test_50_concurrent_enqueues_through_the_pool(
    async_queue: AsyncQueue, count: Callable[..., int]
) -> None:
    results = await asyncio.gather(
        *(async_queue.enqueue("signup", {"i": i}, unique_key="signup:2") for i in range(50))
    )
    assert len(set(results)) == 1
    assert count() == 1


async def test_enqueue_many_10000_jobs(
    async_queue: AsyncQueue, db: psycopg.Connection[Any], pgqueue_schema: str
) -> None:
    n = 10_000
    ids = await async_queue.enqueue_many(
        JobSpec("bulk.item", {"i": i}, priority=1 + i % 10) for i in range(n)
    )
    assert len(ids) == n and len(set(ids)) == n
    rows = db.execute(
        sql.SQL("SELECT id, task, args, priority FROM {}.jobs").format(sql.Identifier(pgqueue_schema))
    ).fetchall()
    assert len(rows) == n
    by_id = {row[0]: row[1:] for row in rows}
    assert all(by_id[job_id] == ("bulk.item", {"i": i}, 1 + i % 10) for i, job_id in enumerate(ids))


async def test_enqueue_many_with_unique_keys(async_queue: AsyncQueue, count: Callable[..., int]) -> None:
    held = await async_queue.enqueue("x", {"v": "held"}, unique_key="held")
    ids = await async_queue.enqueue_many(
        [
            {"task": "x", "args": {"v": 0}, "unique_key": "a"},
            {"task": "x", "args": {"v": 1}, "unique_key": "held"},
            {"task": "x", "args": {"v": 2}, "unique_key": "a"},
            {"task": "x", "args": {"v": 3}},
        ]
    )
    a, again, dup, free = ids
    assert again == held and dup == a and len({a, held, free}) == 3
    assert count() == 3
    assert (await async_queue.get_job(a)).args == {"v": 0}
    assert (await async_queue.get_job(free)).args == {"v": 3}


async def test_enqueue_many_of_nothing(async_queue: AsyncQueue, count: Callable[..., int]) -> None:
    assert await async_queue.enqueue_many([]) == []
    assert count() == 0


async def test_dead_letter_and_retry(
    async_queue: AsyncQueue,
    db: psycopg.Connection[Any],
    pgqueue_schema: str,
    count: Callable[..., int],
) -> None:
    bury(db, pgqueue_schema, 41, queue_name="a")
    bury(db, pgqueue_schema, 42, queue_name="a")
    bury(db, pgqueue_schema, 43, queue_name="b")
    dead = await async_queue.get_job(41)
    assert dead.state is JobState.DEAD and len(dead.errors) == 2
    assert await async_queue.retry_dead(41) is True
    job = await async_queue.get_job(41)
    assert (job.state, job.attempts, job.args, len(job.errors)) == (JobState.QUEUED, 0, {"n": 1}, 2)
    assert await async_queue.retry_dead(41) is False
    assert await async_queue.retry_all_dead("a") == 1
    assert await async_queue.retry_all_dead() == 1
    assert count("dead_letter") == 0 and count() == 3


async def test_async_retry_dead_respects_a_held_unique_key(
    async_queue: AsyncQueue, db: psycopg.Connection[Any], pgqueue_schema: str
) -> None:
    await async_queue.enqueue("flaky", unique_key="k")
    bury(db, pgqueue_schema, 51, unique_key="k")
    assert await async_queue.retry_dead(51) is False
    assert (await async_queue.get_job(51)).state is JobState.DEAD
