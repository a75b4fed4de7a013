"""Cancelling running jobs, and progress reported through JobContext.set_progress.

A cancel is a promise to the user: the job does not run again. It must hold however the attempt
under way then ends, whether the worker heard of the cancel or not.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
import worker_app
from worker_helpers import Db, Workers, thread_worker, wait_until

from pgqueue import JobState

pytestmark = pytest.mark.slow


def wait_cancelled(
    app: worker_app.App, job_id: int, timeout: float, logs: Callable[[], str] = lambda: ""
) -> None:
    wait_until(
        lambda: app.queue.get_job(job_id).state is JobState.CANCELLED,
        timeout,
        lambda: f"job {app.queue.get_job(job_id)}\n{logs()}",
    )


def test_cancelling_a_running_async_job_stops_it_promptly(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2) as w:
        job_id = wapp.queue.enqueue("progress_then_sleep", {"seconds": 30})
        # Progress reaches the jobs table while the job runs.
        wait_until(
            lambda: (
                wdb.one("SELECT progress FROM {all_jobs} AS j WHERE id = %s", [job_id])
                == {"step": "halfway", "percent": 50}
            ),
            5,
            lambda: f"progress is {wdb.one('SELECT progress FROM {all_jobs} AS j WHERE id = %s', [job_id])}",
        )
        asked = time.monotonic()
        assert wapp.queue.cancel(job_id)
        wait_cancelled(wapp, job_id, 5)
        took = time.monotonic() - asked
        assert took < 1.0, took
        # The worker goes on with other jobs.
        other = wapp.queue.enqueue("record", {"note": "next"})
        wait_until(lambda: wapp.queue.get_job(other).state is JobState.COMPLETED, 5, "worker stuck")
        assert w.alive()
    job = wapp.queue.get_job(job_id)
    assert job.finished_at is not None
    assert job.attempts == 1
    assert [e["type"] for e in job.errors] == ["JobCancelled"]
    finished, cancelled = wdb.one("SELECT finished_at, cancelled_at FROM {log} WHERE job_id = %s", [job_id])
    assert finished is None and cancelled is not None  # the coroutine itself was cancelled
    assert not wapp.queue.cancel(job_id)  # already finished


def test_the_last_progress_a_handler_reports_is_kept(wapp: worker_app.App, wdb: Db) -> None:
    """set_progress(40) is written while the job runs; the final set_progress(100) must not be
    dropped because the job completed before the next periodic write."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("progress_to_end")
        wait_until(
            lambda: wdb.one("SELECT progress FROM {all_jobs} AS j WHERE id = %s", [job_id]) == 40,
            5,
            "progress 40 never written while the job ran",
        )
        wait_until(lambda: wapp.queue.get_job(job_id).state is JobState.COMPLETED, 5, "job never completed")
        time.sleep(0.7)  # one more round of the worker's progress writer
    assert wapp.queue.get_job(job_id).progress == 100


def test_a_handler_that_stops_when_told_by_raising_ends_cancelled(wapp: worker_app.App, wdb: Db) -> None:
    """A sync handler cannot be interrupted; told through ctx.is_cancelled(), it stops by raising
    its own error. That is the cancel working, not a failed attempt to retry."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2) as w:
        job_id = wapp.queue.enqueue("stops_when_told", {"seconds": 20})
        wait_until(lambda: wdb.runs(job_id) == 1, 10, "the job never started")
        assert wapp.queue.cancel(job_id)
        wait_cancelled(wapp, job_id, 5)
        time.sleep(0.5)  # a retry would be due after 0.1 s
        assert w.alive()
    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.CANCELLED
    assert wdb.runs(job_id) == 1
    assert [e["type"] for e in job.errors] == ["RuntimeError"]  # what the handler said as it stopped


def test_a_sync_handler_that_ignores_the_cancel_and_returns_ends_cancelled(
    wapp: worker_app.App, wdb: Db
) -> None:
    """A sync handler cannot be interrupted and this one never looks: it returns as if nothing
    happened. The cancel came while it ran, so the job ends cancelled, its result not kept."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("sleep_sync", {"seconds": 1.0})
        wait_until(lambda: wdb.runs(job_id) == 1, 10, "the job never started")
        assert wapp.queue.cancel(job_id)
        wait_cancelled(wapp, job_id, 5)
    job = wapp.queue.get_job(job_id)
    assert job.result is None
    assert [e["type"] for e in job.errors] == ["JobCancelled"]
    assert wdb.one("SELECT finished_at IS NOT NULL FROM {log} WHERE job_id = %s", [job_id])  # it ran out


def test_a_handler_raising_job_cancelled_ends_its_job_cancelled(wapp: worker_app.App, wdb: Db) -> None:
    """JobCancelled from the handler itself, with no cancel asked: the job ends cancelled, not a
    failed attempt to retry."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("cancels_itself")
        wait_cancelled(wapp, job_id, 5)
        time.sleep(0.5)  # a retry would be due after 0.1 s
    assert wdb.runs(job_id) == 1
    assert [e["message"] for e in wapp.queue.get_job(job_id).errors] == ["not wanted any more"]


@pytest.mark.parametrize("ending", ["fails", "handed_back", "worker_killed", "released"])
def test_a_cancel_the_worker_never_heard_of_still_ends_the_job(
    ending: str, wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    """The cancel is written (the flag queue.cancel sets) but the worker never hears of it: a
    listener behind a transaction pooler hears no notification, and one in flight arrives after
    the attempt has ended. However the attempt then ends (it fails, is handed back at shutdown,
    its worker is killed, or it never left the prefetch buffer), the job ends cancelled and is
    never run again."""
    lease = "2" if ending == "worker_killed" else "30"  # 30: no heartbeat tells the worker either
    args = ("--concurrency", "1", "--prefetch", "1", "--lease-seconds", lease, "--grace-period", "0.5")
    env = {"PGQUEUE_RESCUE_INTERVAL": "0.5"}
    worker = wprocs.start(*args, env=env)
    wprocs.wait_registered(wdb, worker)
    blocker = wapp.queue.enqueue("fail_on_flag", {"flag": "go", "seconds": 60})
    wait_until(lambda: wdb.runs(blocker) == 1, 10, worker.log_tail)
    target = blocker
    if ending == "released":  # claimed into the buffer behind the blocker, never started
        target = wapp.queue.enqueue("record", {"note": "must not run"})
        wait_until(
            lambda: wdb.one("SELECT state::text FROM {jobs} WHERE id = %s", [target]) == "running",
            10,
            worker.log_tail,
        )
    assert wdb.one("UPDATE {jobs} SET cancel_requested = true WHERE id = %s RETURNING id", [target])

    if ending == "fails":
        wdb.set_flag("go")
    elif ending in ("handed_back", "released"):
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.log_tail()
    else:
        worker.signal(signal.SIGKILL)
        worker.wait(10)
        wprocs.start(*args, env=env)  # it rescues the lost lease

    wait_cancelled(wapp, target, 20, wprocs.logs)
    if ending != "worker_killed":  # a worker for the queue, to run the job if it were back
        wprocs.start(*args, env=env)
    time.sleep(1.5)  # a retry is due after 0.1 s; a released job runs at once
    job = wapp.queue.get_job(target)
    assert job.state is JobState.CANCELLED, job
    assert wdb.runs(target) == (0 if ending == "released" else 1), wprocs.logs()
    assert wdb.one("SELECT count(*) FROM {jobs} WHERE id = %s", [target]) == 0
    assert wdb.one("SELECT count(*) FROM {dead_letter} WHERE id = %s", [target]) == 0
    if ending == "fails":
        assert [e["type"] for e in job.errors] == ["RuntimeError"]
    if ending == "worker_killed":
        assert [e["type"] for e in job.errors] == ["LeaseExpired"]
