"""The scheduler: APScheduler computes fire times, the database makes each one enqueue once.

Every scheduler process runs every schedule. When a fire time comes, each process tries to
record it on the schedule's row (``last_fire_at < fire_at``) in the same transaction as the
enqueue; the first wins and the others find nothing to do. So any number of schedulers can run
(one per worker host, say) with no leader election and no double sends.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.executors.pool import ThreadPoolExecutor as APThreadPoolExecutor
from apscheduler.job import Job as APJob
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from pgqueue.base import QueueBase
from pgqueue.enqueue import JobSpec, make_request
from pgqueue.queue import Queue
from pgqueue.schedule_store import ScheduleStore
from pgqueue.schedules import Schedule, fire_key

log = logging.getLogger("pgqueue.scheduler")
ENQUEUE_EXECUTOR = "pgqueue-enqueue"
RECONCILE_JOB = "pgqueue-reconcile"


class _EnqueueExecutor(BaseExecutor):  # type: ignore[misc]
    """An APScheduler executor that receives each fire time and enqueues it (the plain
    executors would call a function without telling it which fire time it is for)."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self._pgqueue = scheduler
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pgqueue-fire")

    def _do_submit_job(self, job: APJob, run_times: list[datetime]) -> None:
        def fire() -> None:
            try:
                for run_time in run_times:
                    self._pgqueue.fire(job.id, run_time)
            except Exception as exc:
                log.exception("schedule %s: enqueue failed", job.id)
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, [])

        self._threads.submit(fire)

    def shutdown(self, wait: bool = True) -> None:
        self._threads.shutdown(wait=wait)


class Scheduler:
    """Enqueue the jobs of every schedule (declared in code or stored at run time) on time.

    ``start()`` runs in background threads (e.g. beside a worker); ``run()`` blocks until
    SIGTERM/SIGINT. Schedules changed at run time are picked up within ``reconcile_interval``.
    """

    def __init__(self, queue: QueueBase[Any], *, reconcile_interval: float = 5.0) -> None:
        # Firing is synchronous work in APScheduler's threads: an async app's queue gets a sync twin.
        self._owns_queue = not isinstance(queue, Queue)
        self.queue = (
            queue
            if isinstance(queue, Queue)
            else Queue(
                queue._dsn,
                schema=queue.schema,
                registry=queue.registry,
                schedules=queue.declared_schedules,
            )
        )
        self.store = ScheduleStore(self.queue)
        self.reconcile_interval = reconcile_interval
        self.fired: list[tuple[str, datetime, float]] = []  # (name, fire time, lateness s)
        self._schedules: dict[str, Schedule] = {}
        self._lock = threading.Lock()
        self._aps = BackgroundScheduler(
            timezone=UTC,
            executors={
                ENQUEUE_EXECUTOR: _EnqueueExecutor(self),
                "default": APThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1},
        )

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        declared = list(self.queue.declared_schedules)
        self.store.sync_declared(declared)
        self._reconcile(catch_up=True)
        self._aps.add_job(
            self._reconcile_quietly,
            "interval",
            seconds=self.reconcile_interval,
            id=RECONCILE_JOB,
            executor="default",
        )
        self._aps.start()
        log.info("scheduler started with %d schedules", len(self._schedules))

    def shutdown(self) -> None:
        if self._aps.running:
            self._aps.shutdown(wait=True)
        if self._owns_queue:
            self.queue.close()
        log.info("scheduler stopped")

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop.wait()
        finally:
            self.shutdown()
            self.queue.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ firing

    def fire(self, name: str, fire_time: datetime) -> int | None:
        """Enqueue the job of one fire time unless another scheduler already did; returns its id."""
        schedule = self._schedules.get(name)
        if schedule is None:
            return None
        fire_at = fire_time.astimezone(UTC)
        next_fire = schedule.next_fire_time(fire_at + timedelta(microseconds=1))
        with self.queue.connection() as conn, conn.transaction():
            row = conn.execute(
                self.queue.queries.claim_fire,
                {"name": name, "fire_at": fire_at, "next_fire_at": next_fire},
            ).fetchone()
            if row is None:
                return None  # another scheduler got it, or the schedule is paused
            task, args, queue, priority, max_attempts = row
            request = make_request(
                self.queue.registry,
                JobSpec(
                    task,
                    args,
                    queue=queue,
                    priority=priority,
                    max_attempts=max_attempts,
                    unique_key=fire_key(name, fire_at),
                    scheduled_for=fire_at,
                ),
            )
            job_id = self.queue._insert_one(conn, request)
        lateness = time.time() - fire_at.timestamp()
        self.fired.append((name, fire_at, lateness))
        log.info(
            "schedule %s fired for %s: job %d (%.0f ms late)",
            name,
            fire_at.isoformat(),
            job_id,
            lateness * 1000,
        )
        return job_id

    # ------------------------------------------------------------------ keeping up with the table

    def _reconcile_quietly(self) -> None:
        try:
            self._reconcile(catch_up=False)
        except Exception as exc:
            log.warning("reading schedules failed (%s); keeping the last known set", exc)

    def _reconcile(self, catch_up: bool) -> None:
        """Make APScheduler's jobs match the schedules table (added, changed, paused, removed)."""
        stored = {s.name: s for s in self.store.list()}
        with self._lock:
            for name in set(self._schedules) - set(stored):
                self._remove(name)
            for name, schedule in stored.items():
                known = self._schedules.get(name)
                if known is None or _definition(known) != _definition(schedule):
                    self._add(schedule)
                    if catch_up or known is None:
                        self._catch_up(schedule)
                elif known.paused != schedule.paused:
                    if schedule.paused:
                        self._aps.pause_job(name)
                    else:
                        self._aps.resume_job(name)
                self._schedules[name] = schedule
                self.store.set_next_fire(name, None if schedule.paused else schedule.next_fire_time())

    def _add(self, schedule: Schedule) -> None:
        self._schedules[schedule.name] = schedule
        self._aps.add_job(
            _never_called,
            trigger=schedule.trigger(),
            id=schedule.name,
            name=schedule.name,
            executor=ENQUEUE_EXECUTOR,
            replace_existing=True,
            coalesce=True,
            misfire_grace_time=max(1, int(schedule.misfire_grace.total_seconds())),
            next_run_time=None if schedule.paused else schedule.next_fire_time(),
        )

    def _remove(self, name: str) -> None:
        self._schedules.pop(name, None)
        with contextlib.suppress(JobLookupError):
            self._aps.remove_job(name)

    def _catch_up(self, schedule: Schedule) -> None:
        """Missed fires (every scheduler down): ``coalesce`` runs the latest one once, in grace."""
        if schedule.misfire != "coalesce" or schedule.paused or schedule.last_fire_at is None:
            return  # a schedule that never fired has missed nothing (it may be brand new)
        now = datetime.now(UTC)
        latest = schedule.last_fire_time(now)
        if latest is None or now - latest > schedule.misfire_grace:
            return
        if schedule.last_fire_at < latest:
            log.info("schedule %s missed %s: running it once now", schedule.name, latest.isoformat())
            self.fire(schedule.name, latest)


def _definition(schedule: Schedule) -> tuple[Any, ...]:
    return (
        schedule.task,
        schedule.cron,
        schedule.every,
        schedule.timezone,
        schedule.misfire,
        schedule.misfire_grace,
    )


def _never_called() -> None:  # pragma: no cover - the enqueue executor never calls job functions
    raise AssertionError("pgqueue schedules are fired by their executor")
