"""Bulk enqueue writes COPY text by hand, validates repeated options once and checks jobs as they
stream into COPY: prove all three exact."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgqueue import AsyncQueue, InvalidJobError, JobSpec, Queue
from pgqueue._enqueue import COPY_CHUNK_ROWS, Refused

AWKWARD_ARGS = [
    {"path": "C:\\temp\\new", "quote": 'say "hi"', "tab": "a\tb", "lines": "1\n2\r\n3"},
    {"unicode": "Grüße · 日本 · 🙂", "backslash_u": "\\u0000 is text here", "empty": ""},
    {"nested": {"list": [1, 2.5, None, True], "deep": {"x": "\\\\"}}},
]


def test_awkward_args_round_trip_exactly(queue: Queue) -> None:
    ids = queue.enqueue_many([{"task": "t", "args": a} for a in AWKWARD_ARGS])
    assert [queue.get_job(i).args for i in ids] == AWKWARD_ARGS


def test_every_option_of_every_job_is_stored(queue: Queue) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    fired = datetime(2029, 12, 31, tzinfo=UTC)
    ids = queue.enqueue_many(
        [
            JobSpec("a", {"n": 1}, queue="q1", priority=2, run_at=at, max_attempts=7, timeout=1.5),
            JobSpec("a", {"n": 2}, queue="q1", priority=2, run_at=at, max_attempts=7, timeout=1.5),
            JobSpec("b", None, queue="q2", delay=timedelta(hours=1), scheduled_for=fired),
        ]
    )
    first, second, third = (queue.get_job(i) for i in ids)
    for job, n in ((first, 1), (second, 2)):
        assert (job.task, job.queue, job.priority, job.run_at, job.max_attempts, job.timeout) == (
            "a",
            "q1",
            2,
            at,
            7,
            1.5,
        )
        assert job.args == {"n": n}
    assert third.args == {} and third.timeout is None and third.scheduled_for == fired
    assert third.run_at is not None and third.created_at is not None
    assert third.run_at - third.created_at == timedelta(hours=1)


@pytest.mark.parametrize("bad", [True, 1.0, "1"])
def test_a_repeated_option_set_never_lets_a_lookalike_value_through(queue: Queue, bad: object) -> None:
    jobs = [{"task": "t", "priority": 1, "args": {"i": i}} for i in range(3)]
    jobs.append({"task": "t", "priority": bad, "args": {"i": 3}})
    with pytest.raises(InvalidJobError, match="job #3: priority"):
        queue.enqueue_many(jobs)
    assert queue.enqueue_many([]) == []


def test_bad_args_later_in_a_repeated_option_set_are_refused(queue: Queue) -> None:
    jobs: list[dict[str, object]] = [{"task": "t", "args": {"i": i}} for i in range(5)]
    jobs.append({"task": "t", "args": {"when": datetime.now(UTC)}})
    with pytest.raises(InvalidJobError, match="job #5: job args are not JSON-serialisable"):
        queue.enqueue_many(jobs)


def test_registered_signature_is_checked_for_every_job(queue: Queue) -> None:
    @queue.task()
    def greet(name: str) -> None: ...

    jobs: list[dict[str, object]] = [{"task": "greet", "args": {"name": str(i)}} for i in range(5)]
    jobs.append({"task": "greet", "args": {"nme": "typo"}})
    with pytest.raises(InvalidJobError, match="job #5: arguments do not fit task 'greet'"):
        queue.enqueue_many(jobs)


# A job this far into a batch is checked while the COPY streams, after the first chunk went out.
DEEP = COPY_CHUNK_ROWS * 2 + 5


def test_a_bad_job_deep_in_a_batch_aborts_its_copy_and_writes_nothing(
    queue: Queue, count: Callable[..., int]
) -> None:
    jobs: list[dict[str, Any]] = [{"task": "t", "args": {"i": i}} for i in range(DEEP + 50)]
    jobs[DEEP] = {"task": "t", "args": {"i": "a\x00b"}}
    with pytest.raises(InvalidJobError, match=rf"job #{DEEP}: job args hold a NUL") as caught:
        queue.enqueue_many(jobs)
    assert not isinstance(caught.value, Refused)
    assert count() == 0
    # The pooled connection that carried the aborted COPY goes on working.
    assert len(queue.enqueue_many([{"task": "t"}] * 10)) == 10
    assert count() == 10


async def test_async_a_bad_job_deep_in_a_batch_writes_nothing(
    async_queue: AsyncQueue, count: Callable[..., int]
) -> None:
    jobs: list[JobSpec] = [JobSpec("t", {"i": i}, priority=3) for i in range(DEEP + 50)]
    jobs[DEEP] = JobSpec("t", {"i": DEEP}, priority=0)
    with pytest.raises(InvalidJobError, match=rf"job #{DEEP}: priority"):
        await async_queue.enqueue_many(jobs)
    assert count() == 0
    jobs[DEEP] = JobSpec("t", {"i": DEEP}, priority=3)
    assert len(await async_queue.enqueue_many(jobs)) == DEEP + 50
    assert count() == DEEP + 50


def test_a_batch_refused_before_any_io_names_its_first_bad_job() -> None:
    """Bad jobs of the first chunk are refused without a database: nothing listens on port 9."""
    with Queue("postgresql://nobody@127.0.0.1:9/none", connect_wait=30) as q:
        started = time.monotonic()
        with pytest.raises(InvalidJobError, match="job #3: priority"):
            q.enqueue_many([{"task": "t"}] * 3 + [{"task": "t", "priority": 11}])
        assert time.monotonic() - started < 1


def test_jobs_due_now_run_at_the_transactions_clock(queue: Queue) -> None:
    """A batch with no delays leaves run_at to its default; one with a delayed job sends every
    run time: either way each job's run_at is the enqueue transaction's clock (plus its delay)."""
    at = datetime(2031, 1, 1, tzinfo=UTC)
    due_now = queue.enqueue_many([JobSpec("t", {"i": i}) for i in range(DEEP)])
    mixed = queue.enqueue_many([JobSpec("t"), JobSpec("t", delay=90), JobSpec("t", run_at=at)])

    def offset(job_id: int) -> timedelta:
        job = queue.get_job(job_id)
        assert job.run_at is not None and job.created_at is not None
        return job.run_at - job.created_at

    assert {offset(i) for i in due_now} == {timedelta(0)}
    assert [offset(i) for i in mixed[:2]] == [timedelta(0), timedelta(seconds=90)]
    assert queue.get_job(mixed[2]).run_at == at


def test_a_batch_given_as_a_generator_is_read_once_and_stored_in_order(queue: Queue) -> None:
    ids = queue.enqueue_many({"task": "t", "args": {"i": i}} for i in range(DEEP))
    assert len(ids) == DEEP == len(set(ids))
    assert [queue.get_job(i).args["i"] for i in ids[:: COPY_CHUNK_ROWS // 2]] == list(range(DEEP))[
        :: COPY_CHUNK_ROWS // 2
    ]


def test_a_deep_refusal_on_the_callers_autocommit_connection_leaves_it_usable(
    queue: Queue, postgres_dsn: str, count: Callable[..., int]
) -> None:
    """Outside any transaction, the batch runs in one of its own on the caller's connection: the
    aborted COPY rolls that back and the connection is idle again."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        jobs: list[dict[str, Any]] = [{"task": "t"}] * DEEP + [{"task": "t", "max_attempts": 0}]
        with pytest.raises(InvalidJobError, match=f"job #{DEEP}: max_attempts"):
            queue.enqueue_many(jobs, conn=conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert count() == 0
        assert len(queue.enqueue_many(jobs[:DEEP], conn=conn)) == DEEP
    assert count() == DEEP


def test_a_connection_lost_mid_copy_writes_the_batch_once_on_a_new_one(
    queue: Queue, postgres_dsn: str, pgqueue_schema: str, count: Callable[..., int]
) -> None:
    """The server connection dies while the COPY streams (killed as a job deep in the batch is
    checked): the half-sent batch is rolled back with it, and the batch is written once, in
    full, on a fresh connection."""

    class KillsTheCopy(dict[str, Any]):
        kills = 0

        def __iter__(self) -> Iterator[str]:
            if not KillsTheCopy.kills:
                KillsTheCopy.kills += 1
                with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                    killed = admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE query LIKE %s AND pid <> pg_backend_pid()",
                        [f'%COPY "{pgqueue_schema}".jobs%FROM STDIN%'],
                    ).fetchall()
                assert killed == [(True,)]
            return super().__iter__()

    jobs = [JobSpec("t", {"i": i}) for i in range(DEEP * 2)]
    jobs[DEEP] = JobSpec("t", KillsTheCopy(i=DEEP))
    ids = queue.enqueue_many(jobs)
    assert KillsTheCopy.kills == 1
    assert count() == DEEP * 2 == len(set(ids))
    assert [queue.get_job(i).args for i in ids[DEEP - 1 : DEEP + 2]] == [
        {"i": i} for i in range(DEEP - 1, DEEP + 2)
    ]
