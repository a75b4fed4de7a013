"""The completer writes a batch of outcomes in one statement; one the server refuses is isolated.

pgqueue checks results before they reach a batch, so a refused row is what slips past those
checks (a value PostgreSQL rejects for a reason the worker did not foresee). Simulated here
with result text that is not JSON at all, built by hand: the other outcomes of the batch must
be written, and the bad one recorded as a failure instead of jamming every later flush.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
from worker_helpers import Db

from pgqueue import Queue
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
        completer = Completer(
            conn, queue.queries, prepare=False, on_written=written.extend, wake_after=lambda o: []
        )
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
