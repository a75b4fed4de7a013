"""Enqueue, inspect, cancel and retry with the synchronous Queue, against a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgqueue import (
    JobNotFoundError,
    JobSpec,
    JobState,
    PgQueueError,
    Queue,
)


def server_now(db: psycopg.Connection[Any]) -> datetime:
    row = db.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def jobs_table(queue: Queue) -> sql.Composed:
    return sql.SQL("{}.jobs").format(sql.Identifier(queue.schema))


def finish(db: psycopg.Connection[Any], queue: Queue, job_id: int) -> None:
    """Complete a job as a worker's acknowledgement does: its row moves to finished_jobs."""
    cols = (
        "id, queue, task, args, priority, run_at, attempts, max_attempts, timeout, unique_key,"
        " scheduled_for, worker_id, progress, result, errors, created_at, started_at"
    )
    db.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {s}.jobs WHERE id = %s RETURNING *)"
            " INSERT INTO {s}.finished_jobs ({c}, state, finished_at)"
            " SELECT {c}, 'completed', now() FROM moved"
        ).format(s=sql.Identifier(queue.schema), c=sql.SQL(cols)),
        [job_id],
    )


def bury(
    db: psycopg.Connection[Any],
    queue: Queue,
    job_id: int,
    *,
    queue_name: str = "default",
    task: str = "flaky",
    unique_key: str | None = None,
) -> None:
    """Put a dead-lettered job in place, as a worker does after the last failed attempt."""
    db.execute(
        sql.SQL(
            "INSERT INTO {}.dead_letter (id, queue, task, args, priority, attempts, max_attempts,"
            " timeout, unique_key, errors, created_at, started_at, failed_at) VALUES"
            " (%s, %s, %s, %s::jsonb, 3, 3, 3, 12.5, %s, %s::jsonb, now() - interval '1 hour',"
            " now() - interval '1 minute', now())"
        ).format(sql.Identifier(queue.schema)),
        [
            job_id,
            queue_name,
            task,
            '{"order": 7}',
            unique_key,
            '[{"attempt": 1, "message": "boom"}, {"attempt": 2, "message": "boom"},'
            ' {"attempt": 3, "message": "boom"}]',
        ],
    )


# ---------------------------------------------------------------------------- enqueue, get_job


def test_enqueue_stores_the_job_with_defaults(queue: Queue, db: psycopg.Connection[Any]) -> None:
    before = server_now(db)
    job_id = queue.enqueue("reports.build", {"month": "2026-11", "pages": [1, 2]})
    job = queue.get_job(job_id)
    assert job.id == job_id
    assert job.task == "reports.build"
    assert job.args == {"month": "2026-11", "pages": [1, 2]}
    assert job.queue == "default"
    assert job.priority == 5
    assert job.state is JobState.QUEUED
    assert job.attempts == 0
    assert job.max_attempts == 3
    assert job.timeout is None
    assert job.unique_key is None
    assert job.errors == []
    assert job.progress is None and job.result is None
    assert job.started_at is None and job.finished_at is None
    assert job.created_at >= before
    assert job.run_at is not None and before <= job.run_at <= server_now(db)
    assert not job.is_delayed


def test_enqueue_without_args_stores_an_empty_object(queue: Queue) -> None:
    assert queue.get_job(queue.enqueue("tick")).args == {}


def test_enqueue_options_are_stored(queue: Queue) -> None:
    job_id = queue.enqueue(
        "x",
        {"a": 1},
        queue="email",
        priority=1,
        max_attempts=7,
        timeout=2.5,
        unique_key="welcome:42",
    )
    job = queue.get_job(job_id)
    assert (job.queue, job.priority, job.max_attempts, job.timeout, job.unique_key) == (
        "email",
        1,
        7,
        2.5,
        "welcome:42",
    )


def test_args_round_trip_exactly(queue: Queue) -> None:
    args = {
        "text": "héllo — 日本 🎉",
        "big": 2**62,
        "neg": -1.5,
        "none": None,
        "flag": False,
        "nested": {"list": [1, "two", {"three": 3}]},
        "empty": {},
        "quote": 'it\'s "x"',
    }
    assert queue.get_job(queue.enqueue("x", args)).args == args


def test_ids_are_distinct_and_increasing(queue: Queue) -> None:
    ids = [queue.enqueue("x", {"i": i}) for i in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20


def test_get_job_of_unknown_id_raises(queue: Queue) -> None:
    with pytest.raises(JobNotFoundError) as caught:
        queue.get_job(123456789)
    assert isinstance(caught.value, PgQueueError) and isinstance(caught.value, LookupError)


def test_delay_makes_a_delayed_job(queue: Queue, db: psycopg.Connection[Any]) -> None:
    before = server_now(db)
    job = queue.get_job(queue.enqueue("later", delay=timedelta(minutes=5)))
    assert job.state is JobState.QUEUED and job.is_delayed
    assert job.run_at is not None
    assert before + timedelta(minutes=5) <= job.run_at <= server_now(db) + timedelta(minutes=5)
    seconds = queue.get_job(queue.enqueue("later", delay=90))
    assert seconds.run_at is not None and seconds.run_at >= before + timedelta(seconds=90)
    assert seconds.is_delayed


def test_run_at_is_stored_as_given(queue: Queue) -> None:
    when = datetime(2031, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    job = queue.get_job(queue.enqueue("future", run_at=when))
    assert job.run_at == when and job.is_delayed
    past = datetime(2001, 1, 1, tzinfo=UTC)
    job = queue.get_job(queue.enqueue("overdue", run_at=past))
    assert job.run_at == past and not job.is_delayed


def test_zero_delay_is_not_delayed(queue: Queue) -> None:
    assert not queue.get_job(queue.enqueue("now", delay=0)).is_delayed


# ---------------------------------------------------------------------------- tasks


def test_task_decorator_defaults_and_overrides(queue: Queue) -> None:
    @queue.task(queue="email", priority=4, max_attempts=5, timeout=30)
    def send_email(to: str, subject: str = "hi") -> None: ...

    job = queue.get_job(send_email.enqueue(to="a@b.c", subject="hello"))
    assert (job.task, job.queue, job.priority, job.max_attempts, job.timeout) == (
        "send_email",
        "email",
        4,
        5,
        30.0,
    )
    assert job.args == {"to": "a@b.c", "subject": "hello"}

    # By name, with per-call options winning over the task's defaults.
    job = queue.get_job(queue.enqueue("send_email", {"to": "x@y.z"}, priority=1, queue="urgent"))
    assert (job.queue, job.priority, job.max_attempts, job.timeout) == ("urgent", 1, 5, 30.0)

    bound = send_email.with_options(priority=9, delay=60, unique_key="mail:1")
    job = queue.get_job(bound.enqueue(to="q@r.s"))
    assert (job.queue, job.priority, job.unique_key, job.is_delayed) == ("email", 9, "mail:1", True)

    # Calling the task runs it in-process, enqueueing nothing new.
    assert send_email(to="a@b.c") is None


def test_task_name_can_be_chosen(queue: Queue) -> None:
    @queue.task(name="billing.charge")
    def charge(amount: int) -> None: ...

    assert charge.name == "billing.charge"
    assert queue.get_job(charge.enqueue(amount=3)).task == "billing.charge"


def test_bare_decorator(queue: Queue) -> None:
    @queue.task
    def ping() -> None: ...

    job = queue.get_job(ping.enqueue())
    assert (job.task, job.queue, job.priority, job.max_attempts) == ("ping", "default", 5, 3)


def test_enqueue_by_name_of_a_task_this_process_never_registered(
    postgres_dsn: str, pgqueue_schema: str
) -> None:
    """A producer-only app: no handlers imported, jobs still go in with the defaults."""
    with Queue(postgres_dsn, schema=pgqueue_schema) as producer:
        assert len(producer.registry) == 0
        job_id = producer.enqueue(
            "billing.invoices:send-reminder", {"invoice": 17}, queue="billing", priority=2
        )
        job = producer.get_job(job_id)
    assert (job.task, job.args, job.queue, job.priority, job.max_attempts) == (
        "billing.invoices:send-reminder",
        {"invoice": 17},
        "billing",
        2,
        3,
    )


# ---------------------------------------------------------------------------- cancel


def test_cancel_a_queued_job(queue: Queue) -> None:
    job_id = queue.enqueue("x")
    other = queue.enqueue("x")
    assert queue.cancel(job_id) is True
    job = queue.get_job(job_id)
    assert job.state is JobState.CANCELLED and job.finished_at is not None
    assert queue.cancel(job_id) is False
    assert queue.get_job(job_id).state is JobState.CANCELLED
    assert queue.get_job(other).state is JobState.QUEUED


def test_cancel_unknown_job_returns_false(queue: Queue) -> None:
    assert queue.cancel(987654321) is False


def test_cancel_a_running_job_asks_it_to_stop(queue: Queue, db: psycopg.Connection[Any]) -> None:
    job_id = queue.enqueue("long")
    db.execute(
        sql.SQL("UPDATE {} SET state = 'running', attempts = 1, started_at = now() WHERE id = %s").format(
            jobs_table(queue)
        ),
        [job_id],
    )
    assert queue.cancel(job_id) is True
    row = db.execute(
        sql.SQL("SELECT state::text, cancel_requested FROM {} WHERE id = %s").format(jobs_table(queue)),
        [job_id],
    ).fetchone()
    assert row == ("running", True)  # the worker stops it and records the outcome


def test_cancel_a_finished_job_returns_false(queue: Queue, db: psycopg.Connection[Any]) -> None:
    job_id = queue.enqueue("done")
    finish(db, queue, job_id)
    assert queue.cancel(job_id) is False
    assert queue.get_job(job_id).state is JobState.COMPLETED


def test_cancel_by_key(queue: Queue) -> None:
    held = queue.enqueue("follow_up", unique_key="user:1", queue="mail")
    elsewhere = queue.enqueue("follow_up", unique_key="user:1", queue="sms")
    untouched = queue.enqueue("follow_up", unique_key="user:2", queue="mail")
    assert queue.cancel_by_key("user:1", queue="mail") == 1
    assert queue.get_job(held).state is JobState.CANCELLED
    assert queue.get_job(elsewhere).state is JobState.QUEUED
    assert queue.get_job(untouched).state is JobState.QUEUED
    assert queue.cancel_by_key("user:1", queue="mail") == 0
    # Without a queue it cancels the key in every queue.
    assert queue.cancel_by_key("user:1") == 1
    assert queue.get_job(elsewhere).state is JobState.CANCELLED
    # The key is free again.
    fresh = queue.enqueue("follow_up", unique_key="user:1", queue="mail")
    assert fresh not in (held, elsewhere)


# ---------------------------------------------------------------------------- unique keys


def test_unique_key_returns_the_live_holder(queue: Queue, count: Callable[..., int]) -> None:
    first = queue.enqueue("welcome", {"user": 42}, unique_key="welcome:42")
    again = queue.enqueue("welcome", {"user": 43}, unique_key="welcome:42", priority=1)
    assert again == first
    assert count() == 1
    assert queue.get_job(first).args == {"user": 42}  # the holder is left as it was
    assert queue.get_job(first).priority == 5


def test_unique_key_is_per_queue(queue: Queue, count: Callable[..., int]) -> None:
    a = queue.enqueue("welcome", unique_key="k", queue="a")
    b = queue.enqueue("welcome", unique_key="k", queue="b")
    assert a != b and count() == 2


def test_unique_key_is_held_while_running_and_released_when_finished(
    queue: Queue, db: psycopg.Connection[Any]
) -> None:
    first = queue.enqueue("welcome", unique_key="k")
    db.execute(sql.SQL("UPDATE {} SET state = 'running' WHERE id = %s").format(jobs_table(queue)), [first])
    assert queue.enqueue("welcome", unique_key="k") == first
    finish(db, queue, first)
    second = queue.enqueue("welcome", unique_key="k")
    assert second != first
    assert queue.get_job(second).state is JobState.QUEUED


def test_50_threads_enqueue_the_same_key_and_get_one_job(
    queue: Queue, postgres_dsn: str, count: Callable[..., int]
) -> None:
    """Each thread has its own connection and its own transaction, all started together."""
    n = 50
    conns = [psycopg.connect(postgres_dsn) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list[int | BaseException] = [0] * n

    def enqueue(i: int) -> None:
        try:
            with conns[i].transaction():
                barrier.wait(timeout=30)
                results[i] = queue.enqueue("signup", {"caller": i}, unique_key="signup:7", conn=conns[i])
        except BaseException as exc:
            results[i] = exc

    try:
        threads = [threading.Thread(target=enqueue, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c in conns:
            c.close()
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1
    assert count() == 1
    (job_id,) = set(results)
    assert queue.get_job(job_id).unique_key == "signup:7"  # type: ignore[arg-type]


def test_50_threads_through_the_pool(
    postgres_dsn: str, pgqueue_schema: str, count: Callable[..., int]
) -> None:
    n = 50
    barrier = threading.Barrier(n)
    results: list[int | BaseException] = [0] * n
    with Queue(postgres_dsn, schema=pgqueue_schema, pool_size=20) as queue:

        def enqueue(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                results[i] = queue.enqueue("signup", {"caller": i}, unique_key="signup:8")
            except BaseException as exc:
                results[i] = exc

        threads = [threading.Thread(target=enqueue, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1 and count() == 1


def test_unique_key_holder_rolling_back_lets_the_waiter_insert(
    queue: Queue, postgres_dsn: str, count: Callable[..., int]
) -> None:
    """The second enqueue waits on the first's uncommitted row, then inserts its own."""
    holder = psycopg.connect(postgres_dsn)
    try:
        holder_id = queue.enqueue("x", unique_key="k", conn=holder)
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(queue.enqueue("x", unique_key="k")))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()  # blocked on the holder's row
        holder.rollback()
        waiter.join(timeout=10)
    finally:
        holder.close()
    assert result and result[0] != holder_id
    assert count() == 1
    assert queue.get_job(result[0]).state is JobState.QUEUED


def test_unique_key_holder_committing_gives_the_waiter_its_id(
    queue: Queue, postgres_dsn: str, count: Callable[..., int]
) -> None:
    holder = psycopg.connect(postgres_dsn)
    try:
        holder_id = queue.enqueue("x", unique_key="k", conn=holder)
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(queue.enqueue("x", unique_key="k")))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()
        holder.commit()
        waiter.join(timeout=10)
    finally:
        holder.close()
    assert result == [holder_id]
    assert count() == 1


# ---------------------------------------------------------------------------- enqueue_many


def test_enqueue_many_10000_jobs_each_with_its_own_args(queue: Queue, db: psycopg.Connection[Any]) -> None:
    n = 10_000
    ids = queue.enqueue_many({"task": "bulk.item", "args": {"i": i, "tag": f"t{i}"}} for i in range(n))
    assert len(ids) == n and len(set(ids)) == n
    rows = db.execute(
        sql.SQL("SELECT id, task, args, queue, priority, state::text FROM {}").format(jobs_table(queue))
    ).fetchall()
    assert len(rows) == n
    by_id = {row[0]: row for row in rows}
    for i, job_id in enumerate(ids):
        _, task, args, queue_name, priority, state = by_id[job_id]
        assert (task, args, queue_name, priority, state) == (
            "bulk.item",
            {"i": i, "tag": f"t{i}"},
            "default",
            5,
            "queued",
        )
    assert queue.get_job(ids[1234]).args == {"i": 1234, "tag": "t1234"}


def test_enqueue_many_applies_per_job_options_and_task_defaults(
    queue: Queue, db: psycopg.Connection[Any]
) -> None:
    @queue.task(queue="email", priority=3, max_attempts=6, timeout=9)
    def send(to: str) -> None: ...

    when = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    before = server_now(db)
    ids = queue.enqueue_many(
        [
            JobSpec("send", {"to": "a"}),
            {"task": "send", "args": {"to": "b"}, "priority": 1, "queue": "vip"},
            JobSpec("other", {"n": 1}, delay=timedelta(minutes=10), max_attempts=1),
            {"task": "other", "run_at": when, "timeout": 0.5},
        ]
    )
    a, b, c, d = (queue.get_job(i) for i in ids)
    assert (a.queue, a.priority, a.max_attempts, a.timeout, a.args) == (
        "email",
        3,
        6,
        9.0,
        {"to": "a"},
    )
    assert (b.queue, b.priority, b.max_attempts) == ("vip", 1, 6)
    assert (c.queue, c.priority, c.max_attempts, c.is_delayed) == ("default", 5, 1, True)
    assert c.run_at is not None and c.run_at >= before + timedelta(minutes=10)
    assert (d.run_at, d.timeout, d.args) == (when, 0.5, {})
    assert not a.is_delayed and a.run_at is not None and a.run_at <= server_now(db)


def test_enqueue_many_of_nothing(queue: Queue, count: Callable[..., int]) -> None:
    assert queue.enqueue_many([]) == []
    assert count() == 0


def test_enqueue_many_with_unique_keys(queue: Queue, count: Callable[..., int]) -> None:
    held = queue.enqueue("welcome", {"v": "old"}, unique_key="held")
    other_queue = queue.enqueue("welcome", unique_key="k1", queue="elsewhere")
    ids = queue.enqueue_many(
        [
            {"task": "welcome", "args": {"v": 0}, "unique_key": "k1"},
            {"task": "welcome", "args": {"v": 1}, "unique_key": "k2"},
            {"task": "welcome", "args": {"v": 2}, "unique_key": "k1"},  # duplicate in the batch
            {"task": "welcome", "args": {"v": 3}},  # no key
            {"task": "welcome", "args": {"v": 4}, "unique_key": "held"},  # already held
            {"task": "welcome", "args": {"v": 5}, "unique_key": "k2"},
            {"task": "welcome", "args": {"v": 6}},
        ]
    )
    k1, k2, dup, free, again, dup2, free2 = ids
    assert dup == k1 and dup2 == k2 and again == held
    assert len({k1, k2, free, free2, held, other_queue}) == 6
    assert count() == 6  # held, other_queue, k1, k2 and the two without a key
    assert queue.get_job(k1).args == {"v": 0}
    assert queue.get_job(k2).args == {"v": 1}
    assert queue.get_job(free).args == {"v": 3}
    assert queue.get_job(free2).args == {"v": 6}
    assert queue.get_job(held).args == {"v": "old"}
    # Enqueueing the same batch again inserts nothing and returns the same ids.
    assert queue.enqueue_many([{"task": "welcome", "unique_key": k} for k in ("k1", "k2", "held")]) == [
        k1,
        k2,
        held,
    ]
    assert count() == 6


# ---------------------------------------------------------------------------- dead letter


def test_get_job_finds_dead_lettered_jobs(queue: Queue, db: psycopg.Connection[Any]) -> None:
    bury(db, queue, 500)
    job = queue.get_job(500)
    assert job.state is JobState.DEAD
    assert (job.task, job.args, job.attempts, job.max_attempts) == ("flaky", {"order": 7}, 3, 3)
    assert [e["attempt"] for e in job.errors] == [1, 2, 3]
    assert job.finished_at is not None
    assert not job.is_delayed


def test_retry_dead_moves_the_job_back_with_its_id(
    queue: Queue, db: psycopg.Connection[Any], count: Callable[..., int]
) -> None:
    bury(db, queue, 700, unique_key="order:7")
    assert queue.retry_dead(700) is True
    job = queue.get_job(700)
    assert job.state is JobState.QUEUED and not job.is_delayed
    assert (job.task, job.args, job.queue, job.priority, job.max_attempts, job.timeout) == (
        "flaky",
        {"order": 7},
        "default",
        3,
        3,
        12.5,
    )
    assert job.attempts == 0  # fresh attempts
    assert len(job.errors) == 3  # history kept
    assert job.unique_key == "order:7"
    assert count("dead_letter") == 0 and count() == 1
    assert queue.retry_dead(700) is False
    # The retried job holds its unique key again.
    assert queue.enqueue("flaky", unique_key="order:7") == 700


def test_retry_dead_of_unknown_id_returns_false(queue: Queue) -> None:
    assert queue.retry_dead(424242) is False


def test_retry_all_dead(queue: Queue, db: psycopg.Connection[Any], count: Callable[..., int]) -> None:
    bury(db, queue, 801, queue_name="a")
    bury(db, queue, 802, queue_name="a")
    bury(db, queue, 803, queue_name="b")
    assert queue.retry_all_dead("a") == 2
    assert {queue.get_job(i).state for i in (801, 802)} == {JobState.QUEUED}
    assert queue.get_job(803).state is JobState.DEAD
    assert queue.retry_all_dead() == 1
    assert count("dead_letter") == 0 and count() == 3


def test_retry_dead_never_makes_a_second_live_job_with_one_key(
    queue: Queue, count: Callable[..., int], db: psycopg.Connection[Any]
) -> None:
    live = queue.enqueue("flaky", unique_key="order:7")
    bury(db, queue, 900, unique_key="order:7")
    bury(db, queue, 901)
    assert queue.retry_dead(900) is False  # the key is held: it stays dead
    assert queue.get_job(900).state is JobState.DEAD
    assert queue.retry_all_dead() == 1  # the others still go back
    assert queue.get_job(901).state is JobState.QUEUED
    assert queue.get_job(900).state is JobState.DEAD
    assert queue.cancel(live) is True  # once the key is free, it can be retried
    assert queue.retry_dead(900) is True
    assert queue.get_job(900).state is JobState.QUEUED
    assert count("dead_letter") == 0


def test_retry_all_dead_moves_one_of_the_dead_jobs_sharing_a_key(
    queue: Queue, count: Callable[..., int], db: psycopg.Connection[Any]
) -> None:
    bury(db, queue, 910, unique_key="k")
    bury(db, queue, 911, unique_key="k")
    assert queue.retry_all_dead() == 1
    assert queue.get_job(911).state is JobState.QUEUED
    assert queue.get_job(910).state is JobState.DEAD
    assert count("jobs", "unique_key = 'k'") == 1


def test_enqueue_many_copies_awkward_text_exactly(queue: Queue) -> None:
    """Bulk enqueue goes through COPY, whose text format has escapes of its own."""
    awkward = [
        "tab\there",
        "new\nline",
        "back\\slash",
        "\\N",
        "\\.",
        "crlf\r\n",
        "日本 🎉",
        "\\u0000 as text",
        'quote"s',
        "",
        "end\\",
    ]
    ids = queue.enqueue_many([{"task": "x", "args": {"s": s}} for s in awkward])
    assert [queue.get_job(i).args for i in ids] == [{"s": s} for s in awkward]
