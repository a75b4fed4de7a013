"""Cancelling running jobs, and progress reported through JobContext.set_progress."""

from __future__ import annotations

import time

import pytest
import worker_app
from worker_helpers import Db, thread_worker, wait_until

from pgqueue import JobState

pytestmark = pytest.mark.slow


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
        wait_until(
            lambda: wapp.queue.get_job(job_id).state is JobState.CANCELLED,
            5,
            lambda: f"job {wapp.queue.get_job(job_id)}",
        )
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
