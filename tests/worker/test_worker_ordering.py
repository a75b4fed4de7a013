"""Which job runs first, and when: priority order, and delayed jobs never early and barely late."""

from __future__ import annotations

import random

import pytest
import worker_app
from worker_helpers import Db, percentile, thread_worker, wait_until

from pgqueue import JobSpec

pytestmark = pytest.mark.slow


def test_one_worker_with_concurrency_1_runs_jobs_in_priority_order(wapp: worker_app.App, wdb: Db) -> None:
    rng = random.Random(4)
    # Two batches, so equal priorities are told apart by run time (the later batch waits), and
    # within a batch (one run time) by id.
    for _ in range(2):
        wapp.queue.enqueue_many(
            [JobSpec("record", {"note": "p"}, queue="prio", priority=rng.randint(1, 10)) for _ in range(20)]
        )
    expected = [r[0] for r in wdb.rows("SELECT id FROM {all_jobs} AS j ORDER BY priority, run_at, id")]
    assert len({r[0] for r in wdb.rows("SELECT run_at FROM {all_jobs} AS j")}) == 2

    with thread_worker(wapp, wdb, queues=("prio",), concurrency=1):
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {log}") == len(expected),
            20,
            lambda: f"states {wdb.states()}",
        )
    executed = [r[0] for r in wdb.rows("SELECT job_id FROM {log} ORDER BY seq")]
    assert executed == expected
    # Handler start times (the database's clock) agree with the order of the log.
    starts = [r[0] for r in wdb.rows("SELECT started_at FROM {log} ORDER BY seq")]
    assert starts == sorted(starts)


def test_delayed_jobs_never_start_early_and_start_soon_after_run_at(wapp: worker_app.App, wdb: Db) -> None:
    count = 30
    delays = [0.3 + 0.1 * k for k in range(count)]
    random.Random(2).shuffle(delays)  # each later enqueue may be due before the worker's timer

    with thread_worker(wapp, wdb, queues=("later",), concurrency=10):
        ids = [wapp.queue.enqueue("record", {"note": f"{d:.1f}"}, queue="later", delay=d) for d in delays]
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {log}") == count,
            3 + max(delays) + 5,
            lambda: f"states {wdb.states()}",
        )

    rows = wdb.rows(
        "SELECT j.id, extract(epoch FROM j.started_at - j.run_at)::float8,"
        "       extract(epoch FROM l.started_at - j.run_at)::float8"
        " FROM {all_jobs} AS j JOIN {log} AS l ON l.job_id = j.id ORDER BY j.id"
    )
    assert [r[0] for r in rows] == sorted(ids)
    claim_lateness = [r[1] for r in rows]
    handler_lateness = [r[2] for r in rows]
    # Never early: neither the claim (its transaction's clock) nor the handler's start.
    assert min(claim_lateness) >= 0, claim_lateness
    assert min(handler_lateness) >= 0, handler_lateness
    p50, p99 = percentile(handler_lateness, 50) * 1000, percentile(handler_lateness, 99) * 1000
    c50, c99 = percentile(claim_lateness, 50) * 1000, percentile(claim_lateness, 99) * 1000
    print(
        f"\ndelayed-job lateness on an idle worker ({count} jobs): handler start after run_at "
        f"p50={p50:.1f} ms p99={p99:.1f} ms max={max(handler_lateness) * 1000:.1f} ms; "
        f"claim after run_at p50={c50:.1f} ms p99={c99:.1f} ms"
    )
    assert max(handler_lateness) < 0.5, handler_lateness  # a sanity bound, not the target


def test_delayed_jobs_falling_due_a_millisecond_apart_all_start_on_time(
    wapp: worker_app.App, wdb: Db
) -> None:
    """Retries of jobs that failed together fall due within a claim's round trip of each other:
    one due just after the claim looked, and before the look for the next delayed job, is no
    longer delayed then, yet was not claimed. It must start at once, not at the next poll."""
    count, rounds = 12, 4
    with thread_worker(wapp, wdb, queues=("later",), concurrency=count, poll_interval=10):
        for r in range(rounds):
            first = wapp.queue.enqueue("record", queue="later", delay=0.5)
            due = wdb.one("SELECT extract(epoch FROM run_at)::float8 FROM {jobs} WHERE id = %s", [first])
            wdb.rows(  # the rest fall due 0.5 ms apart after the first
                "INSERT INTO {jobs} (queue, task, run_at)"
                " SELECT 'later', 'record', to_timestamp(%s) + make_interval(secs => k * 0.0005)"
                " FROM generate_series(1, %s) AS k RETURNING id",
                [due, count - 1],
            )
            wait_until(
                lambda r=r: wdb.one("SELECT count(*) FROM {log}") == (r + 1) * count,
                5,
                lambda r=r: f"round {r}: left {wdb.rows('SELECT id, run_at, clock_timestamp() FROM {jobs}')}",
            )
    lateness = [
        r[0]
        for r in wdb.rows(
            "SELECT extract(epoch FROM l.started_at - j.run_at)::float8"
            " FROM {all_jobs} AS j JOIN {log} AS l ON l.job_id = j.id"
        )
    ]
    assert len(lateness) == count * rounds
    assert min(lateness) >= 0, lateness
    assert max(lateness) < 0.5, sorted(lateness)[-5:]  # a poll would be 10 s
