"""Schedulers as real processes: ``pgqueue scheduler``, ``pgqueue worker --with-scheduler`` and the
``pgqueue schedules`` command, run with ``tests.support.scheduler_app:queue`` from the repository root.

Run with ``-s`` to see the measured fire-time lateness.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from scheduler_app import BAD_CRON_VARIABLE, TICK, TICK_QUEUE
from worker_helpers import HISTORY_COLUMNS, percentile, wait_until
from worker_helpers import PgqueueProcess as Proc

from pgqueue import Queue
from pgqueue._schedules import fire_key
from pgqueue.scheduler import Scheduler

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
APP = "tests.support.scheduler_app:queue"
SECOND = timedelta(seconds=1)


@pytest.fixture
def app_env(postgres_dsn: str, pgqueue_schema: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQUEUE_") and k != "NOTIFY_SOCKET"}
    env.update(PGQUEUE_DSN=postgres_dsn, PGQUEUE_SCHEMA=pgqueue_schema, PGQUEUE_LOG_LEVEL="INFO")
    env.pop(BAD_CRON_VARIABLE, None)
    return env


@pytest.fixture
def procs(tmp_path: Path, app_env: dict[str, str]) -> Iterator[Callable[..., Proc]]:
    """Start processes with ``procs(name, *args)``; any still running at the end is killed."""
    started: list[Proc] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, list(args), env or app_env, tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(5)


def run_cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgqueue", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tick_jobs(dsn: str, schema: str) -> list[dict[str, Any]]:
    """The tick jobs, live or finished."""
    query = sql.SQL(
        "SELECT {c} FROM {s}.jobs WHERE task = %(t)s UNION ALL SELECT {c} FROM {s}.finished_jobs"
        " WHERE task = %(t)s ORDER BY scheduled_for, id"
    ).format(c=sql.SQL(HISTORY_COLUMNS), s=sql.Identifier(schema))
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(query, {"t": TICK}).fetchall()


# ---------------------------------------------------------------------------- exactly once


def test_three_scheduler_processes_enqueue_each_fire_time_exactly_once(
    procs: Callable[..., Proc], postgres_dsn: str, pgqueue_schema: str
) -> None:
    # A worker finishes the jobs as they come, so the live-job unique index cannot hide a
    # second enqueue of a fire time: only the scheduler's claim keeps them single.
    worker = procs("worker", "worker", APP, "--queues", TICK_QUEUE)
    worker.wait_for_log("started: queues=", 20)
    schedulers = [procs(f"scheduler-{n}", "scheduler", APP) for n in range(3)]
    for scheduler in schedulers:
        scheduler.wait_for_log("scheduler started", 20)
    all_up = time.time()
    time.sleep(20)
    window_end = time.time()
    for scheduler in schedulers:
        assert scheduler.stop(10) == 0, scheduler.tail()
    wait_until(
        lambda: all(j["state"] == "completed" for j in tick_jobs(postgres_dsn, pgqueue_schema)),
        10,
        lambda: f"tick jobs left unfinished\n{worker.tail()}",
    )
    assert worker.stop(15) == 0, worker.tail()

    jobs = tick_jobs(postgres_dsn, pgqueue_schema)
    per_fire = Counter(j["scheduled_for"] for j in jobs)
    doubles = {t: n for t, n in per_fire.items() if n != 1}
    assert not doubles, f"fire times enqueued more than once: {doubles}"

    times = sorted(per_fire)
    gaps = [(a, b) for a, b in itertools.pairwise(times) if b - a != SECOND]
    assert not gaps, f"fire times missing between: {gaps}"
    first_expected = int(all_up) + 2  # the first whole second at least 1 s after all were up
    last_expected = int(window_end) - 1
    wanted = {datetime.fromtimestamp(s, tz=UTC) for s in range(first_expected, last_expected + 1)}
    assert len(wanted) >= 17
    assert wanted <= set(times), f"missing while all 3 were up: {sorted(wanted - set(times))}"

    key = re.compile(r"schedule:tick:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")
    for job in jobs:
        assert job["unique_key"] == fire_key(TICK, job["scheduled_for"])
        assert key.fullmatch(job["unique_key"]), job["unique_key"]
        assert job["queue"] == TICK_QUEUE
        assert job["result"] == job["scheduled_for"].isoformat()  # what ctx.scheduled_for said

    lateness = [(j["created_at"] - j["scheduled_for"]).total_seconds() for j in jobs]
    wins = {s.name: len(re.findall(r"schedule tick fired for", s.log())) for s in schedulers}
    p50, p99 = percentile(lateness, 50), percentile(lateness, 99)
    print(
        f"\n{len(jobs)} fire times over {window_end - all_up:.1f}s with 3 schedulers; "
        f"enqueued by {wins}; lateness (created_at - scheduled_for) "
        f"p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms max={max(lateness) * 1000:.1f} ms"
    )
    assert sum(wins.values()) == len(jobs)
    assert min(lateness) >= 0, "a job was enqueued before its fire time"
    assert p99 < 1.0
    for scheduler in schedulers:
        assert "Traceback" not in scheduler.log() and " ERROR " not in scheduler.log(), scheduler.tail()


def test_worker_with_scheduler_enqueues_and_runs_periodic_jobs_and_exits_0(
    procs: Callable[..., Proc], postgres_dsn: str, pgqueue_schema: str
) -> None:
    worker = procs("worker", "worker", APP, "--queues", TICK_QUEUE, "--with-scheduler")

    def completed() -> list[dict[str, Any]]:
        if worker.proc.poll() is not None:
            raise AssertionError(f"the worker exited\n{worker.tail()}")
        done = [j for j in tick_jobs(postgres_dsn, pgqueue_schema) if j["state"] == "completed"]
        return done if len(done) >= 3 else []

    wait_until(completed, 20, lambda: f"periodic jobs not run\n{worker.tail()}")
    assert worker.stop(15) == 0, worker.tail()

    stopped = tick_jobs(postgres_dsn, pgqueue_schema)
    time.sleep(1.5)
    jobs = tick_jobs(postgres_dsn, pgqueue_schema)
    assert jobs == stopped, "fire times enqueued after the process exited"
    times = [j["scheduled_for"] for j in jobs]
    assert len(times) == len(set(times))
    assert all(b - a == SECOND for a, b in itertools.pairwise(times)), times
    for job in jobs:
        if job["state"] == "completed":
            assert job["result"] == job["scheduled_for"].isoformat()
    assert "Traceback" not in worker.log(), worker.tail()


# ---------------------------------------------------------------------------- the CLI


def test_cli_add_with_a_bad_cron_exits_2_naming_the_schedule(
    app_env: dict[str, str], pgqueue_queue: Queue
) -> None:
    done = run_cli(app_env, "schedules", "add", "bad", "--task", "x", "--cron", "99 * * * *")
    assert done.returncode == 2, done
    assert "'bad'" in done.stderr and "99 * * * *" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert pgqueue_queue.list_schedules() == []


def test_scheduler_with_a_bad_declared_cron_exits_2_at_start_up_naming_it(
    app_env: dict[str, str], pgqueue_queue: Queue
) -> None:
    done = run_cli({**app_env, BAD_CRON_VARIABLE: "0 8 * * 8"}, "scheduler", APP)
    assert done.returncode == 2, done
    assert "'broken'" in done.stderr and "0 8 * * 8" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert pgqueue_queue.list_schedules() == []


def test_cli_lists_every_schedule_with_its_next_fire_time(
    app_env: dict[str, str], pgqueue_queue: Queue, postgres_dsn: str, pgqueue_schema: str
) -> None:
    # One declared in code (stored when a scheduler starts), some added at run time.
    app = Queue(postgres_dsn, schema=pgqueue_schema)
    app.schedule("cleanup", cron="0 2 * * *", timezone="Europe/Paris", name="nightly-cleanup")
    scheduler = Scheduler(app, reconcile_interval=60)
    try:
        scheduler.start()
    finally:
        scheduler.shutdown()
        app.close()
    pgqueue_queue.add_schedule(
        "daily-report",
        "send_report",
        {"kind": "daily"},
        cron="0 8 * * mon-fri",
        timezone="America/New_York",
    )
    pgqueue_queue.add_schedule("refresh", "refresh_stats", every=timedelta(hours=1), queue="reports")
    pgqueue_queue.add_schedule("on-hold", "cleanup", cron="*/5 * * * *")

    added = run_cli(
        app_env,
        "schedules",
        "add",
        "cli-added",
        "--task",
        "cleanup",
        "--cron",
        "30 2 * * *",
        "--timezone",
        "Europe/Paris",
    )
    assert added.returncode == 0, added
    paused = run_cli(app_env, "schedules", "pause", "on-hold")
    assert paused.returncode == 0, paused

    before = datetime.now(UTC)
    listed = run_cli(app_env, "schedules")
    after = datetime.now(UTC)
    assert listed.returncode == 0, listed

    stored = {s.name: s for s in pgqueue_queue.list_schedules()}
    assert set(stored) == {"nightly-cleanup", "daily-report", "refresh", "on-hold", "cli-added"}
    assert stored["on-hold"].paused and stored["cli-added"].timezone == "Europe/Paris"
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert set(lines) == set(stored), listed.stdout
    for name, schedule in stored.items():
        line = lines[name]
        shown = re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", line)
        if schedule.paused:
            assert shown == [] and " True " in line, line
            continue
        expected = {schedule.next_fire_time(before), schedule.next_fire_time(after)}
        assert len(shown) == 1 and datetime.fromisoformat(shown[0]) in expected, (line, expected)
        assert datetime.fromisoformat(shown[0]) > before
        assert schedule.task in line and schedule.timezone in line

    missing = run_cli(app_env, "schedules", "remove", "no-such-schedule")
    assert missing.returncode == 2 and "no-such-schedule" in missing.stderr, missing
