"""Wake-ups without a herd: eight idle worker processes, and how many claims an enqueue sets off.

The server counts the statements (``pg_stat_statements``), so the figures are the database's,
not the workers' own account. Workers poll only every 60 s here: a job that starts promptly was
woken, not found by a poll. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import worker_app
from pgserver import temporary_server
from worker_helpers import Db, WorkerProcess, Workers, percentile, wait_until

from pgqueue import JobSpec
from pgqueue.migrate import upgrade
from pgqueue.worker.claimer import WAKE_GRACE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_worker_environment")]

SCHEMA = "wake"
IDLE_WORKERS = 8
NO_POLL = ("--poll-interval", "60")


@dataclass
class Rig:
    db: Db
    app: worker_app.App
    workers: Workers

    def claims(self) -> int:
        """Claim statements the server ran since the last reset (both kinds)."""
        return int(
            self.db.one(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
                " WHERE query LIKE '%%FROM generate_series(1, 10) AS p(priority)%%'"
                " AND query LIKE '%%UPDATE%%'"
            )
        )

    def reset_counts(self) -> None:
        self.db.one("SELECT count(*) FROM (SELECT pg_stat_statements_reset()) AS r")

    def start_waiting_workers(self, n: int, *args: str) -> list[WorkerProcess]:
        procs = [self.workers.start(*NO_POLL, *args, log_level="WARNING") for _ in range(n)]
        self.workers.wait_registered(self.db, *procs)
        wait_until(
            lambda: self.db.one("SELECT count(*) FROM {workers} WHERE waiting_until > now()") == n,
            20,
            lambda: f"workers not waiting: {self.db.rows('SELECT id, waiting_until FROM {workers}')}",
        )
        time.sleep(WAKE_GRACE * 4)  # each worker's look once more after signing up is behind it
        return procs

    def waits_ms(self, ids: list[int]) -> list[float]:
        """Enqueue (commit) to start, per job, by the database's clock."""
        rows = self.db.rows(
            "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM {all_jobs} AS j"
            " WHERE id = ANY(%s)",
            [ids],
        )
        return [float(r[0]) for r in rows]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with temporary_server(settings={"shared_preload_libraries": "pg_stat_statements"}) as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_stat_statements")
        upgrade(dsn, schema=SCHEMA)
        worker_app.create_tables(dsn, SCHEMA)
        app = worker_app.App(dsn, SCHEMA)
        db = Db(dsn, SCHEMA, psycopg.connect(dsn, autocommit=True))
        workers = Workers(dsn, SCHEMA, tmp_path)
        try:
            yield Rig(db, app, workers)
        finally:
            workers.stop_all()
            app.queue.close()
            with contextlib.suppress(psycopg.Error):
                db.conn.close()


def _all_completed(rig: Rig, n: int, timeout: float = 30) -> None:
    wait_until(
        lambda: rig.db.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == n,
        timeout,
        lambda: f"states {rig.db.states()}\n{rig.workers.logs()}",
    )


def test_one_enqueue_wakes_one_of_eight_idle_workers(rig: Rig) -> None:
    """50 enqueues a few milliseconds apart, eight idle workers: at most two claims each (the
    woken worker's, and its look once more after signing up again), where every NOTIFY once
    set off a claim in every worker (451 for 50); and every job starts at once."""
    rig.start_waiting_workers(IDLE_WORKERS)
    rig.reset_counts()
    ids = []
    for _ in range(50):
        ids.append(rig.app.queue.enqueue("record"))
        time.sleep(0.03)
    _all_completed(rig, 50)
    time.sleep(0.2)  # the last look-again claims
    claims = rig.claims()
    waits = rig.waits_ms(ids)
    print(
        f"\n{IDLE_WORKERS} idle workers, 50 enqueues: {claims} claim statements "
        f"({claims / 50:.2f} per enqueue); enqueue to start p50 {percentile(waits, 50):.1f} ms, "
        f"max {max(waits):.1f} ms"
    )
    assert claims <= 2 * 50, claims
    assert max(waits) < 1000, sorted(waits)[-5:]  # a missed wake-up would wait for the 60 s poll


def test_a_burst_spreads_over_every_idle_worker(rig: Rig) -> None:
    """One bulk enqueue wakes one worker; each worker that fills its slots and leaves jobs
    behind wakes the next, so all eight take part, with no herd and no poll."""
    procs = rig.start_waiting_workers(IDLE_WORKERS, "--concurrency", "5")
    rig.reset_counts()
    begin = time.monotonic()
    ids = rig.app.queue.enqueue_many([JobSpec("record", {"sleep": 0.05}) for _ in range(400)])
    _all_completed(rig, 400)
    took = time.monotonic() - begin
    used = {
        r[0] for r in rig.db.rows("SELECT DISTINCT worker_id FROM {all_jobs} AS j WHERE id = ANY(%s)", [ids])
    }
    print(
        f"\n400 jobs of 50 ms on {len(used)} of {len(procs)} workers in {took:.2f} s, {rig.claims()} claims"
    )
    assert len(used) == IDLE_WORKERS, used
    assert took < 10, took  # 400 x 50 ms over 40 slots is 0.5 s of work


def test_an_enqueue_in_a_long_transaction_reaches_a_worker_that_began_waiting_meanwhile(
    rig: Rig,
) -> None:
    """The worker is busy when the job is enqueued and waiting by the time the caller commits:
    an enqueue inside the caller's transaction is announced at its commit, to whoever waits then."""
    (worker,) = rig.start_waiting_workers(1, "--concurrency", "1")
    busy = rig.app.queue.enqueue("record", {"sleep": 0.5})
    state = "SELECT state FROM {all_jobs} AS j WHERE id = %s"
    wait_until(lambda: rig.db.one(state, [busy]) == "running", 10, worker.log_tail)
    with psycopg.connect(rig.db.dsn) as conn:
        job = rig.app.queue.enqueue("record", conn=conn)
        wait_until(
            lambda: (
                rig.db.one(state, [busy]) == "completed"
                and rig.db.one("SELECT count(*) FROM {workers} WHERE waiting_until > now()") == 1
            ),
            10,
            worker.log_tail,
        )
        conn.commit()
    committed = time.monotonic()
    wait_until(lambda: rig.db.one(state, [job]) == "completed", 5, worker.log_tail)
    assert time.monotonic() - committed < 2, worker.log_tail()


def test_under_steady_load_no_job_waits_for_a_poll(rig: Rig) -> None:
    """5,000 jobs a second in bursts every 10 ms for 4 s, one worker: it goes on and off the
    waiting list hundreds of times, woken mid sign-up and woken while it claims; every job
    starts well within a second. A worker that lost track of whether it was on the list once
    left bursts to its 60 s poll (seconds of delay at 5,000 jobs/s)."""
    rig.start_waiting_workers(1, "--concurrency", "200")  # room to spare: it signs up often
    ids: list[int] = []
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        tick = time.monotonic()
        ids += rig.app.queue.enqueue_many([JobSpec("noop") for _ in range(50)])
        time.sleep(max(0.0, 0.01 - (time.monotonic() - tick)))
    _all_completed(rig, len(ids), timeout=30)
    waits = rig.waits_ms(ids)
    print(
        f"\nsteady {len(ids)} jobs in 4 s, one worker: wait p50 {percentile(waits, 50):.1f} ms, "
        f"p99 {percentile(waits, 99):.1f} ms, max {max(waits):.0f} ms"
    )
    assert max(waits) < 1000, sorted(waits)[-5:]
