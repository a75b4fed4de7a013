"""The scheduler in-process against real PostgreSQL: the fire-time claim, missed fires, run-time
changes, ``ctx.scheduled_for`` and follow-up jobs cancelled by key.

Interval schedules are anchored on 2000-01-01T00:00Z, so an ``every=N s`` schedule fires at the
Unix times that are multiples of N: tests that need to start "just after" or "between" fire
times sleep to a phase of that grid first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from worker_helpers import HISTORY_COLUMNS, wait_until

from pgqueue import ConfigurationError, JobContext, JobState, Queue, ScheduleNotFoundError
from pgqueue._schedules import fire_key
from pgqueue.scheduler import Scheduler
from pgqueue.worker import AsyncWorker

T = TypeVar("T")
SECOND = timedelta(seconds=1)


# ---------------------------------------------------------------------------- helpers


def sleep_until_phase(period: float, phase: float) -> float:
    """Sleep until ``phase`` s past a multiple of ``period`` (Unix time); return that multiple."""
    now = time.time()
    time.sleep((phase - now % period) % period)
    return math.floor((time.time() - phase + 0.05) / period) * period


def at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


class Jobs:
    """Reads the test schema's jobs and schedules tables behind the queue's back."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema

    def rows(self, where: str = "true", params: Any = None, table: str = "jobs") -> list[dict[str, Any]]:
        """Rows of ``table``; for "jobs", live and finished jobs alike (their common columns)."""
        source = sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))
        if table == "jobs":
            source = sql.SQL(
                "(SELECT {c} FROM {s}.jobs UNION ALL SELECT {c} FROM {s}.finished_jobs) AS j"
            ).format(c=sql.SQL(HISTORY_COLUMNS), s=sql.Identifier(self.schema))
        query = sql.SQL("SELECT * FROM {} WHERE {} ORDER BY 1").format(
            source,
            sql.SQL(where),  # type: ignore[arg-type]
        )
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(query, params).fetchall()

    def of(self, queue: str) -> list[dict[str, Any]]:
        return sorted(self.rows("queue = %s", [queue]), key=lambda r: (r["scheduled_for"], r["id"]))

    def execute(self, statement: str, params: Any = None) -> None:
        query = sql.SQL(statement).format(s=sql.Identifier(self.schema))  # type: ignore[arg-type]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query, params)

    def schedule_row(self, name: str) -> dict[str, Any]:
        (row,) = self.rows("name = %s", [name], table="schedules")
        return row


@pytest.fixture
def jobs(postgres_dsn: str, pgqueue_schema: str) -> Jobs:
    return Jobs(postgres_dsn, pgqueue_schema)


@pytest.fixture
def schedulers() -> Iterator[list[Scheduler]]:
    """Schedulers a test starts; every one is shut down (and its own queue closed) afterwards."""
    started: list[Scheduler] = []
    yield started
    for scheduler in started:
        scheduler.shutdown()
        scheduler.queue.close()


def start_scheduler(
    schedulers: list[Scheduler], dsn: str, schema: str, reconcile_interval: float = 0.5
) -> Scheduler:
    scheduler = Scheduler(Queue(dsn, schema=schema), reconcile_interval=reconcile_interval)
    schedulers.append(scheduler)
    scheduler.start()
    return scheduler


# ---------------------------------------------------------------------------- the claim


def test_one_job_per_instant_whatever_offset_the_fire_time_is_given_in(
    queue: Queue, jobs: Jobs, schedulers: list[Scheduler], postgres_dsn: str, pgqueue_schema: str
) -> None:
    queue.add_schedule("paris-0230", "cleanup", cron="30 2 * * *", timezone="Europe/Paris", queue="dst")
    scheduler = start_scheduler(schedulers, postgres_dsn, pgqueue_schema, reconcile_interval=60)
    paris = ZoneInfo("Europe/Paris")
    # On the spring-forward night 02:30 Paris does not exist: it is the instant of 03:30 CEST.
    same_instant = [
        datetime(2026, 3, 29, 2, 30, tzinfo=paris),
        datetime(2026, 3, 29, 3, 30, tzinfo=paris),
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        datetime(2026, 3, 29, 10, 30, tzinfo=ZoneInfo("Asia/Tokyo")),
    ]
    assert len({t.astimezone(UTC) for t in same_instant}) == 1

    ids = [scheduler.fire("paris-0230", t) for t in same_instant]

    assert ids[0] is not None and ids[1:] == [None, None, None]
    (job,) = jobs.of("dst")
    assert job["id"] == ids[0]
    assert job["scheduled_for"] == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert job["unique_key"] == "schedule:paris-0230:2026-03-29T01:30:00+00:00"
    assert job["task"] == "cleanup"
    # The claim, not the live-job unique index, is what refuses it: still once after it finished.
    assert queue.cancel(job["id"])
    assert scheduler.fire("paris-0230", same_instant[1]) is None
    assert len(jobs.of("dst")) == 1
    # A later instant is a new fire time.
    assert scheduler.fire("paris-0230", datetime(2026, 3, 30, 2, 30, tzinfo=paris)) is not None
    assert len(jobs.of("dst")) == 2


def test_stored_next_fire_time_is_after_the_fire_just_made(
    queue: Queue, jobs: Jobs, schedulers: list[Scheduler], postgres_dsn: str, pgqueue_schema: str
) -> None:
    """What ``list_schedules()`` (and the admin dashboard) shows as the next fire time."""
    queue.add_schedule("often", "tick", every=SECOND, queue="often")
    start_scheduler(schedulers, postgres_dsn, pgqueue_schema, reconcile_interval=30)
    wait_until(lambda: jobs.of("often"), 5, "the schedule never fired")

    (stored,) = queue.list_schedules()
    assert stored.last_fire_at is not None and stored.next_fire_at is not None
    assert stored.next_fire_at == stored.last_fire_at + SECOND, (
        stored.last_fire_at,
        stored.next_fire_at,
    )


# ---------------------------------------------------------------------------- missed fires


def store_missed(
    queue: Queue, jobs: Jobs, name: str, every: float, missed_for: float, **options: Any
) -> None:
    """A schedule whose last fire was ``missed_for`` seconds ago: every scheduler was down since."""
    queue.add_schedule(name, "tick", every=timedelta(seconds=every), queue=name, **options)
    jobs.execute(
        "UPDATE {s}.schedules SET last_fire_at = now() - make_interval(secs => %s) WHERE name = %s",
        [missed_for, name],
    )


def test_missed_fires_are_skipped_by_default(
    queue: Queue, jobs: Jobs, schedulers: list[Scheduler], postgres_dsn: str, pgqueue_schema: str
) -> None:
    store_missed(queue, jobs, "skipper", every=2, missed_for=10)
    assert queue.list_schedules()[0].misfire == "skip"

    missed = sleep_until_phase(2, 0.3)  # 0.3 s after a fire time nobody was up for
    started_at = time.time()
    start_scheduler(schedulers, postgres_dsn, pgqueue_schema)
    assert time.time() - started_at < 1.5, "start-up too slow for this test's timing"

    first = wait_until(lambda: jobs.of("skipper"), 4, "no on-time fire after start-up")[0]
    assert first["scheduled_for"] == at(missed + 2), "a missed fire time was enqueued"
    assert all(j["scheduled_for"] > at(started_at) for j in jobs.of("skipper"))


def test_coalesce_runs_the_latest_missed_fire_once_even_with_two_schedulers(
    queue: Queue, jobs: Jobs, schedulers: list[Scheduler], postgres_dsn: str, pgqueue_schema: str
) -> None:
    store_missed(
        queue,
        jobs,
        "catchup",
        every=2,
        missed_for=11,
        misfire="coalesce",
        misfire_grace=timedelta(seconds=30),
    )

    latest_missed = sleep_until_phase(2, 0.3)
    started_at = time.time()
    threads = [
        threading.Thread(target=start_scheduler, args=(schedulers, postgres_dsn, pgqueue_schema))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    up_at = time.time()
    assert len(schedulers) == 2 and not any(t.is_alive() for t in threads)
    assert up_at - started_at < 1.5, "start-up too slow for this test's timing"

    caught_up = [j for j in jobs.of("catchup") if j["scheduled_for"] < at(started_at)]
    assert [j["scheduled_for"] for j in caught_up] == [at(latest_missed)]
    assert caught_up[0]["unique_key"] == fire_key("catchup", at(latest_missed))
    assert caught_up[0]["created_at"] <= at(up_at), "not run at start-up"

    # And on from there, one job per fire time between the two schedulers.
    wait_until(lambda: len(jobs.of("catchup")) >= 3, 6, "the schedulers stopped firing")
    times = [j["scheduled_for"] for j in jobs.of("catchup")]
    assert times[:3] == [at(latest_missed + 2 * n) for n in range(3)]
    assert len(times) == len(set(times))


def test_coalesce_outside_the_grace_time_runs_nothing(
    queue: Queue, jobs: Jobs, schedulers: list[Scheduler], postgres_dsn: str, pgqueue_schema: str
) -> None:
    store_missed(
        queue,
        jobs,
        "too-late",
        every=4,
        missed_for=13,
        misfire="coalesce",
        misfire_grace=timedelta(seconds=1),
    )

    latest_missed = sleep_until_phase(4, 2.0)  # the latest missed fire is 2 s old: out of grace
    start_scheduler(schedulers, postgres_dsn, pgqueue_schema)
    time.sleep(max(0.0, latest_missed + 3.6 - time.time()))
    assert jobs.of("too-late") == []

    first = wait_until(lambda: jobs.of("too-late"), 3, "no on-time fire after start-up")[0]
    assert first["scheduled_for"] == at(latest_missed + 4)


# ---------------------------------------------------------------------------- run-time changes


def test_run_time_changes_reach_a_running_scheduler(
    queue: Queue, jobs: Jobs, schedulers: list[Scheduler], postgres_dsn: str, pgqueue_schema: str
) -> None:
    start_scheduler(schedulers, postgres_dsn, pgqueue_schema, reconcile_interval=0.5)

    added_at = time.time()
    queue.add_schedule("rt", "tick", every=SECOND, queue="rt")
    wait_until(lambda: jobs.of("rt"), 3.5, "an added schedule never fired")
    assert time.time() - added_at < 3.0  # reconcile (0.5 s) + the interval (1 s) + slack
    wait_until(lambda: len(jobs.of("rt")) >= 2, 3, "the added schedule fired once only")

    # Changed: every 2 s from now on (after at most one reconcile interval).
    queue.add_schedule("rt", "tick", every=2 * SECOND, queue="rt")
    changed_at = time.time()
    time.sleep(0.8)
    before = len(jobs.of("rt"))
    wait_until(lambda: len(jobs.of("rt")) >= before + 2, 6, "the changed schedule stopped firing")
    later = [j["scheduled_for"] for j in jobs.of("rt") if j["scheduled_for"] > at(changed_at + 0.8)]
    assert later and all(t.timestamp() % 2 == 0 for t in later), later
    assert all(b - a == 2 * SECOND for a, b in itertools.pairwise(later)), later

    # Paused: nothing more once pause_schedule returns; the scheduler sees it (no next fire).
    queue.pause_schedule("rt")
    paused_count = len(jobs.of("rt"))
    wait_until(lambda: jobs.schedule_row("rt")["next_fire_at"] is None, 2, "pause not seen")
    time.sleep(2.2)
    assert len(jobs.of("rt")) == paused_count

    # Resumed: firing again within reconcile + interval.
    resumed_at = time.time()
    queue.resume_schedule("rt")
    wait_until(lambda: len(jobs.of("rt")) > paused_count, 4, "a resumed schedule never fired")
    assert all(j["scheduled_for"] > at(resumed_at) for j in jobs.of("rt")[paused_count:])

    # Removed: nothing more.
    queue.remove_schedule("rt")
    removed_count = len(jobs.of("rt"))
    time.sleep(2.2)
    assert len(jobs.of("rt")) == removed_count
    assert queue.list_schedules() == []
    times = [j["scheduled_for"] for j in jobs.of("rt")]
    assert len(times) == len(set(times))


def test_add_schedule_refuses_bad_definitions_naming_them(queue: Queue) -> None:
    with pytest.raises(ConfigurationError, match=r"'nightly'.*99"):
        queue.add_schedule("nightly", "cleanup", cron="99 * * * *")
    with pytest.raises(ConfigurationError, match=r"'nightly'.*time zone"):
        queue.add_schedule("nightly", "cleanup", cron="0 2 * * *", timezone="Europe/Pariss")
    with pytest.raises(ConfigurationError, match="'nightly'"):
        queue.add_schedule("nightly", "cleanup")
    assert queue.list_schedules() == []
    for change in (queue.pause_schedule, queue.resume_schedule, queue.remove_schedule):
        with pytest.raises(ScheduleNotFoundError, match="nightly"):
            change("nightly")


# ---------------------------------------------------------------------------- ctx.scheduled_for


async def test_handler_sees_the_fire_time_as_ctx_scheduled_for(
    postgres_dsn: str, pgqueue_schema: str, jobs: Jobs
) -> None:
    q = Queue(postgres_dsn, schema=pgqueue_schema)
    seen: list[tuple[int, datetime | None]] = []

    @q.periodic(every=SECOND, name="stamp", queue="stamps")
    async def stamp(ctx: JobContext) -> str | None:
        seen.append((ctx.job_id, ctx.scheduled_for))
        return ctx.scheduled_for.isoformat() if ctx.scheduled_for else None

    scheduler = Scheduler(q, reconcile_interval=0.5)
    worker = AsyncWorker(q, queues=("stamps",), install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        scheduler.start()
        deadline = time.monotonic() + 8
        while len(seen) < 2 and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        plain_id = q.enqueue("stamp")  # enqueued by hand: no fire time
        while all(job_id != plain_id for job_id, _ in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        scheduler.shutdown()
        worker.stop()
        await asyncio.wait_for(task, 15)
        q.close()

    fired = {fire for name, fire, _ in scheduler.fired if name == "stamp"}
    periodic = [(job_id, when) for job_id, when in seen if job_id != plain_id]
    assert len(periodic) >= 2, seen
    for job_id, when in periodic:
        assert when is not None and when.utcoffset() == timedelta(0)
        assert when in fired
        assert when.microsecond == 0  # the 1-s grid, not the moment the scheduler woke up
        (row,) = jobs.rows("id = %s", [job_id])
        assert row["scheduled_for"] == when
        assert row["unique_key"] == fire_key("stamp", when)
        assert row["state"] == "completed" and row["result"] == when.isoformat()
    assert (plain_id, None) in seen


# ---------------------------------------------------------------------------- follow-ups


def test_follow_up_is_a_delayed_job_cancelled_by_its_key(queue: Queue) -> None:
    week = timedelta(days=7)
    first = queue.enqueue("send_followup", {"thread": 42}, delay=week, unique_key="followup:42")
    again = queue.enqueue("send_followup", {"thread": 42}, delay=week, unique_key="followup:42")
    assert again == first
    job = queue.get_job(first)
    assert job.state is JobState.QUEUED and job.is_delayed
    assert job.run_at is not None
    assert abs(job.run_at - (datetime.now(UTC) + week)) < timedelta(minutes=1)

    assert queue.cancel_by_key("followup:42") == 1  # the reply came: no follow-up
    assert queue.get_job(first).state is JobState.CANCELLED
    assert queue.cancel_by_key("followup:42") == 0
    assert queue.cancel_by_key("followup:43") == 0

    renewed = queue.enqueue("send_followup", {"thread": 42}, delay=week, unique_key="followup:42")
    assert renewed != first
    assert queue.get_job(renewed).state is JobState.QUEUED
    assert queue.get_job(first).state is JobState.CANCELLED
