"""The completer writes a batch of outcomes in one statement; one the server refuses is isolated.

pgqueue checks results before they reach a batch, so a refused row is what slips past those
checks (a value PostgreSQL rejects for a reason the worker did not foresee). Simulated here
with result text that is not JSON at all, built by hand: the other outcomes of the batch must
be written, and the bad one recorded as a failure instead of jamming every later flush.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql
from worker_helpers import Db

from pgqueue import Queue
from pgqueue.worker import completer as completer_module
from pgqueue.worker.completer import Completer
from pgqueue.worker.db import ServiceConnection
from pgqueue.worker.execution import ClaimedJob, Outcome


def claimed(db: Db, queue: Queue, count: int, max_attempts: int) -> list[ClaimedJob]:
    ids = queue.enqueue_many([{"task": "t", "max_attempts": max_attempts}] * count)
    token = uuid.uuid4()
    db.rows(
        "UPDATE {jobs} SET state = 'running', attempts = 1, started_at = now(), worker_id = 'w',"
        " claim_token = %s, lease_expires_at = now() + interval '1 minute' WHERE id = ANY(%s)"
        " RETURNING id",
        [token, ids],
    )
    return [ClaimedJob(i, "default", "t", {}, 5, 1, max_attempts, None, None, True, token) for i in ids]


def test_a_refused_outcome_is_recorded_as_a_failure_and_the_rest_are_written(
    queue: Queue, postgres_dsn: str, db: psycopg.Connection[Any]
) -> None:
    tables = Db(postgres_dsn, queue.schema, db)
    jobs = claimed(tables, queue, 9, max_attempts=1) + claimed(tables, queue, 1, max_attempts=2)
    bad = {jobs[4].id: "{not json", jobs[9].id: "[1,"}
    outcomes = [Outcome(j, "completed", result_json=bad.get(j.id, f'{{"n": {j.id}}}')) for j in jobs]
    written: list[Outcome] = []

    async def flush() -> None:
        conn = ServiceConnection(postgres_dsn, "test")
        completer = Completer(conn, queue.queries, on_written=written.extend, wake_after=lambda o: [])
        runner = asyncio.create_task(completer.run())
        for o in outcomes:
            completer.add(o)
        await asyncio.wait_for(completer.drained(), 10)
        runner.cancel()
        await conn.close()

    asyncio.run(flush())
    assert sorted(o.job.id for o in written) == sorted(j.id for j in jobs)
    db = tables
    states = dict(db.rows("SELECT id, state::text FROM {all_jobs} AS j"))
    dead = {r[0]: r[1] for r in db.rows("SELECT id, errors -> -1 ->> 'type' FROM {dead_letter}")}
    for job in jobs:
        if job.id == jobs[4].id:  # no attempts left: dead-lettered with the reason
            assert dead == {job.id: "UnstorableResult"} and job.id not in states
        elif job.id == jobs[9].id:  # attempts left: retried, the reason on record
            assert states[job.id] == "queued"
            assert (
                db.one("SELECT errors -> -1 ->> 'type' FROM {all_jobs} AS j WHERE id = %s", [job.id])
                == "UnstorableResult"
            )
        else:
            assert states[job.id] == "completed"
            assert db.one("SELECT result ->> 'n' FROM {all_jobs} AS j WHERE id = %s", [job.id]) == str(job.id)


def test_a_prefetched_start_rides_on_its_outcome_and_is_written_alone_after_a_flush_time(
    queue: Queue, postgres_dsn: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that left the prefetch buffer and finishes within a flush's time is charged by its
    outcome's own write (no row update for its start); one still running after that has its
    start written by itself, so a worker killed later still charges the attempt. Here a flush
    held up for a second by a row lock makes that time a second (the cap raised to allow it)."""
    monkeypatch.setattr(completer_module, "START_GRACE_MAX", 5.0)
    tables = Db(postgres_dsn, queue.schema, db)
    ids = queue.enqueue_many([{"task": "t"}] * 4)
    token = uuid.uuid4()
    tables.rows(
        "UPDATE {jobs} SET state = 'running', worker_id = 'w', claim_token = %s,"
        " lease_expires_at = now() + interval '1 minute' WHERE id = ANY(%s) RETURNING id",
        [token, ids],
    )
    slow, long_one, short_one, fast = (
        ClaimedJob(i, "default", "t", {}, 5, 1, 3, None, None, True, token) for i in ids
    )
    for job in (long_one, short_one):
        job.attempt, job.started = 0, False  # prefetched: not charged by the claim

    def version(job_id: int) -> tuple[str, int, datetime | None]:
        (row,) = tables.rows("SELECT xmin::text, attempts, started_at FROM {jobs} WHERE id = %s", [job_id])
        return row[0], row[1], row[2]

    def finished(job: ClaimedJob) -> bool:
        return bool(tables.one("SELECT count(*) FROM {finished} WHERE id = %s", [job.id]))

    before = version(long_one.id)

    async def run() -> float:
        conn = ServiceConnection(postgres_dsn, "test")
        completer = Completer(conn, queue.queries, on_written=lambda o: None, wake_after=lambda o: [])
        runner = asyncio.create_task(completer.run())
        with psycopg.connect(postgres_dsn) as locker:
            locker.execute(
                sql.SQL("SELECT id FROM {} WHERE id = %s FOR UPDATE").format(tables.t("jobs")), [slow.id]
            )
            completer.add(Outcome(slow, "completed"))
            await asyncio.sleep(1.0)
        await asyncio.wait_for(completer.drained(), 10)  # that flush took a second
        began = time.monotonic()
        for job in (long_one, short_one):
            job.attempt, job.started, job.began_at = 1, True, datetime.now(UTC)
            completer.record_start(job)
        completer.add(Outcome(fast, "completed"))
        await until(lambda: finished(fast))
        await asyncio.sleep(0.2)
        assert version(long_one.id) == before, "a start was written before a flush's time had passed"
        completer.add(Outcome(short_one, "completed"))
        await until(lambda: finished(short_one))
        assert tables.one("SELECT attempts FROM {finished} WHERE id = %s", [short_one.id]) == 1
        assert version(long_one.id) == before, "a start was written before a flush's time had passed"
        await asyncio.wait_for(completer.drained(), 10)
        waited = time.monotonic() - began
        runner.cancel()
        await conn.close()
        return waited

    waited = asyncio.run(run())
    assert 0.9 <= waited < 5
    xmin, attempts, started_at = version(long_one.id)
    assert xmin != before[0] and attempts == 1 and started_at == long_one.began_at


async def until(check: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
