"""Wake-ups without a herd, and hand-offs: idle worker processes, how many claims an enqueue
sets off, and the jobs an enqueue hands a waiting worker outright.

The server counts the statements (``pg_stat_statements``), so the figures are the database's,
not the workers' own account. Workers poll only every 60 s here: a job that starts promptly was
woken or handed over, not found by a poll. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import worker_app
from pgserver import temporary_server
from worker_helpers import Db, WorkerProcess, Workers, percentile, wait_until

from pgqueue import JobSpec, JobState
from pgqueue.migrate import upgrade
from pgqueue.worker.claimer import WAKE_GRACE
from pgqueue.worker.handoff import HANDOFF_FRESH
from pgqueue.worker.rescuer import GRACE

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

    def claimed_rows(self) -> int:
        """Rows the claim statements returned since the last reset: jobs a claim took."""
        return int(
            self.db.one(
                "SELECT coalesce(sum(rows), 0) FROM pg_stat_statements"
                " WHERE query LIKE '%%FROM generate_series(1, 10) AS p(priority)%%'"
                " AND query LIKE '%%UPDATE%%'"
            )
        )

    def reset_counts(self) -> None:
        self.db.one("SELECT count(*) FROM (SELECT pg_stat_statements_reset()) AS r")

    def start_waiting_workers(
        self, n: int, *args: str, env: dict[str, str] | None = None, log_level: str = "WARNING"
    ) -> list[WorkerProcess]:
        procs = [self.workers.start(*NO_POLL, *args, env=env, log_level=log_level) for _ in range(n)]
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


def test_a_queue_at_the_workers_cap_moves_on_when_its_job_ends_without_a_poll(rig: Rig) -> None:
    """Three jobs of 0.3 s on a queue capped at one per worker: each starts as the one before
    it ends. The slot is free once the outcome is written (the worker counts its claims until
    then), and that write is what makes the worker look again; it once waited for its poll."""
    rig.start_waiting_workers(1, "--concurrency", "3", "--queue-concurrency", "default=1")
    begin = time.monotonic()
    rig.app.queue.enqueue_many([JobSpec("record", {"sleep": 0.3}) for _ in range(3)])
    _all_completed(rig, 3, timeout=30)
    took = time.monotonic() - begin
    print(f"\nthree 0.3 s jobs one at a time: {took:.2f} s")
    assert took < 3, took  # 0.9 s of work; a poll would be 60 s


# ---------------------------------------------------------------------------- hand-offs

RUNNING_FOR = (
    "SELECT state, worker_id, claim_token IS NOT NULL, attempts, started_at FROM {jobs} WHERE id = %s"
)


def _worker_id(rig: Rig, worker: WorkerProcess) -> str:
    return str(rig.db.one("SELECT id FROM {workers} WHERE pid = %s", [worker.pid]))


def _waiting_again(rig: Rig) -> None:
    """Put every worker back on the waiting list, as its sign-up would (a stopped worker cannot)."""
    rig.db.rows("UPDATE {workers} SET waiting_until = now() + interval '30 seconds' RETURNING id")


def test_an_idle_worker_is_handed_each_job_and_starts_it_without_claiming(rig: Rig) -> None:
    """30 enqueues 50 ms apart to one idle worker: each job reaches it inside the enqueue's own
    notification, already claimed for it, so no claim statement takes a single row (a claim
    still follows each job, to fill any room left and sign up again), and every job starts at
    once, once, charged one attempt."""
    (worker,) = rig.start_waiting_workers(1)
    worker_id = _worker_id(rig, worker)
    rig.reset_counts()
    ids = []
    for _ in range(30):
        ids.append(rig.app.queue.enqueue("record"))
        time.sleep(0.05)
    _all_completed(rig, 30)
    waits = rig.waits_ms(ids)
    print(
        f"\n30 jobs handed over: {rig.claimed_rows()} rows claimed, {rig.claims()} claims; enqueue to "
        f"start p50 {percentile(waits, 50):.1f} ms, max {max(waits):.1f} ms"
    )
    assert rig.claimed_rows() == 0
    rows = rig.db.rows("SELECT worker_id, attempts FROM {finished} WHERE id = ANY(%s)", [ids])
    assert rows == [(worker_id, 1)] * 30
    assert rig.db.one("SELECT count(*) FROM {log} WHERE job_id = ANY(%s)", [ids]) == 30
    assert max(waits) < 1000, sorted(waits)[-5:]


def test_a_stale_hand_off_goes_back_uncharged_and_runs_once(rig: Rig) -> None:
    """The job is the waiting worker's from the moment its enqueue commits, its start not yet
    charged. A worker that reads the hand-off late (it was stopped longer than HANDOFF_FRESH:
    meanwhile its lease could have run out and the job gone to another worker) does not start
    it: the job goes back uncharged, and runs once."""
    (worker,) = rig.start_waiting_workers(1)
    worker_id = _worker_id(rig, worker)
    worker.signal(signal.SIGSTOP)
    try:
        job = rig.app.queue.enqueue("record")
        assert rig.db.one(RUNNING_FOR, [job]) == ("running", worker_id, True, 0, None)
        time.sleep(HANDOFF_FRESH + 0.5)
    finally:
        worker.signal(signal.SIGCONT)
    _all_completed(rig, 1, timeout=10)
    assert rig.db.one("SELECT attempts, errors FROM {finished} WHERE id = %s", [job]) == (1, [])
    assert rig.db.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job]) == 1
    assert f"job {job} (record) handed to this worker goes back: handed over" in worker.log_text()


def test_a_worker_killed_holding_a_hand_off_costs_the_job_nothing(rig: Rig) -> None:
    """Killed after its enqueue handed it the job: the job, never started, comes back with the
    lease rescue, uncharged, and runs once on another worker."""
    fast = ("--lease-seconds", "2")
    (doomed,) = rig.start_waiting_workers(1, *fast)
    doomed.signal(signal.SIGSTOP)
    job = rig.app.queue.enqueue("record")
    assert rig.db.one(RUNNING_FOR, [job])[:2] == ("running", _worker_id(rig, doomed))
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    killed = time.monotonic()
    heir = rig.workers.start(*NO_POLL, *fast, env={"PGQUEUE_RESCUE_INTERVAL": "0.5"}, log_level="WARNING")
    _all_completed(rig, 1, timeout=2 + GRACE + 10)
    print(f"\nthe killed worker's hand-off ran {time.monotonic() - killed:.1f} s after the kill")
    row = rig.db.one("SELECT worker_id, attempts, errors FROM {finished} WHERE id = %s", [job])
    assert row == (_worker_id(rig, heir), 1, [])
    assert rig.db.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job]) == 1


def test_a_hand_off_longer_than_the_lease_keeps_its_lease(rig: Rig) -> None:
    """A handed-over job is renewed like a claimed one: a 4 s job on a 2 s lease, with the
    rescue looking every half second, runs once and is never taken from its worker."""
    (worker,) = rig.start_waiting_workers(1, "--lease-seconds", "2", env={"PGQUEUE_RESCUE_INTERVAL": "0.5"})
    rig.reset_counts()
    job = rig.app.queue.enqueue("record", {"sleep": 4.0})
    _all_completed(rig, 1, timeout=20)
    assert rig.claimed_rows() == 0  # it was handed over, not claimed
    assert rig.db.one("SELECT attempts, errors FROM {finished} WHERE id = %s", [job]) == (1, [])
    assert rig.db.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job]) == 1
    assert "lost its lease" not in worker.log_text() and "rescued" not in worker.log_text()


def test_a_hand_off_never_breaks_the_workers_cap_on_its_queue(rig: Rig) -> None:
    """A worker at its local cap on a queue is still on the waiting list (it has room for other
    queues); a job of the capped queue handed to it goes back and starts only when the running
    one has ended."""
    (worker,) = rig.start_waiting_workers(
        1, "--concurrency", "3", "--queue-concurrency", "default=1", log_level="DEBUG"
    )
    first = rig.app.queue.enqueue("record", {"sleep": 1.5})
    started = "SELECT count(*) FROM {log} WHERE job_id = %s"
    wait_until(lambda: rig.db.one(started, [first]) == 1, 10, worker.log_tail)
    waiting = "SELECT count(*) FROM {workers} WHERE waiting_until > now()"
    wait_until(lambda: rig.db.one(waiting) == 1, 10, worker.log_tail)
    second = rig.app.queue.enqueue("record", {"sleep": 0.1})
    _all_completed(rig, 2, timeout=20)
    first_end = rig.db.one("SELECT finished_at FROM {log} WHERE job_id = %s", [first])
    second_start = rig.db.one("SELECT started_at FROM {log} WHERE job_id = %s", [second])
    assert second_start >= first_end, (first_end, second_start)
    assert f"job {second} (record) handed to this worker goes back: its queue is at this worker's cap" in (
        worker.log_text()
    )
    assert rig.db.one("SELECT attempts FROM {finished} WHERE id = %s", [second]) == 1


def test_jobs_that_cannot_be_handed_over_are_queued_and_their_worker_woken(rig: Rig) -> None:
    """Only a job due now, enqueued by a statement that commits by itself, on a queue neither
    paused nor limited, whose row fits in a notification, is handed over, and only to a worker
    that takes hand-offs; every other job is queued and the waiting worker woken to claim it
    (or, inside the caller's transaction, every worker told at commit)."""
    (worker,) = rig.start_waiting_workers(1)
    worker_id = _worker_id(rig, worker)
    queue = rig.app.queue
    heard = psycopg.connect(rig.db.dsn, autocommit=True)
    heard.execute(f"LISTEN {queue.queries.channel}")

    def notes() -> list[str]:
        return [n.payload for n in heard.notifies(timeout=0.2)]

    def one_job(enqueue: Callable[[], int]) -> tuple[tuple[object, ...], list[str]]:
        _waiting_again(rig)
        job = enqueue()
        return rig.db.one("SELECT state, worker_id FROM {jobs} WHERE id = %s", [job]), notes()

    worker.signal(signal.SIGSTOP)
    try:
        queued = ("queued", None)
        woken = [f"!wake {worker_id}"]
        state, sent = one_job(lambda: queue.enqueue("record"))
        assert state == ("running", worker_id)
        assert len(sent) == 1 and sent[0].startswith(f"!take {worker_id} {{")
        handed = json.loads(sent[0].split(" ", 2)[2])
        assert (handed["task"], handed["args"], handed["attempt"]) == ("record", {}, 0)

        # The largest row handed over still fits in a notification (else the enqueue would fail).
        state, sent = one_job(lambda: queue.enqueue("record", {"note": "x" * 5900}))
        assert state == ("running", worker_id) and sent[0].startswith("!take ")

        assert one_job(lambda: queue.enqueue("record", delay=60)) == (queued, woken)
        assert one_job(lambda: queue.enqueue("record", {"note": "x" * 7000})) == (queued, woken)
        # Small in characters, not in bytes; small as sent, not as the server prints it.
        assert one_job(lambda: queue.enqueue("record", {"note": "é" * 3600})) == (queued, woken)
        assert one_job(lambda: queue.enqueue("nap", {"seconds": [1.7e308] * 30})) == (queued, woken)
        assert queue.cancel(rig.db.one("SELECT id FROM {jobs} WHERE task = 'nap'"))  # not to be run
        queue.pause("default")
        notes()
        assert one_job(lambda: queue.enqueue("record")) == (queued, woken)
        queue.resume("default")
        queue.configure_queue("default", concurrency=5)
        notes()
        assert one_job(lambda: queue.enqueue("record")) == (queued, woken)
        queue.configure_queue("default", concurrency=None)
        notes()
        _waiting_again(rig)
        with psycopg.connect(rig.db.dsn) as conn:
            job = queue.enqueue("record", conn=conn)
        state = rig.db.one("SELECT state, worker_id FROM {jobs} WHERE id = %s", [job])
        assert (state, notes()) == (queued, ["default"])  # told at commit, to every worker
        rig.db.rows("UPDATE {workers} SET handoff_lease = NULL RETURNING id")  # a worker from before
        assert one_job(lambda: queue.enqueue("record")) == (queued, woken)
    finally:
        worker.signal(signal.SIGCONT)
        heard.close()
    # All but the delayed one: the wake-ups reached the worker.
    wait_until(
        lambda: rig.db.one("SELECT count(*) FROM {finished} WHERE task = 'record'") == 8,
        20,
        lambda: f"states {rig.db.states()}\n{rig.workers.logs()}",
    )


def test_a_graceful_stop_leaves_no_job_claimed_for_the_worker(rig: Rig) -> None:
    """An enqueue can pick a worker just as it leaves the waiting list to stop, and the hand-off
    then arrives too late to be read. The stopping worker's last write gives such a job back
    (here a row claimed for it behind its back, as that enqueue leaves it), so it runs at once
    elsewhere instead of a lease and a grace later."""
    (leaving,) = rig.start_waiting_workers(1)
    job = rig.app.queue.enqueue("record", delay=3600)
    rig.db.rows(
        "UPDATE {jobs} SET state = 'running', run_at = now(), worker_id = %s,"
        " claim_token = gen_random_uuid(), lease_expires_at = now() + interval '30 seconds'"
        " WHERE id = %s RETURNING id",
        [_worker_id(rig, leaving), job],
    )
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(20) == 0
    assert rig.db.one("SELECT state, worker_id, attempts FROM {jobs} WHERE id = %s", [job]) == (
        "queued",
        None,
        0,
    )
    rig.start_waiting_workers(1)
    _all_completed(rig, 1, timeout=10)  # the rescue would take 30 s + its grace
    assert rig.db.one("SELECT attempts, errors FROM {finished} WHERE id = %s", [job]) == (1, [])


def test_a_hand_off_cancelled_before_the_worker_read_it_ends_cancelled_at_its_give_back(rig: Rig) -> None:
    """Two hand-offs the stopping worker never read, one of them cancelled meanwhile (queue.cancel
    flags a running job for its worker, which never hears of it either). The give-back sends the
    other back to the queue; the cancelled one ends cancelled, never to run."""
    (leaving,) = rig.start_waiting_workers(1)
    kept, cancelled = (rig.app.queue.enqueue("record", delay=3600) for _ in range(2))
    rig.db.rows(
        "UPDATE {jobs} SET state = 'running', run_at = now(), worker_id = %s,"
        " claim_token = gen_random_uuid(), lease_expires_at = now() + interval '30 seconds'"
        " WHERE id = ANY(%s) RETURNING id",
        [_worker_id(rig, leaving), [kept, cancelled]],
    )
    leaving.signal(signal.SIGSTOP)  # it hears of the cancel no sooner than of the hand-off
    try:
        assert rig.app.queue.cancel(cancelled)
    finally:
        leaving.signal(signal.SIGCONT)
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(20) == 0
    assert rig.db.one("SELECT state FROM {jobs} WHERE id = %s", [kept]) == "queued"
    assert rig.app.queue.get_job(cancelled).state is JobState.CANCELLED
    rig.start_waiting_workers(1)
    _all_completed(rig, 1, timeout=10)
    time.sleep(0.5)
    assert rig.db.one("SELECT job_id FROM {log}") == kept
    assert rig.app.queue.get_job(cancelled).state is JobState.CANCELLED


def test_a_job_handed_over_while_the_listener_was_away_goes_back_when_it_listens_again(
    rig: Rig,
) -> None:
    """The worker's listening connection is cut (a server timeout, a firewall) while the worker
    is still on the waiting list: the job an enqueue hands it meanwhile is claimed for it, and
    its notification is lost. Listening again, the worker gives back what was handed to it
    before: the job runs at once, uncharged, not a lease and a grace later."""
    (worker,) = rig.start_waiting_workers(1)
    worker.signal(signal.SIGSTOP)
    try:
        cut = rig.db.rows(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND query LIKE '%%listening_since%%'",
            [worker.appname],
        )
        assert cut == [(True,)], cut
        job = rig.app.queue.enqueue("record")
        assert rig.db.one(RUNNING_FOR, [job])[:2] == ("running", _worker_id(rig, worker))
    finally:
        worker.signal(signal.SIGCONT)
    resumed = time.monotonic()
    _all_completed(rig, 1, timeout=10)  # the rescue would take 30 s + its grace
    print(f"\nthe hand-off lost with the listener ran {time.monotonic() - resumed:.2f} s after")
    assert rig.db.one("SELECT attempts, errors FROM {finished} WHERE id = %s", [job]) == (1, [])
    assert rig.db.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job]) == 1
    assert (
        "1 jobs handed to this worker while its listener was away went back to default" in worker.log_text()
    )


def test_a_schedule_fire_wakes_a_waiting_worker_at_its_commit(rig: Rig) -> None:
    """A fire is claimed and its job enqueued in one transaction; the waiting worker hears of
    it at that commit and starts the job at once, not at a poll."""
    rig.start_waiting_workers(1)
    queue = rig.app.queue
    queue.add_schedule("hourly", "record", every=timedelta(hours=1))
    fire_at = datetime.now(UTC).replace(microsecond=0)
    began = time.monotonic()
    job = queue.schedule_store.fire("hourly", fire_at, fire_at + timedelta(hours=1), f"hourly@{fire_at}")
    assert job is not None
    _all_completed(rig, 1, timeout=5)  # a poll would come after 60 s
    print(f"\nthe fire's job ran {time.monotonic() - began:.3f} s after the fire call")
    assert rig.db.one("SELECT scheduled_for, attempts FROM {finished} WHERE id = %s", [job]) == (fire_at, 1)
