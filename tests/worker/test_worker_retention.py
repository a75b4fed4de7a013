"""Retention: a running worker prunes finished job rows by age (worker-wide or per queue), count."""

from __future__ import annotations

import pytest
import worker_app
from worker_helpers import Db, Workers, thread_worker, wait_until

from pgqueue import JobSpec

pytestmark = pytest.mark.slow

FAST_MAINTENANCE = {"rescue_interval": 0.1, "prune_interval": 0.2}


def test_worker_prunes_finished_jobs_past_keep_completed_seconds(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    """Configured the systemd way, from PGQUEUE_* variables."""
    worker = wprocs.start(
        "--concurrency",
        "4",
        env={
            "PGQUEUE_KEEP_COMPLETED_SECONDS": "0.3",
            "PGQUEUE_PRUNE_INTERVAL": "0.2",
            "PGQUEUE_RESCUE_INTERVAL": "0.1",
        },
    )
    wprocs.wait_registered(wdb, worker)
    done = wapp.queue.enqueue_many([JobSpec("record", {}) for _ in range(20)])
    cancelled = wapp.queue.enqueue("record", {}, delay=3600)
    assert wapp.queue.cancel(cancelled)
    waiting = wapp.queue.enqueue("record", {}, delay=3600)
    wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") == len(done), 10, lambda: str(wdb.states()))
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {all_jobs} AS j") == 1,
        5,
        lambda: f"finished rows not pruned: {wdb.states()}\n{worker.log_tail()}",
    )
    assert worker.alive()
    # Only the job that has not run yet is left.
    assert [r[0] for r in wdb.rows("SELECT id FROM {all_jobs} AS j")] == [waiting]


def test_per_queue_keep_completed_overrides_the_worker_default(wapp: worker_app.App, wdb: Db) -> None:
    wapp.queue.configure_queue("short", keep_completed=0.1)
    with thread_worker(wapp, wdb, queues=("short", "long"), concurrency=4, **FAST_MAINTENANCE):
        wapp.queue.enqueue_many([JobSpec("record", {}, queue=q) for q in ("short", "long") for _ in range(5)])
        wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") == 10, 10, lambda: str(wdb.states()))
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {all_jobs} AS j WHERE queue = 'short'") == 0,
            5,
            lambda: f"short queue not pruned: {wdb.states()}",
        )
    # The worker's default (a day) keeps the other queue's rows.
    assert wdb.one("SELECT count(*) FROM {finished} WHERE queue = 'long' AND state = 'completed'") == 5


def test_per_queue_keep_completed_count_keeps_the_newest(wapp: worker_app.App, wdb: Db) -> None:
    wapp.queue.configure_queue("capped", keep_completed_count=3)
    with thread_worker(wapp, wdb, queues=("capped",), concurrency=1, **FAST_MAINTENANCE):
        wapp.queue.enqueue_many([JobSpec("record", {}, queue="capped") for _ in range(7)])
        wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") == 7, 10, lambda: str(wdb.states()))
        newest = wapp.queue.enqueue_many([JobSpec("record", {}, queue="capped") for _ in range(3)])
        wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") == 10, 10, lambda: str(wdb.states()))
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {all_jobs} AS j") == 3,
            5,
            lambda: f"not pruned to 3: {wdb.states()}",
        )
    assert sorted(r[0] for r in wdb.rows("SELECT id FROM {all_jobs} AS j")) == newest
