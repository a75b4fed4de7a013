"""The scheduler: APScheduler computes fire times, the database makes each one enqueue once.

Every scheduler process runs every schedule. When a fire time comes, each process tries to
record it on the schedule's row (``last_fire_at < fire_at``) in the same transaction as the
enqueue; the first wins and the others find nothing to do. So any number of schedulers can run
(one per worker host, say) with no leader election and no double sends.

A fire that meets a transient failure (the server restarting, the connection cut) is retried
until its misfire grace ends: the claim makes the retry harmless if the first attempt did commit,
and every scheduler retrying the same fire time still enqueues it once. A scheduler started
before PostgreSQL waits for it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from pgqueue._base import QueueBase
from pgqueue._connections import is_transient, retry_delays
from pgqueue.errors import ConfigurationError, PgQueueError

try:
    from apscheduler.executors.base import BaseExecutor
    from apscheduler.executors.pool import ThreadPoolExecutor as APThreadPoolExecutor
    from apscheduler.job import Job as APJob
    from apscheduler.jobstores.base import JobLookupError
    from apscheduler.schedulers.background import BackgroundScheduler
except ModuleNotFoundError as exc:
    if exc.name is None or not exc.name.startswith("apscheduler"):
        raise  # a real bug, not a missing extra
    raise ConfigurationError(
        "the scheduler needs the scheduler extra: pip install 'pgqueue[scheduler]'"
    ) from exc
from pgqueue._queue import Queue
from pgqueue._schedules import Schedule, fire_key

log = logging.getLogger("pgqueue.scheduler")
ENQUEUE_EXECUTOR = "pgqueue-enqueue"
RECONCILE_JOB = "pgqueue-reconcile"
FIRE_THREADS = 4  # schedules whose fires are being enqueued at the same moment


class _EnqueueExecutor(BaseExecutor):  # type: ignore[misc]
    """An APScheduler executor that receives each fire time and enqueues it (the plain
    executors would call a function without telling it which fire time it is for).

    The fire times of one schedule are enqueued one after the other, in order: the claim only
    takes a fire time later than the last one recorded, so a fire being retried must not be
    overtaken by the next. For the same reason there is no per-job instance limit here: with
    APScheduler's, the next fire time would be skipped while one is still being retried.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self._pgqueue = scheduler
        self._threads = ThreadPoolExecutor(max_workers=FIRE_THREADS, thread_name_prefix="pgqueue-fire")
        self._pending: dict[str, deque[datetime]] = {}
        self._pending_lock = threading.Lock()

    def submit_job(self, job: APJob, run_times: list[datetime]) -> None:
        self.submit_fires(job.id, run_times)

    def _do_submit_job(self, job: APJob, run_times: list[datetime]) -> None:  # pragma: no cover
        self.submit_fires(job.id, run_times)  # submit_job above never calls it

    def submit_fires(self, name: str, run_times: list[datetime]) -> None:
        """Queue fire times of one schedule behind any of its fires still being enqueued."""
        with self._pending_lock:
            pending = self._pending.get(name)
            if pending is None:
                pending = self._pending[name] = deque()
                self._threads.submit(self._drain, name)
            pending.extend(run_times)

    def _drain(self, name: str) -> None:
        while True:
            with self._pending_lock:
                pending = self._pending[name]
                if not pending or self._pgqueue.stopping:
                    del self._pending[name]
                    return
                fire_time = pending.popleft()
                superseded = bool(pending)
            try:
                self._pgqueue.fire_until_grace(name, fire_time, superseded=superseded)
            except Exception:  # never lose the drain: the next fire times still have to go
                log.exception("schedule %s: enqueue for %s failed", name, fire_time.isoformat())

    def shutdown(self, wait: bool = True) -> None:
        self._threads.shutdown(wait=wait)


class Scheduler:
    """Enqueue the jobs of every schedule (declared in code or stored at run time) on time.

    ``start()`` runs in background threads (e.g. beside a worker); ``run()`` blocks until
    SIGTERM/SIGINT. Schedules changed at run time are picked up within ``reconcile_interval``.
    """

    def __init__(self, queue: QueueBase[Any], *, reconcile_interval: float = 5.0) -> None:
        # A queue (and pool) of its own: firing is synchronous work in APScheduler's threads, so
        # an async app's queue needs a sync twin anyway, and its connections are then named
        # "pgqueue-scheduler" and kept apart from the app's.
        # No more connections than threads to use them: the fire threads and the reconcile.
        self.queue = Queue.like(queue, pool_size=min(queue.pool_size, FIRE_THREADS + 1))
        self.queue.connection_role = "scheduler"
        self.store = self.queue.schedule_store
        self.reconcile_interval = reconcile_interval
        self.fired: list[tuple[str, datetime, float]] = []  # (name, fire time, lateness s)
        self._schedules: dict[str, Schedule] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._executor = _EnqueueExecutor(self)
        self._aps = BackgroundScheduler(
            timezone=UTC,
            executors={
                ENQUEUE_EXECUTOR: self._executor,
                "default": APThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1},
        )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Store the declared schedules and fire them from background threads.

        While the database cannot be reached this waits, logging each failed attempt, so a
        scheduler started before PostgreSQL works within seconds of it coming up; a failure
        retrying cannot fix (credentials, an unmigrated schema) raises. Returns without starting
        when :meth:`shutdown` (or, under :meth:`run`, a signal) comes first.
        """
        if not self._wait_for_database():
            return
        self._aps.add_job(
            self._reconcile_quietly,
            "interval",
            seconds=self.reconcile_interval,
            id=RECONCILE_JOB,
            executor="default",
        )
        self._aps.start()
        log.info("scheduler started with %d schedules", len(self._schedules))

    def _wait_for_database(self) -> bool:
        """Sync the declared schedules and read the table, retrying transient failures."""
        delays = retry_delays()
        while not self._stopping.is_set():
            try:
                self.store.sync_declared(list(self.queue.declared_schedules))
                self._reconcile(catch_up=True)
                return True
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("cannot reach the database (%s); retrying", exc)
                self._stopping.wait(next(delays))
        return False

    def shutdown(self) -> None:
        self._stopping.set()
        if self._aps.running:
            self._aps.shutdown(wait=True)
        self.queue.close()
        log.info("scheduler stopped")

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        previous = {
            sig: signal.signal(sig, lambda *_: self._stopping.set())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.start()
            self._stopping.wait()
        finally:
            self.shutdown()
            self.queue.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ firing

    def fire_until_grace(self, name: str, fire_time: datetime, *, superseded: bool = False) -> None:
        """Enqueue one fire time, retrying transient failures until its misfire grace ends.

        ``superseded``: a later fire time of the same schedule is already waiting; a ``coalesce``
        schedule then runs only that one.
        """
        schedule = self._schedules.get(name)
        if schedule is None:
            return
        if superseded and schedule.misfire == "coalesce":
            log.info("schedule %s: %s coalesced into a later fire time", name, fire_time.isoformat())
            return
        give_up_at = fire_time.timestamp() + max(1.0, schedule.misfire_grace.total_seconds())
        delays = retry_delays()
        while True:
            try:
                self.fire(name, fire_time)
                return
            except Exception as exc:
                if not is_transient(exc):
                    log.error(
                        "schedule %s: enqueue for %s failed: %s",
                        name,
                        fire_time.isoformat(),
                        exc,
                        exc_info=not isinstance(exc, PgQueueError),
                    )
                    return
                pause = next(delays)
                if time.time() + pause >= give_up_at:
                    log.error(
                        "schedule %s: fire time %s dropped, still failing when its misfire grace ended: %s",
                        name,
                        fire_time.isoformat(),
                        exc,
                    )
                    return
                log.warning(
                    "schedule %s: enqueue for %s failed (%s); retrying", name, fire_time.isoformat(), exc
                )
                if self._stopping.wait(pause):
                    return

    def fire(self, name: str, fire_time: datetime) -> int | None:
        """Enqueue the job of one fire time unless another scheduler already did; returns its id."""
        schedule = self._schedules.get(name)
        if schedule is None:
            return None
        fire_at = fire_time.astimezone(UTC)
        next_fire = schedule.next_fire_time(fire_at + timedelta(microseconds=1))
        job_id = self.store.fire(name, fire_at, next_fire, fire_key(name, fire_at))
        if job_id is None:
            return None  # another scheduler got it, or the schedule is paused
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
            try:
                self.fire(schedule.name, latest)
            except Exception as exc:
                if not (self._aps.running and is_transient(exc)):
                    raise  # at start-up, start() retries the whole sync
                self._executor.submit_fires(schedule.name, [latest])


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
