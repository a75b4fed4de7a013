"""Queues are isolation boundaries: a backlog in one queue never makes another queue's jobs wait.

Measured before round-robin claims: one worker serving a 30,000-job `imports` backlog and
`email` started an email enqueued meanwhile after 4.8-6.0 s, because the claim merged every
queue's rows by (priority, run time) and older imports always won.
"""

from __future__ import annotations

from collections import Counter

import pytest
import worker_app
from worker_helpers import Db, thread_worker, wait_until

from pgqueue import JobSpec

pytestmark = pytest.mark.slow


def test_a_backlog_in_one_queue_does_not_delay_another_queues_job(wapp: worker_app.App, wdb: Db) -> None:
    backlog = [JobSpec("record", {"sleep": 0.005}, queue="imports") for _ in range(3000)]
    wapp.queue.enqueue_many(backlog)
    with thread_worker(wapp, wdb, queues=("imports", "email"), concurrency=4):
        wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") >= 200, 20, "the backlog did not start")
        email = wapp.queue.enqueue("record", {"note": "welcome"}, queue="email")
        waited = wait_until(
            lambda: wdb.rows(
                "SELECT extract(epoch FROM l.started_at - j.created_at) FROM {log} AS l"
                " JOIN {all_jobs} AS j ON j.id = l.job_id WHERE l.job_id = %s",
                [email],
            ),
            10,
            "the email never started",
        )[0][0]
        left = wdb.one("SELECT count(*) FROM {jobs} WHERE queue = 'imports' AND state = 'queued'")
    print(f"\n[fairness] the email waited {waited * 1000:.0f} ms; {left} imports still queued")
    # A claim round here is a few milliseconds; the backlog still had most of its jobs to go.
    assert waited < 0.5, f"the email waited {waited:.3f}s behind the imports backlog"
    assert left > 1000, f"only {left} imports were left: the backlog did not stand in the way"


def test_queue_weights_share_the_slots_by_weight(wapp: worker_app.App, wdb: Db) -> None:
    for queue in ("bulk", "urgent"):
        wapp.queue.enqueue_many([JobSpec("record", {"note": queue}, queue=queue) for _ in range(400)])
    with thread_worker(wapp, wdb, queues=("bulk", "urgent"), concurrency=4, queue_weights={"urgent": 3}):
        wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") >= 200, 20, "jobs did not start")
    first = [r[0] for r in wdb.rows("SELECT note FROM {log} ORDER BY seq LIMIT 200")]
    shares = Counter(first)
    # urgent gets three jobs for each of bulk's while both have ready jobs
    assert 2.4 < shares["urgent"] / shares["bulk"] < 3.6, shares


def test_priority_still_orders_jobs_within_a_queue(wapp: worker_app.App, wdb: Db) -> None:
    wapp.queue.enqueue_many(
        [JobSpec("record", {"note": f"a{p}"}, queue="a", priority=p) for p in (9, 5, 1, 7, 3)]
        + [JobSpec("record", {"note": f"b{p}"}, queue="b", priority=p) for p in (2, 8, 4, 6)]
    )
    with thread_worker(wapp, wdb, queues=("a", "b"), concurrency=1, prefetch=0):
        wait_until(lambda: wdb.one("SELECT count(*) FROM {log}") == 9, 20, "jobs did not run")
    notes = [r[0] for r in wdb.rows("SELECT note FROM {log} ORDER BY seq")]
    assert [n for n in notes if n.startswith("a")] == ["a1", "a3", "a5", "a7", "a9"]
    assert [n for n in notes if n.startswith("b")] == ["b2", "b4", "b6", "b8"]
    # and the two queues take turns
    assert [n[0] for n in notes[:8]] == ["a", "b"] * 4, notes
