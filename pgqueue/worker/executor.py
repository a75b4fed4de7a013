"""The executor: holds the claimed jobs, starts them in free slots, runs them, reports outcomes.

A slot is taken by a running handler, by a prefetched job whose start is being written, and by
a handler thread that outlived its job (a sync handler past its timeout cannot be stopped): so
the worker never runs more handlers than its concurrency, whatever its handlers do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pgqueue._tasks import Registry, Task
from pgqueue.worker.completer import Completer
from pgqueue.worker.context import JobContext
from pgqueue.worker.execution import ClaimedJob, Outcome, Runners, decide_exception, execute
from pgqueue.worker.progress import ProgressWriter
from pgqueue.worker.stats import WorkerStats

log = logging.getLogger("pgqueue.worker")
JOB_TASK_PREFIX = "pgqueue-job-"
BIGINT_DIGITS = 19  # a job id is a bigint


@dataclass(slots=True)
class Running:
    """A job whose handler runs: its handler, its context (only for handlers that take one)."""

    job: ClaimedJob
    handler: Task[Any] | None
    ctx: JobContext | None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    began: float = field(default_factory=time.monotonic)


class Executor:
    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        worker_id: str,
        concurrency: int,
        prefetch: int,
        registry: Registry,
        runners: Runners,
        completer: Completer,
        progress: ProgressWriter,
        stats: WorkerStats,
        on_capacity: Callable[[], None],
        on_job_end: Callable[[ClaimedJob], None],
    ) -> None:
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.registry = registry
        self.runners = runners
        self.completer = completer
        self.progress = progress
        self.stats = stats
        self._on_capacity = on_capacity
        self._on_job_end = on_job_end  # the handler returned or raised: what it left behind is checked
        self.buffer: deque[ClaimedJob] = deque()
        self.running: dict[int, Running] = {}
        self.abandoned = 0
        self.closing = False  # shutdown began: nothing more starts
        self.reserved = 0  # slots promised to a claim in flight, for the rows it starts at once
        self.per_queue: Counter[str] = Counter()
        # Claims whose lease this worker holds (id -> token), read by the lease keeper's thread.
        self._held: dict[int, UUID] = {}
        self._held_lock = threading.Lock()
        # Given, not looked up per job: asyncio.get_running_loop() is a getpid() system call on
        # Python 3.11, 6 % of a drain's time when made for every job started.
        self._loop = loop

    # ------------------------------------------------------------------ capacity

    def busy(self) -> int:
        return len(self.running) + self.abandoned + self.reserved

    def free_slots(self) -> int:
        """Handlers that could start now."""
        return self.concurrency - self.busy()

    def room(self) -> int:
        """Jobs worth claiming: free slots plus the prefetch buffer's free places."""
        return self.concurrency + self.prefetch - self.busy() - len(self.buffer)

    def held(self) -> list[tuple[int, UUID]]:
        with self._held_lock:
            return list(self._held.items())

    def blocker(self, task: asyncio.Task[Any] | None) -> str | None:
        """The job a running asyncio task belongs to, in words (for naming what blocks the loop)."""
        if task is None:
            return None
        job_id = task.get_name().removeprefix(JOB_TASK_PREFIX)  # handler code may rename its task
        readable = job_id.isdecimal() and len(job_id) <= BIGINT_DIGITS  # int() refuses 4,300 digits
        running = self.running.get(int(job_id)) if readable else None
        if running is None or running.task is not task:
            return None
        return f"job {running.job.id} ({running.job.task})"

    # ------------------------------------------------------------------ taking and starting

    def take(self, jobs: list[ClaimedJob]) -> None:
        """Jobs a claim returned: start those it charged already, buffer the rest."""
        self.stats.claimed += len(jobs)
        with self._held_lock:
            for job in jobs:
                self._held[job.id] = job.token
        for job in jobs:
            self.per_queue[job.queue] += 1
            if job.started:
                self._begin(job)
            else:
                self.buffer.append(job)
        self.fill()

    def decline(self, job: ClaimedJob) -> None:
        """A job handed over by its enqueue that will not run here: it goes back uncharged, as a
        buffered job does at shutdown, held (its lease renewed) until that is written."""
        with self._held_lock:
            self._held[job.id] = job.token
        self.per_queue[job.queue] += 1
        self.completer.add(Outcome(job, "release"))

    def fill(self) -> None:
        """Start buffered jobs in free slots; the completer records each start with its next write."""
        while self.buffer and self.free_slots() > 0 and not self.closing:
            job = self.buffer.popleft()
            job.attempt += 1
            job.started, job.began_at = True, datetime.now(UTC)
            self.completer.record_start(job)
            self._begin(job)

    def _begin(self, job: ClaimedJob) -> None:
        handler = self.registry.get(job.task)
        ctx = None
        if handler is not None and handler.takes_context:
            ctx = JobContext(
                job_id=job.id,
                queue=job.queue,
                task=job.task,
                attempt=job.attempt,
                max_attempts=job.max_attempts,
                scheduled_for=job.scheduled_for,
                worker_id=self.worker_id,
                progress_sink=self.progress.report_from_any_thread(job.token),
            )
        running = Running(job, handler, ctx)
        self.running[job.id] = running
        running.task = self._loop.create_task(self._run(running), name=f"{JOB_TASK_PREFIX}{job.id}")

    async def _run(self, running: Running) -> None:
        job = running.job
        try:
            outcome = await execute(
                job,
                running.handler,
                running.ctx,
                running.cancel,
                self.runners,
                lambda text: self.progress.report(job.id, job.token, text),
            )
        except asyncio.CancelledError as exc:
            # Shutdown hands the job back uncharged. Otherwise no one here cancelled it: the
            # handler raised it (or cancelled itself), a failed attempt like any other.
            outcome = Outcome(job, "requeue") if self.closing else decide_exception(job, running.handler, exc)
        self._on_job_end(job)
        if self.running.get(job.id) is not running:  # handed back at shutdown, it ignored the cancel
            return
        duration = time.monotonic() - running.began
        del self.running[job.id]
        self.fill()
        if self.progress.pending_for(job.id):  # its last progress lands before its outcome
            await self.progress.write()
        self.completer.add(outcome)
        self._on_capacity()
        log_outcome(outcome, duration)

    # ------------------------------------------------------------------ after the fact

    def written(self, outcomes: list[Outcome]) -> None:
        """The completer wrote these outcomes: the claims are no longer this worker's."""
        held = self._held
        with self._held_lock:  # once per flush, not per job: the lease keeper's thread reads it
            for o in outcomes:
                if held.get(o.job.id) == o.job.token:
                    del held[o.job.id]
        self.per_queue.subtract(o.job.queue for o in outcomes)
        self.stats.count_all(o.kind for o in outcomes)

    def abandon(self, future: asyncio.Future[Any]) -> None:
        """A handler thread outlived its job: it keeps a slot until it returns."""
        self.abandoned += 1

        def ended(_: asyncio.Future[Any]) -> None:
            self.abandoned -= 1
            self.fill()
            self._on_capacity()

        future.add_done_callback(ended)

    def cancel(self, job_id: int) -> None:
        """Stop a job: a buffered one never runs, an async one is cancelled, a sync one is told."""
        running = self.running.get(job_id)
        if running is None:
            for job in self.buffer:
                if job.id == job_id:  # claimed, never started: cancelled without running
                    self.buffer.remove(job)
                    self.completer.add(Outcome(job, "cancelled"))
                    break
            return
        running.cancel.set()
        if running.ctx is not None:
            running.ctx.cancelled.set()
        handler = running.handler
        if handler is not None and handler.is_async and not self.runners.isolated(handler) and running.task:
            running.task.cancel()

    def renewed(self, sent: dict[int, UUID], renewed: set[int], cancels: set[int]) -> None:
        """A heartbeat's answer: stop the jobs asked to cancel, and the running claims it no
        longer found (rescued elsewhere after this worker stalled past its lease)."""
        for job_id in cancels:
            self.cancel(job_id)
        for job_id, token in sent.items():
            running = self.running.get(job_id)
            if job_id in renewed or running is None or running.job.token != token:
                continue
            log.warning(
                "job %d (%s) lost its lease while running here; stopping it, another worker may run it",
                job_id,
                running.job.task,
            )
            self.cancel(job_id)

    def hand_back_unstoppable(self) -> None:
        """Shutdown, after the cancels: jobs whose coroutine swallowed its cancellation go back
        uncharged all the same (their coroutine ends with the process), so the worker can exit."""
        for job_id, running in list(self.running.items()):
            if running.task is None or running.task.done():
                continue
            del self.running[job_id]
            self.completer.add(Outcome(running.job, "requeue"))
            log.error(
                "job %d (%s) ignored its cancellation; handed back while its handler still runs",
                job_id,
                running.job.task,
            )

    def release_buffer(self) -> None:
        """Shutdown: claimed jobs that never started go straight back, uncharged."""
        self.closing = True
        while self.buffer:
            self.completer.add(Outcome(self.buffer.popleft(), "release"))


def log_outcome(outcome: Outcome, duration: float) -> None:
    job = outcome.job
    level = logging.INFO if outcome.kind in ("completed", "requeue", "release") else logging.WARNING
    if outcome.kind == "dead":
        level = logging.ERROR
    if not log.isEnabledFor(level):
        return
    detail = ""
    if outcome.error_json is not None:
        error = json.loads(outcome.error_json)
        detail = f" error={error['type']}: {error['message']!r}"
        if outcome.kind == "retry":
            detail += f" retry_in={outcome.delay:.1f}s"
    log.log(
        level,
        "job %s id=%d task=%s queue=%s attempt=%d/%d duration_ms=%.1f%s",
        outcome.kind,
        job.id,
        job.task,
        job.queue,
        job.attempt,
        job.max_attempts,
        duration * 1000,
        detail,
        extra={
            "job_id": job.id,
            "task": job.task,
            "queue": job.queue,
            "attempt": job.attempt,
            "outcome": outcome.kind,
            "duration_ms": duration * 1000,
        },
    )
