"""Limits that hold across worker processes (global concurrency, rate limit) and pause/resume."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import worker_app
from worker_helpers import Db, Workers, thread_worker, wait_until

from pgqueue import JobSpec, JobState

pytestmark = pytest.mark.slow


class RunningSampler:
    """Counts the queue's running jobs in the table every 20 ms, from its own connection."""

    def __init__(self, db: Db, queue: str) -> None:
        self.db, self.queue = db, queue
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            query = f"SELECT count(*) FROM \"{self.db.schema}\".jobs WHERE state = 'running' AND queue = %s"
            while not self._stop.is_set():
                row = conn.execute(query, [self.queue]).fetchone()
                assert row is not None
                self.samples.append(int(row[0]))
                self._stop.wait(0.02)

    @property
    def max(self) -> int:
        return max(self.samples, default=0)


@contextmanager
def sampling(db: Db, queue: str) -> Iterator[RunningSampler]:
    sampler = RunningSampler(db, queue)
    sampler._thread.start()
    try:
        yield sampler
    finally:
        sampler._stop.set()
        sampler._thread.join(5)


def max_overlap(db: Db, queue: str) -> int:
    """The most handlers running at one instant, from the start/end times they recorded."""
    events: list[tuple[float, int]] = []
    for start, end in db.rows(
        "SELECT extract(epoch FROM l.started_at)::float8, extract(epoch FROM l.finished_at)::float8"
        " FROM {log} AS l JOIN {all_jobs} AS j ON j.id = l.job_id WHERE j.queue = %s",
        [queue],
    ):
        assert end is not None
        events += [(start, 1), (end, -1)]
    level = peak = 0
    for _, delta in sorted(events):  # at equal times an end (-1) sorts before a start (+1)
        level += delta
        peak = max(peak, level)
    return peak


def test_global_concurrency_cap_holds_across_three_workers(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    wapp.queue.configure_queue("reports", concurrency=2)
    procs = [wprocs.start("--queues", "reports", "--concurrency", "5") for _ in range(3)]
    wprocs.wait_registered(wdb, *procs)
    jobs = 16
    with sampling(wdb, "reports") as sampler:
        wapp.queue.enqueue_many([JobSpec("record", {"sleep": 0.2}, queue="reports") for _ in range(jobs)])
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == jobs,
            30,
            lambda: f"states {wdb.states()}\n{wprocs.logs()}",
        )
    assert len(sampler.samples) > 50
    assert sampler.max <= 2, Counter(sampler.samples)
    overlap = max_overlap(wdb, "reports")
    assert overlap <= 2
    assert overlap == 2  # the cap is a cap, not a serialisation: two did run side by side
    assert wdb.one("SELECT count(*) FROM {log}") == jobs


def test_global_cap_set_while_workers_run_holds_at_once(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    """`pgqueue queue reports --concurrency 2` on a live system: the next claims obey it."""
    procs = [wprocs.start("--queues", "reports", "--concurrency", "5") for _ in range(2)]
    wprocs.wait_registered(wdb, *procs)
    time.sleep(0.3)  # the workers have read the (absent) queue settings and are idle
    wapp.queue.configure_queue("reports", concurrency=2)
    jobs = 8
    with sampling(wdb, "reports") as sampler:
        wapp.queue.enqueue_many([JobSpec("record", {"sleep": 0.2}, queue="reports") for _ in range(jobs)])
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == jobs,
            30,
            lambda: f"states {wdb.states()}\n{wprocs.logs()}",
        )
    assert max_overlap(wdb, "reports") <= 2, "the new cap was ignored by workers that were running"
    assert sampler.max <= 2


def test_rate_limit_holds_across_two_workers(wapp: worker_app.App, wdb: Db, wprocs: Workers) -> None:
    rate = 50.0
    wapp.queue.configure_queue("push", rate_limit=rate)
    procs = [wprocs.start("--queues", "push", "--concurrency", "10", log_level="WARNING") for _ in range(2)]
    wprocs.wait_registered(wdb, *procs)
    jobs = 210  # about 4 s at 50/s
    wapp.queue.enqueue_many([JobSpec("record", {}, queue="push") for _ in range(jobs)])
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == jobs,
        20,
        lambda: f"states {wdb.states()}\n{wprocs.logs()}",
    )
    starts = [r[0] for r in wdb.rows("SELECT extract(epoch FROM started_at)::float8 FROM {log} ORDER BY 1")]
    assert len(starts) == jobs
    t0 = starts[0]
    steady = [t for t in starts if t >= t0 + 0.5]
    observed = (len(steady) - 1) / (steady[-1] - steady[0])
    per_second = Counter(int(t - t0) for t in starts)
    print(
        f"\nrate limit {rate}/s: observed {observed:.1f}/s over {steady[-1] - steady[0]:.2f}s; "
        f"per second {sorted(per_second.items())}"
    )
    assert abs(observed - rate) <= 0.1 * rate, observed
    assert wdb.one("SELECT count(DISTINCT pid) FROM {log}") == 2


def test_per_queue_local_cap_of_a_process(wapp: worker_app.App, wdb: Db) -> None:
    """--queue-concurrency a=1: queue a runs one job at a time; b uses the other slots."""
    with thread_worker(wapp, wdb, queues=("a", "b"), concurrency=4, queue_concurrency={"a": 1}):
        wapp.queue.enqueue_many(
            [JobSpec("record", {"sleep": 0.1}, queue=q) for _ in range(5) for q in ("a", "b")]
        )
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 10,
            10,
            lambda: f"states {wdb.states()}",
        )
    assert max_overlap(wdb, "a") == 1
    assert max_overlap(wdb, "b") >= 2


def test_pause_stops_new_claims_and_resume_restarts_them(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("pq",), concurrency=4):
        running = wapp.queue.enqueue("record", {"sleep": 0.6}, queue="pq")
        wait_until(
            lambda: wdb.rows("SELECT 1 FROM {log} WHERE job_id = %s", [running]),
            10,
            "job never started",
        )
        wapp.queue.pause("pq")
        waiting = [wapp.queue.enqueue("record", {"note": "w"}, queue="pq") for _ in range(5)]
        time.sleep(1.0)
        # The running job finished; nothing new was claimed.
        assert wapp.queue.get_job(running).state is JobState.COMPLETED
        assert {wapp.queue.get_job(i).state for i in waiting} == {JobState.QUEUED}
        assert wdb.one("SELECT count(*) FROM {log}") == 1

        resumed = time.monotonic()
        wapp.queue.resume("pq")
        wait_until(
            lambda: all(wapp.queue.get_job(i).state is JobState.COMPLETED for i in waiting),
            10,
            lambda: f"states {wdb.states()}",
        )
        took = time.monotonic() - resumed
    print(f"\njobs of a resumed queue completed {took * 1000:.0f} ms after resume")
    assert took < 1.0, f"resume took {took:.2f}s to take effect (it wakes the workers)"


def test_resume_takes_effect_at_once_on_a_worker_that_saw_the_queue_paused(
    wapp: worker_app.App, wdb: Db
) -> None:
    """The queue is paused when the worker starts (so the worker has read it as paused); resume
    wakes the worker, and its jobs run at once, not a poll interval later."""
    wapp.queue.pause("pq")
    waiting = [wapp.queue.enqueue("record", {"note": "w"}, queue="pq") for _ in range(3)]
    with thread_worker(wapp, wdb, queues=("pq",), concurrency=4, poll_interval=2.0):
        time.sleep(1.0)
        assert wdb.one("SELECT count(*) FROM {log}") == 0
        resumed = time.monotonic()
        wapp.queue.resume("pq")
        wait_until(
            lambda: all(wapp.queue.get_job(i).state is JobState.COMPLETED for i in waiting),
            10,
            lambda: f"states {wdb.states()}",
        )
        took = time.monotonic() - resumed
    assert took < 0.5, f"resume took {took:.2f}s to take effect: the worker waited for its next poll"
