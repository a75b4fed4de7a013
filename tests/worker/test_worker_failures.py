"""Failures: backoff schedules, Retry and Abort, timeouts, the dead letter table, retry from it."""

from __future__ import annotations

import subprocess
import sys
from itertools import pairwise

import pytest
import worker_app
from worker_helpers import Db, Workers, thread_worker, wait_until

from pgqueue import JobSpec, JobState

pytestmark = pytest.mark.slow


def attempt_starts(db: Db, job_id: int) -> list[float]:
    """Epoch seconds (database clock) at which each attempt's handler started, in attempt order."""
    return [
        r[0]
        for r in db.rows(
            "SELECT extract(epoch FROM started_at)::float8 FROM {log} WHERE job_id = %s ORDER BY attempt",
            [job_id],
        )
    ]


def test_backoff_schedules_are_followed(wapp: worker_app.App, wdb: Db) -> None:
    """fixed(0.5) and exponential(base=0.2, factor=2, jitter=0), each failing 3 times."""
    with thread_worker(wapp, wdb, queues=("default",), concurrency=4):
        fixed_id = wapp.queue.enqueue("flaky_fixed", {"fails": 3})
        exp_id = wapp.queue.enqueue("flaky_exp", {"fails": 3})
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 2,
            15,
            lambda: f"states {wdb.states()}",
        )
    for job_id, delays in ((fixed_id, [0.5, 0.5, 0.5]), (exp_id, [0.2, 0.4, 0.8])):
        starts = attempt_starts(wdb, job_id)
        assert len(starts) == 4, starts
        gaps = [b - a for a, b in pairwise(starts)]
        for gap, delay in zip(gaps, delays, strict=True):
            assert delay <= gap < delay + 0.6, (job_id, gaps, delays)
        job = wapp.queue.get_job(job_id)
        assert job.state is JobState.COMPLETED
        assert job.attempts == 4
        assert job.result == 4
        assert [e["attempt"] for e in job.errors] == [1, 2, 3]
        assert {e["type"] for e in job.errors} == {"RuntimeError"}
        assert all("planned failure" in e["traceback"] for e in job.errors)


def test_last_failed_attempt_dead_letters_and_retry_dead_runs_it_again(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("needs_flag", {"flag": "go"})  # max_attempts=2
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {dead_letter}") == 1,
            10,
            lambda: f"states {wdb.states()}",
        )
        assert wdb.one("SELECT count(*) FROM {all_jobs} AS j WHERE id = %s", [job_id]) == 0
        attempts, errors = wdb.one("SELECT attempts, errors FROM {dead_letter} WHERE id = %s", [job_id])
        assert attempts == 2
        assert [e["attempt"] for e in errors] == [1, 2]
        for e in errors:
            assert e["type"] == "ValueError"
            assert "flag 'go' is not set" in e["message"]
            assert "Traceback" in e["traceback"] and "needs_flag" in e["traceback"]
        dead = wapp.queue.get_job(job_id)
        assert dead.state is JobState.DEAD
        assert dead.attempts == 2 and len(dead.errors) == 2

        # Fixed (the flag is now set): retry from the dead letter, same id, fresh attempts.
        wdb.set_flag("go")
        assert wapp.queue.retry_dead(job_id)
        wait_until(
            lambda: wapp.queue.get_job(job_id).state is JobState.COMPLETED,
            10,
            lambda: f"job {wapp.queue.get_job(job_id)}",
        )
    job = wapp.queue.get_job(job_id)
    assert job.attempts == 1  # fresh attempts: the first try after the retry succeeded
    assert job.result == "flag found"
    assert len(job.errors) == 2  # the history before the retry is kept
    assert wdb.one("SELECT count(*) FROM {dead_letter}") == 0
    assert wdb.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job_id]) == 3


def test_cli_retry_of_a_queue_puts_its_dead_jobs_back(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("mail", "other"), concurrency=4):
        mail = [wapp.queue.enqueue("needs_flag", {"flag": "cli"}, queue="mail") for _ in range(3)]
        other = wapp.queue.enqueue("needs_flag", {"flag": "cli"}, queue="other")
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {dead_letter}") == 4,
            10,
            lambda: f"states {wdb.states()}",
        )
        wdb.set_flag("cli")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pgqueue",
                "retry",
                "--queue",
                "mail",
                "--dsn",
                wdb.dsn,
                "--schema",
                wdb.schema,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "3 dead jobs re-queued" in done.stdout
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 3,
            10,
            lambda: f"states {wdb.states()}",
        )
    finished = wdb.rows("SELECT id FROM {finished} WHERE state = 'completed'")
    assert sorted(r[0] for r in finished) == sorted(mail)
    assert [r[0] for r in wdb.rows("SELECT id FROM {dead_letter}")] == [other]


def test_abort_dead_letters_at_once(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("abort_now")  # max_attempts is 3: Abort skips the rest
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {dead_letter}") == 1,
            10,
            lambda: f"states {wdb.states()}",
        )
    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.DEAD
    assert job.attempts == 1
    assert [(e["type"], e["message"]) for e in job.errors] == [("Abort", "this input can never work")]
    assert job.errors[0]["traceback"]
    assert wdb.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job_id]) == 1


def test_retry_with_a_delay_runs_again_after_that_delay(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("retry_later", {"seconds": 0.3})
        wait_until(
            lambda: wapp.queue.get_job(job_id).state is JobState.COMPLETED,
            10,
            lambda: f"job {wapp.queue.get_job(job_id)}",
        )
    starts = attempt_starts(wdb, job_id)
    assert len(starts) == 2
    assert 0.3 <= starts[1] - starts[0] < 0.9, starts
    job = wapp.queue.get_job(job_id)
    assert job.attempts == 2 and job.result == 2
    assert [e["type"] for e in job.errors] == ["Retry"]


def test_async_handler_past_its_timeout_is_cancelled(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("sleep_async", {"seconds": 5}, timeout=0.3, max_attempts=1)
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {dead_letter}") == 1,
            10,
            lambda: f"states {wdb.states()}",
        )
    job = wapp.queue.get_job(job_id)
    assert [e["type"] for e in job.errors] == ["JobTimeout"]
    assert "timed out after 0.3s" in job.errors[0]["message"]
    finished, cancelled, after = wdb.one(
        "SELECT l.finished_at, l.cancelled_at,"
        " extract(epoch FROM l.cancelled_at - d.started_at)::float8"
        " FROM {log} AS l JOIN {dead_letter} AS d ON d.id = l.job_id WHERE l.job_id = %s",
        [job_id],
    )
    assert finished is None  # the coroutine never got past its sleep: it was cancelled
    # ... at the timeout, counted from the claim.
    assert cancelled is not None and 0.3 <= after < 0.8, after


def test_timeout_fails_the_attempt_and_backoff_applies(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("sleep_async", {"seconds": 5}, timeout=0.2, max_attempts=2)
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {dead_letter}") == 1,
            15,
            lambda: f"states {wdb.states()}",
        )
    job = wapp.queue.get_job(job_id)
    assert job.attempts == 2
    assert [e["type"] for e in job.errors] == ["JobTimeout", "JobTimeout"]
    starts = attempt_starts(wdb, job_id)
    assert starts[1] - starts[0] >= 0.2 + 2.0  # the default backoff: 2 s after the first failure


def test_sync_handler_past_its_timeout_is_recorded_as_timed_out(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=2):
        job_id = wapp.queue.enqueue("sleep_sync", {"seconds": 1.5}, timeout=0.3, max_attempts=1)
        wait_until(
            lambda: wdb.one("SELECT count(*) FROM {dead_letter}") == 1,
            10,
            lambda: f"states {wdb.states()}",
        )
        failed_after = wdb.one(
            "SELECT extract(epoch FROM failed_at - started_at)::float8 FROM {dead_letter} WHERE id = %s",
            [job_id],
        )
        # The attempt failed at the timeout (counted from the claim), not when the thread returned.
        assert 0.3 <= failed_after < 1.0, failed_after
        # Let the abandoned thread finish before the worker stops.
        wait_until(
            lambda: wdb.one("SELECT finished_at FROM {log} WHERE job_id = %s", [job_id]),
            5,
            "the abandoned thread never finished",
        )
    job = wapp.queue.get_job(job_id)
    assert job.state is JobState.DEAD
    assert [e["type"] for e in job.errors] == ["JobTimeout"]
    assert "timed out after 0.3s" in job.errors[0]["message"]


def test_unknown_task_is_dead_lettered_and_the_worker_goes_on(wapp: worker_app.App, wdb: Db) -> None:
    with thread_worker(wapp, wdb, queues=("default",), concurrency=1) as w:
        unknown = wapp.queue.enqueue("no_such_task", {"x": 1})  # enqueue by name is allowed
        known = wapp.queue.enqueue("record", {"note": "after"})
        wait_until(
            lambda: (
                wdb.one("SELECT count(*) FROM {dead_letter}") == 1
                and wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 1
            ),
            10,
            lambda: f"states {wdb.states()}",
        )
        assert w.alive()
        later = wapp.queue.enqueue("record", {"note": "later"})
        wait_until(
            lambda: wapp.queue.get_job(later).state is JobState.COMPLETED,
            10,
            "worker stopped working",
        )
    job = wapp.queue.get_job(unknown)
    assert job.state is JobState.DEAD
    assert job.attempts == 1
    assert job.errors[0]["type"] == "UnknownTaskError"
    assert "no_such_task" in job.errors[0]["message"]
    assert wapp.queue.get_job(known).state is JobState.COMPLETED


def test_a_backoff_that_raises_or_says_nonsense_still_ends_the_attempt(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    """A task's backoff may raise, or return infinity or text; the failed attempt still gets its
    outcome (a retry after the default backoff, the backoff's fault logged), not a job left
    running with its slot taken for good. ``Retry(in_=inf)`` is refused by name in the handler."""
    proc = wprocs.start("--concurrency", "2")  # fewer slots than bad backoffs: a lost slot shows
    wprocs.wait_registered(wdb, proc)
    hostile = [wapp.queue.enqueue(name) for name in ("backoff_raises", "backoff_infinite", "backoff_text")]
    never = wapp.queue.enqueue("retry_never")
    wait_until(
        lambda: (
            wdb.one("SELECT count(*) FROM {dead_letter}") == len(hostile)
            and wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 1
        ),
        20,
        lambda: f"states {wdb.states()}\n{proc.log_tail()}",
    )
    for job_id in hostile:
        job = wapp.queue.get_job(job_id)
        assert job.state is JobState.DEAD and job.attempts == 2, job
        assert [e["type"] for e in job.errors] == ["RuntimeError", "RuntimeError"], job.errors
        starts = attempt_starts(wdb, job_id)
        assert 2.0 <= starts[1] - starts[0] < 3.0, starts  # the default backoff's first step: 2 s
    log = proc.log_text()
    assert "its backoff raised ZeroDivisionError: a backoff with a bug" in log, log
    assert "its backoff returned inf" in log, log
    assert "its backoff raised ValueError" in log, log  # float("soon")
    job = wapp.queue.get_job(never)
    assert job.state is JobState.COMPLETED and job.result == 2, job
    assert [e["type"] for e in job.errors] == ["ConfigurationError"], job.errors
    assert "in_ must be" in job.errors[0]["message"], job.errors
    # Both slots still work.
    ids = wapp.queue.enqueue_many([JobSpec("record") for _ in range(4)])
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 1 + len(ids),
        10,
        lambda: f"states {wdb.states()}\n{proc.log_tail()}",
    )
    assert proc.alive()
