"""A worker that loses its database connections reconnects and loses nothing; leases save jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
import worker_app
from psycopg import sql
from worker_helpers import Db, Workers, terminate_backends, thread_worker, wait_until

from pgqueue import JobSpec, JobState, Queue
from pgqueue.worker.db import ServiceConnection
from pgqueue.worker.rescuer import GRACE, Rescuer

pytestmark = pytest.mark.slow


def test_worker_survives_pg_terminate_backend_of_all_its_connections(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    # A long poll interval: after the reconnect, only LISTEN can wake the worker promptly.
    worker = wprocs.start("--concurrency", "10", "--poll-interval", "5", log_level="INFO")
    wprocs.wait_registered(wdb, worker)

    ids: list[int] = []
    terminated: list[int] = []
    started = time.monotonic()
    kills_at = [0.4, 1.0, 1.6]
    while time.monotonic() - started < 2.2:  # jobs keep flowing while connections are killed
        ids += wapp.queue.enqueue_many([JobSpec("record", {"sleep": 0.01}) for _ in range(20)])
        if kills_at and time.monotonic() - started >= kills_at[0]:
            kills_at.pop(0)
            terminated.append(terminate_backends(wdb, worker.appname))
        time.sleep(0.05)
    assert all(n > 0 for n in terminated), terminated
    assert worker.alive(), worker.log_tail()

    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == len(ids),
        30,
        lambda: f"states {wdb.states()}\n{worker.log_tail()}",
    )
    # Every job ran (at least once: a handler whose own connection died may have been retried).
    logged = {r[0] for r in wdb.rows("SELECT DISTINCT job_id FROM {log}")}
    assert logged == set(ids)
    assert wdb.one("SELECT count(*) FROM {dead_letter}") == 0

    # Jobs enqueued after the reconnects run too, woken by the re-established LISTEN.
    time.sleep(0.5)
    t0 = time.monotonic()
    late = wapp.queue.enqueue("record", {"note": "after"})
    wait_until(lambda: wapp.queue.get_job(late).state is JobState.COMPLETED, 10, worker.log_tail)
    assert time.monotonic() - t0 < 1.0, "the worker only found the job by polling: LISTEN is gone"
    assert worker.alive(), worker.log_tail()
    log_text = worker.log_text()
    assert "listener connection lost" in log_text  # the loss was logged, not silent
    # The worker still heartbeats (its row is kept fresh).
    assert wdb.one("SELECT count(*) FROM {workers} WHERE pid = %s", [worker.pid]) == 1


def test_a_worker_whose_heartbeat_is_stuck_claims_nothing_until_it_renews_again(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    """A worker that cannot renew its leases must not take on more: a job claimed then keeps
    its lease only until it runs out, and is rescued and run a second time while this worker
    runs it. Here a lock on a running job's row holds the heartbeat (a lock, or a pooler with
    no connection to spare); the worker has a free slot and claims nothing until it renews."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "60"}  # nobody rescues here
    worker = wprocs.start("--concurrency", "2", env=env)
    wprocs.wait_registered(wdb, worker)
    long_job = wapp.queue.enqueue("record", {"sleep": 6, "note": "long"})
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {log} WHERE job_id = %s", [long_job]) == 1, 10, worker.log_tail
    )

    with psycopg.connect(wdb.dsn) as locker:
        locker.execute(
            sql.SQL("SELECT 1 FROM {}.jobs WHERE id = %s FOR UPDATE").format(sql.Identifier(wdb.schema)),
            [long_job],
        )
        wait_until(lambda: "claiming paused" in worker.log_text(), 10, worker.log_tail)
        late = wapp.queue.enqueue("record", {"note": "late"})
        time.sleep(2)
        started_while_stuck = wdb.one("SELECT attempts FROM {all_jobs} AS j WHERE id = %s", [late])
        locker.rollback()

    wait_until(lambda: wapp.queue.get_job(late).state is JobState.COMPLETED, 10, worker.log_tail)
    wait_until(lambda: wapp.queue.get_job(long_job).state is JobState.COMPLETED, 15, worker.log_tail)
    assert started_while_stuck == 0, "a job was claimed while the heartbeat could not renew leases"
    assert "claiming resumes" in worker.log_text()
    runs = dict(wdb.rows("SELECT job_id, count(*) FROM {log} GROUP BY job_id"))
    assert runs == {long_job: 1, late: 1}
    assert worker.alive(), worker.log_tail()


def test_a_claim_the_worker_never_received_is_rescued_by_lease(wapp: worker_app.App, wdb: Db) -> None:
    """A claim can commit while its reply is lost (the connection dies between COMMIT and the
    result): the row says running under this worker's id, but the worker never started the job.
    The heartbeat must renew only the leases of jobs the worker really runs, so the lease of such
    a job expires and it is rescued (the lost attempt counted), not left running forever."""
    with thread_worker(
        wapp, wdb, queues=("orphans",), concurrency=2, lease_seconds=1.0, rescue_interval=0.2
    ) as w:
        job_id = wapp.queue.enqueue("record", {"note": "orphan"}, queue="orphans", delay=3600)
        # What the lost claim left behind, written under the live worker's id.
        wdb.rows(
            "UPDATE {jobs} SET state = 'running', attempts = attempts + 1, started_at = now(),"
            " run_at = now(), worker_id = %s, lease_expires_at = now() + interval '1 second'"
            " WHERE id = %s RETURNING id",
            [w.id, job_id],
        )
        # The lease runs out, a round sights it, one a grace later rescues it, the job runs.
        wait_until(
            lambda: wapp.queue.get_job(job_id).state is JobState.COMPLETED,
            1.0 + GRACE + 2 * 0.2 + 1.0,
            lambda: f"job stuck: {wapp.queue.get_job(job_id)}",
        )
    job = wapp.queue.get_job(job_id)
    assert job.attempts == 2
    assert [e["type"] for e in job.errors] == ["LeaseExpired"]


def test_expired_leases_are_rescued_and_an_exhausted_job_is_dead_lettered(
    wapp: worker_app.App, wdb: Db
) -> None:
    """Jobs left running by a worker that vanished: a live worker re-queues them once it has seen
    their leases expired and unchanged for its grace (a rescue round sights them, one a grace later
    takes them), counting the lost attempt; one with no attempts left goes to the dead letter table."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2, rescue_interval=0.2):
        again = wapp.queue.enqueue("record", {"note": "again"}, delay=3600)
        exhausted = wapp.queue.enqueue("record", {"note": "exhausted"}, delay=3600, max_attempts=1)
        wdb.rows(
            "UPDATE {jobs} SET state = 'running', attempts = 1, started_at = now(), run_at = now(),"
            " worker_id = 'gone-host:999999:deadbeef',"
            " lease_expires_at = now() - interval '1 second'"
            " WHERE id IN (%s, %s) RETURNING id",
            [again, exhausted],
        )
        rescued_from = time.monotonic()
        wait_until(
            lambda: (
                wapp.queue.get_job(again).state is JobState.COMPLETED
                and wapp.queue.get_job(exhausted).state is JobState.DEAD
            ),
            10,
            lambda: f"{wapp.queue.get_job(again)}\n{wapp.queue.get_job(exhausted)}",
        )
        # Sighted within a round, taken a grace later, run within a second.
        assert time.monotonic() - rescued_from < GRACE + 2 * 0.2 + 1.0
    job = wapp.queue.get_job(again)
    assert job.attempts == 2
    assert [e["type"] for e in job.errors] == ["LeaseExpired"]
    assert "gone-host:999999:deadbeef" in job.errors[0]["message"]
    dead = wapp.queue.get_job(exhausted)
    assert dead.attempts == 1
    assert [e["type"] for e in dead.errors] == ["LeaseExpired"]
    assert wdb.one("SELECT count(*) FROM {log} WHERE job_id = %s", [exhausted]) == 0


def test_a_job_lost_before_its_start_was_recorded_costs_no_attempt_until_it_keeps_killing_workers(
    wapp: worker_app.App, wdb: Db
) -> None:
    """An expired claim whose start was never recorded (prefetched, or just out of the buffer)
    goes back uncharged and without an error entry; a job that has taken max_attempts + 2
    workers down that way is dead-lettered, so even a poison job that kills its worker before
    its start is written ends."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2, rescue_interval=0.2):
        spared = wapp.queue.enqueue("record", {"note": "spared"}, delay=3600, max_attempts=1)
        poison = wapp.queue.enqueue("record", {"note": "poison"}, delay=3600, max_attempts=1)
        wdb.rows(
            "UPDATE {jobs} SET state = 'running', started_at = NULL, run_at = now(),"
            " worker_id = 'gone-host:1:feedface', claim_token = gen_random_uuid(),"
            " unrecorded_losses = CASE WHEN id = %s THEN 3 ELSE 0 END,"
            " lease_expires_at = now() - interval '1 second'"
            " WHERE id IN (%s, %s) RETURNING id",
            [poison, spared, poison],
        )
        wait_until(
            lambda: (
                wapp.queue.get_job(spared).state is JobState.COMPLETED
                and wapp.queue.get_job(poison).state is JobState.DEAD
            ),
            5,
            lambda: f"{wapp.queue.get_job(spared)}\n{wapp.queue.get_job(poison)}",
        )
    job = wapp.queue.get_job(spared)
    assert job.attempts == 1 and job.errors == []  # its one attempt is the run that completed it
    assert wdb.one("SELECT unrecorded_losses FROM {finished} WHERE id = %s", [spared]) == 1
    dead = wapp.queue.get_job(poison)
    assert dead.attempts == 0
    assert [e["type"] for e in dead.errors] == ["LeaseExpired"]
    assert "before the job's start was recorded (4 such losses)" in dead.errors[0]["message"]


EXPIRED = "now() - interval '1 minute'"


def insert_running(
    c: psycopg.Connection[Any],
    jobs: sql.Composable,
    *,
    owner: str,
    token: bool = True,
    lease: str = EXPIRED,
    count: int = 1,
) -> list[int]:
    """``count`` running jobs of ``owner`` as a claim leaves them (started, one attempt), written
    by hand: with a claim token or none, and ``lease`` (SQL) as their lease, expired by default."""
    query = sql.SQL(
        "INSERT INTO {} (queue, task, state, worker_id, claim_token, attempts, started_at, lease_expires_at)"
        " SELECT 'q', 't', 'running', %s, {}, 1, now(), {} FROM generate_series(1, %s) RETURNING id"
    ).format(jobs, sql.SQL("gen_random_uuid()" if token else "NULL"), sql.SQL(lease))
    return [row[0] for row in c.execute(query, [owner, count]).fetchall()]


def test_a_rescue_takes_only_leases_seen_expired_and_unchanged_for_its_grace(queue: Queue) -> None:
    """A lease can lapse while its owner lives (the database was down, frozen or locked); the
    owner renews as soon as it can, at the moment a rescue would run. So a round only sights
    expired leases, and a later one takes those it has seen unchanged for the rescuer's grace:
    a lease renewed meanwhile keeps its job, and one renewed into another lapse
    starts its grace again. Rows written by hand (no claim token, a lease of -infinity, no lease)
    are rescued too. Real rounds on a real database, a real wait for the grace."""
    jobs = sql.SQL("{}.jobs").format(sql.Identifier(queue.queries.schema))
    with psycopg.connect(queue.dsn, autocommit=True) as c:
        gone, renewed, relapsed = (
            insert_running(c, jobs, owner=o)[0] for o in ("gone", "renewing", "relapsing")
        )
        # Written by hand: no claim token, and a lease Python reads only clamped, or none at all.
        odd, leaseless = (
            insert_running(c, jobs, owner="by hand", token=False, lease=lease)[0]
            for lease in ("'-infinity'", "NULL")
        )

        def states() -> tuple[str, ...]:
            rows = dict(c.execute(sql.SQL("SELECT id, state FROM {}").format(jobs)).fetchall())
            return rows[gone], rows[renewed], rows[relapsed], rows[odd], rows[leaseless]

        async def rounds() -> None:
            conn = ServiceConnection(queue.dsn, "test")
            rescuer = Rescuer(conn, queue.queries, lease_seconds=0.3, interval=60)
            try:
                assert await rescuer.run_once() == 0  # sighted, not taken
                assert await rescuer.run_once() == 0  # nor a moment later
                assert states() == ("running",) * 5
                c.execute(
                    sql.SQL(
                        "UPDATE {} SET lease_expires_at = clock_timestamp() + interval '1 minute'"
                        " WHERE id = %s"
                    ).format(jobs),
                    [renewed],
                )
                c.execute(
                    sql.SQL(
                        "UPDATE {} SET lease_expires_at = lease_expires_at + interval '1 second'"
                        " WHERE id = %s"
                    ).format(jobs),
                    [relapsed],
                )
                await asyncio.sleep(GRACE)
                assert await rescuer.run_once() == 3
                assert states() == ("queued", "running", "running", "queued", "queued")
                await asyncio.sleep(GRACE)
                assert await rescuer.run_once() == 1
                assert states() == ("queued", "running", "queued", "queued", "queued")
            finally:
                await conn.close()

        asyncio.run(rounds())


def test_rescuers_that_sighted_the_same_jobs_rescue_each_once(queue: Queue) -> None:
    """Every live worker rescues, so several rescuers sight the same expired jobs and, a grace
    later, try to take them at the same moment. Each job goes back to the queue once, with one
    lost attempt on record, whichever rescuer wins it; the others find the claim gone."""
    jobs = sql.SQL("{}.jobs").format(sql.Identifier(queue.queries.schema))
    with psycopg.connect(queue.dsn, autocommit=True) as c:
        ids = insert_running(c, jobs, owner="gone", count=300)

        async def race() -> list[int]:
            conns = [ServiceConnection(queue.dsn, "test") for _ in range(3)]
            rescuers = [Rescuer(conn, queue.queries, lease_seconds=0.3, interval=60) for conn in conns]
            try:
                assert [await r.run_once() for r in rescuers] == [0, 0, 0]  # each sighted all 300
                await asyncio.sleep(GRACE)
                return list(await asyncio.gather(*(r.run_once() for r in rescuers)))
            finally:
                for conn in conns:
                    await conn.close()

        rescued = asyncio.run(race())
        outcome = sql.SQL("SELECT state, attempts, jsonb_array_length(errors) FROM {} WHERE id = ANY(%s)")
        rows = c.execute(outcome.format(jobs), [ids]).fetchall()
    assert sum(rescued) == 300, rescued
    assert sorted(set(rows)) == [("queued", 1, 1)], rows
