"""Shutdown by signal: running jobs finish within the grace period, the rest are handed back."""

from __future__ import annotations

import signal
import time

import pytest
import worker_app
from worker_helpers import Db, WorkerProcess, Workers, wait_until

from pgqueue import JobState

pytestmark = pytest.mark.slow


def start_and_wait_running(
    wapp: worker_app.App, wdb: Db, wprocs: Workers, task: str, seconds: float, *args: str
) -> tuple[WorkerProcess, int]:
    worker = wprocs.start("--concurrency", "2", *args)
    wprocs.wait_registered(wdb, worker)
    job_id = wapp.queue.enqueue(task, {"seconds": seconds})
    wait_until(
        lambda: wdb.rows("SELECT 1 FROM {log} WHERE job_id = %s", [job_id]),
        10,
        lambda: f"job never started\n{worker.log_tail()}",
    )
    return worker, job_id


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_lets_the_running_job_finish_then_exits_0(
    wapp: worker_app.App, wdb: Db, wprocs: Workers, sig: signal.Signals
) -> None:
    """SIGTERM (systemd), SIGINT (Ctrl-C) and SIGHUP (the shell that started the worker went
    away) all stop it gracefully."""
    worker, job_id = start_and_wait_running(wapp, wdb, wprocs, "sleep_async", 1.0)
    queued_later = wapp.queue.enqueue("record", {"note": "not claimed after the signal"}, delay=0.3)
    worker.signal(sig)
    assert worker.wait(10) == 0, worker.log_tail()
    assert f"{sig.name}: stop claiming" in worker.log_text(), worker.log_tail()

    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.COMPLETED
    assert job.result == "slept" and job.attempts == 1 and job.errors == []
    finished, cancelled = wdb.one("SELECT finished_at, cancelled_at FROM {log} WHERE job_id = %s", [job_id])
    assert finished is not None and cancelled is None
    # Stopped claiming: the job that fell due during shutdown was left for another worker.
    assert wapp.queue.get_job(queued_later).state is JobState.QUEUED
    assert wdb.one("SELECT count(*) FROM {workers}") == 0  # deregistered


def test_grace_period_over_requeues_the_job_without_counting_the_attempt(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    worker, job_id = start_and_wait_running(wapp, wdb, wprocs, "sleep_async", 5.0, "--grace-period", "0.5")
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0, worker.log_tail()
    took = time.monotonic() - signalled
    assert took < 3.0, f"exit took {took:.1f}s with a 0.5 s grace period"

    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.QUEUED
    assert job.attempts == 0
    assert job.errors == []
    assert job.worker_id is None
    assert job.run_at is not None and job.run_at <= wdb.one("SELECT now()")  # runnable at once
    finished, cancelled = wdb.one("SELECT finished_at, cancelled_at FROM {log} WHERE job_id = %s", [job_id])
    assert finished is None and cancelled is not None  # the handler was cancelled, not left running
    assert "grace period over" in worker.log_text()


def test_grace_period_over_with_a_sync_job_exits_within_the_grace_period(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    """A plain-function job cannot be cancelled; once the grace period is over and the job is
    handed back, the process must still exit (and not keep running the handed-back job, which
    another worker may now claim)."""
    worker, job_id = start_and_wait_running(wapp, wdb, wprocs, "sleep_sync", 5.0, "--grace-period", "0.5")
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.log_tail()
    took = time.monotonic() - signalled
    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.QUEUED and job.attempts == 0
    assert took < 3.0, f"the process exited {took:.1f}s after SIGTERM, grace period 0.5 s"


def test_second_signal_exits_at_once_and_the_lease_saves_the_job(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    worker, job_id = start_and_wait_running(wapp, wdb, wprocs, "sleep_async", 5.0)
    worker.signal(signal.SIGTERM)
    time.sleep(0.2)
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(5)
    assert time.monotonic() - signalled < 2.0
    assert code != 0
    # Not acknowledged: still running under the dead worker's lease, for rescue to pick up.
    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.RUNNING and job.attempts == 1
