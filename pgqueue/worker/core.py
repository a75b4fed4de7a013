"""The worker: claim batches, run handlers, acknowledge outcomes, keep leases, shut down cleanly.

One event loop drives everything. Coroutine handlers run on it; plain functions run in a thread
pool. Database work goes through a small connection pool (claim, acknowledge, heartbeat and
maintenance each borrow a connection) plus one dedicated LISTEN connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgqueue.base import QueueBase
from pgqueue.errors import SchemaNotReadyError
from pgqueue.tasks import Task
from pgqueue.worker import maintenance
from pgqueue.worker.acks import AckBuffer, ack_params
from pgqueue.worker.context import JobContext
from pgqueue.worker.execution import ClaimedJob, Outcome, execute
from pgqueue.worker.listener import listen
from pgqueue.worker.sdnotify import SystemdNotifier
from pgqueue.worker.settings import WorkerSettings

log = logging.getLogger("pgqueue.worker")
Conn = psycopg.AsyncConnection[Any]


def reconnect_delay(failures: int) -> float:
    """Backoff between attempts to reach the database: 0.1 s doubling to 5 s."""
    return float(min(5.0, 0.1 * 2 ** min(failures, 6)))


@dataclass(slots=True)
class QueueLimits:
    """A queue's cross-process settings as last read from the ``queues`` table."""

    paused: bool = False
    concurrency: int | None = None
    rate_limit: float | None = None

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.rate_limit is not None


@dataclass(slots=True)
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    requeued: int = 0


@dataclass(slots=True)
class _Running:
    """A job in hand: its handler, its context (only for handlers that take one), its asyncio task."""

    job: ClaimedJob
    handler: Task[Any] | None
    ctx: JobContext | None
    task: asyncio.Task[None] | None = None
    cancelled: bool = False

    def is_cancelled(self) -> bool:
        return self.cancelled


class AsyncWorker:
    """Runs the jobs of some queues until stopped (signal, :meth:`stop`, or cancellation)."""

    def __init__(
        self,
        queue: QueueBase[Any],
        settings: WorkerSettings | None = None,
        *,
        install_signal_handlers: bool = True,
        **overrides: Any,
    ) -> None:
        self.queue = queue
        self.settings = settings or WorkerSettings.from_env(**overrides)
        self.queries = queue.queries
        self.registry = queue.registry
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = WorkerStats()
        self._install_signals = install_signal_handlers
        self._running: dict[int, _Running] = {}
        self._buffer: deque[ClaimedJob] = deque()
        self._held: set[int] = set()
        self._per_queue: Counter[str] = Counter()
        self._limits: dict[str, QueueLimits] = {}
        self._limits_read_at = float("-inf")
        self._retry_due: float | None = None
        self._progress: dict[tuple[int, int], Any] = {}
        self._notifier = SystemdNotifier()
        self._signals = 0
        self._stop_requested = False
        self._loop_alive_at = time.monotonic()
        self._stopping: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._acks: AckBuffer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ life cycle

    def stop(self) -> None:
        """Stop claiming and shut down gracefully (what SIGTERM does). Safe from any thread."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self) -> None:
        """Run until stopped; returns after a clean shutdown."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._stopping, self._wake = asyncio.Event(), asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        self._threads = ThreadPoolExecutor(max_workers=s.concurrency, thread_name_prefix="pgqueue-job")
        self._pool = AsyncConnectionPool(
            self.queue.dsn,
            min_size=2,
            max_size=5,
            kwargs={"autocommit": True},
            name=f"pgqueue-worker-{self.id}",
            open=False,
            reconnect_timeout=0,
        )
        self._acks = AckBuffer(self._flush_acks, self._acknowledged)
        if self._install_signals:
            self._add_signal_handlers()
        try:
            await self._open()
            helpers = [
                asyncio.create_task(self._acks.run(reconnect_delay), name="pgqueue-acks"),
                asyncio.create_task(self._listen(), name="pgqueue-listen"),
                asyncio.create_task(self._heartbeat_loop(), name="pgqueue-heartbeat"),
                asyncio.create_task(self._maintenance_loop(), name="pgqueue-maintenance"),
                asyncio.create_task(self._progress_loop(), name="pgqueue-progress"),
                asyncio.create_task(self._watchdog_loop(), name="pgqueue-watchdog"),
            ]
            log.info(
                "worker %s started: queues=%s concurrency=%d",
                self.id,
                ",".join(s.queues),
                s.concurrency,
            )
            self._notifier.ready(f"processing {','.join(s.queues)}")
            try:
                await self._claim_loop()
            finally:
                self._notifier.stopping()
                await self._shutdown(helpers)
        finally:
            self._remove_signal_handlers()
            await self._pool.close()
            self._threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.id)

    async def _open(self) -> None:
        """Wait for the database (logging each failure) and check the schema is migrated."""
        assert self._pool is not None
        failures = 0
        while True:
            try:
                await self._pool.open(wait=True, timeout=10)
                async with self._pool.connection() as c:
                    await c.execute(self.queries.schema_version)
                    await self._heartbeat(c)
                return
            except psycopg.errors.UndefinedTable as exc:
                raise SchemaNotReadyError(
                    f"schema {self.queries.schema!r} is not migrated: run `pgqueue migrate`"
                ) from exc
            except Exception as exc:
                failures += 1
                log.warning("cannot reach the database (%s); retrying", exc)
                await self._sleep_or_stop(reconnect_delay(failures))
                assert self._stopping is not None
                if self._stopping.is_set():
                    raise

    def _add_signal_handlers(self) -> None:
        assert self._loop is not None
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        except (RuntimeError, ValueError):  # not the main thread
            self._install_signals = False

    def _remove_signal_handlers(self) -> None:
        if self._install_signals and self._loop is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning(
                "second %s: exiting now; running jobs will be rescued by lease",
                signal.Signals(sig).name,
            )
            os._exit(1)
        log.info(
            "%s: stop claiming, finishing %d running jobs",
            signal.Signals(sig).name,
            len(self._running),
        )
        assert self._stopping is not None
        self._stopping.set()

    async def _shutdown(self, helpers: list[asyncio.Task[Any]]) -> None:
        """Let running jobs finish within the grace period, hand back the rest, flush every ack."""
        assert self._acks is not None
        for job in list(self._buffer):  # claimed, never started: back to the queue at once
            self._drop_buffered(job, Outcome(job, "requeue"))
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.grace_period)
            if pending:
                log.warning("grace period over: re-queueing %d unfinished jobs", len(self._running))
            for r in list(self._running.values()):
                if r.task is not None:
                    r.task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        try:
            await asyncio.wait_for(self._acks.drained(), timeout=max(10.0, self.settings.lease_seconds))
        except TimeoutError:
            log.error("could not write %d outcomes before exit; their leases will expire", len(self._acks))
        await self._save_progress()
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        try:
            await self._execute(self.queries.deregister_worker, {"id": self.id})
        except Exception as exc:
            log.warning("could not deregister worker: %s", exc)

    # ------------------------------------------------------------------ claiming

    def _free_slots(self) -> int:
        """Jobs that could start now."""
        return self.settings.concurrency - len(self._running)

    def _room(self) -> int:
        """Jobs worth claiming: free slots plus the prefetch buffer's free places."""
        return self.settings.concurrency + self.settings.prefetch - len(self._running) - len(self._buffer)

    async def _claim_loop(self) -> None:
        assert self._stopping is not None and self._wake is not None
        failures = 0
        while not self._stopping.is_set():
            self._loop_alive_at = time.monotonic()
            self._wake.clear()
            saturated, rate_limited = False, False
            if self._room() > 0:
                try:
                    saturated, rate_limited = await self._claim()
                    failures = 0
                except Exception as exc:
                    failures += 1
                    log.warning("claim failed (%s); retrying", exc)
                    if failures == 1:  # drop every dead pooled connection at once, not one per retry
                        await self._check_pool()
                    await self._sleep_or_stop(reconnect_delay(failures))
                    continue
            if saturated and self._room() > 0:
                continue
            timeout = self.settings.poll_interval
            if rate_limited:
                timeout = min(timeout, max(0.01, self.settings.rate_burst_seconds / 2))
            if not saturated:
                timeout = min(timeout, await self._seconds_to_next_job())
            await self._wait_for_work(timeout)

    async def _wait_for_work(self, timeout: float) -> None:
        assert self._wake is not None and self._stopping is not None
        if timeout <= 0:
            return
        waiters = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _seconds_to_next_job(self) -> float:
        """Time until the next delayed job (or local retry) falls due, by the database's clock."""
        due = self.settings.poll_interval
        if self._retry_due is not None:
            due = min(due, self._retry_due - time.monotonic())
            if due <= 0:
                self._retry_due = None
        try:
            row = await self._fetchone(self.queries.next_run_at, {"queues": list(self.settings.queues)})
        except Exception as exc:
            log.warning("next run time lookup failed: %s", exc)
            return due
        if row is not None and row[0] is not None:
            due = min(due, float(row[0]) + 0.001)
        return max(due, 0.0)

    async def _refresh_limits(self) -> None:
        if time.monotonic() - self._limits_read_at < self.settings.poll_interval:
            return
        rows = await self._fetchall(self.queries.queue_settings, {"queues": list(self.settings.queues)})
        self._limits = {name: QueueLimits(paused, conc, rate) for name, paused, conc, rate in rows}
        self._limits_read_at = time.monotonic()

    async def _claim(self) -> tuple[bool, bool]:
        """Claim up to the room there is; returns (got all it asked for, a rate limit is in play).

        Plain queues also fill the prefetch buffer, so a freed slot starts its next job without
        a round trip. Capped and rate-limited queues claim only what can start at once: a job
        waiting in a buffer would hold a share of a global limit without running.
        """
        await self._refresh_limits()
        s = self.settings
        free = self._room()
        startable = self._free_slots() - len(self._buffer)
        plain: list[str] = []
        saturated, rate_limited = False, False
        for name in s.queues:
            limits = self._limits.get(name, QueueLimits())
            local_cap = s.queue_concurrency.get(name)
            if not limits.limited and local_cap is None:
                plain.append(name)
                continue
            room = min(free, startable)
            if local_cap is not None:
                room = min(room, local_cap - self._per_queue[name])
            if room <= 0:
                continue
            rate_limited |= limits.rate_limit is not None
            if limits.limited:
                got = await self._claim_limited(name, room)
            else:
                got = await self._claim_plain([name], room)
            free -= got
            startable -= got
            saturated |= got == room
            if free <= 0:
                return True, rate_limited
        if plain and free > 0:
            got = await self._claim_plain(plain, free)
            saturated |= got == free
        return saturated, rate_limited

    async def _claim_plain(self, queues: list[str], limit: int) -> int:
        params = {
            "queues": queues,
            "limit": limit,
            "worker_id": self.id,
            "lease": self.settings.lease_seconds,
        }
        rows = await self._fetchall(self.queries.claim, params, prepare=True)
        self._start_all(rows)
        return len(rows)

    async def _claim_limited(self, queue: str, limit: int) -> int:
        assert self._pool is not None
        params = {
            "queue": queue,
            "limit": limit,
            "worker_id": self.id,
            "lease": self.settings.lease_seconds,
            "burst": self.settings.rate_burst_seconds,
        }
        async with self._pool.connection() as c, c.transaction():
            await c.execute(self.queries.lock_queue, params)
            rows = await (await c.execute(self.queries.claim_limited, params, prepare=True)).fetchall()
        self._start_all(rows)
        return len(rows)

    def _start_all(self, rows: list[tuple[Any, ...]]) -> None:
        """Take claimed jobs into the buffer and start as many as there are free slots."""
        self.stats.claimed += len(rows)
        for row in rows:
            job = ClaimedJob.from_row(row)
            self._buffer.append(job)
            self._held.add(job.id)
            self._per_queue[job.queue] += 1
        self._start_buffered()

    def _start_buffered(self) -> None:
        assert self._loop is not None
        while self._buffer and len(self._running) < self.settings.concurrency:
            job = self._buffer.popleft()
            task = self.registry.get(job.task)
            ctx = None
            if task is not None and task.takes_context:
                ctx = JobContext(
                    job_id=job.id,
                    queue=job.queue,
                    task=job.task,
                    attempt=job.attempt,
                    max_attempts=job.max_attempts,
                    scheduled_for=job.scheduled_for,
                    worker_id=self.id,
                    _report_progress=self._report_progress,
                )
            running = _Running(job, task, ctx)
            self._running[job.id] = running
            running.task = self._loop.create_task(self._run_job(running))

    # ------------------------------------------------------------------ running

    async def _run_job(self, running: _Running) -> None:
        assert self._threads is not None and self._acks is not None
        job = running.job
        started = time.perf_counter()
        try:
            outcome = await execute(job, running.handler, running.ctx, running.is_cancelled, self._threads)
        except asyncio.CancelledError:
            outcome = Outcome(job, "requeue")  # shutdown: hand it back, the attempt does not count
        duration = time.perf_counter() - started
        del self._running[job.id]
        self._per_queue[job.queue] -= 1
        self._start_buffered()
        if outcome.kind == "retry":
            due = time.monotonic() + outcome.delay
            self._retry_due = due if self._retry_due is None else min(self._retry_due, due)
        if (job.id, job.attempt) in self._progress:
            await self._save_progress()
        self._acks.add(outcome)
        assert self._wake is not None
        self._wake.set()
        self._log_outcome(outcome, duration)

    def _log_outcome(self, outcome: Outcome, duration: float) -> None:
        job = outcome.job
        level = logging.INFO if outcome.kind in ("completed", "requeue") else logging.WARNING
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

    def _cancel(self, job_id: int) -> None:
        running = self._running.get(job_id)
        if running is None:
            for job in self._buffer:
                if job.id == job_id:  # claimed but not started: it never runs
                    self._drop_buffered(job, Outcome(job, "cancelled"))
                    break
            return
        running.cancelled = True
        if running.ctx is not None:
            running.ctx.cancelled.set()
        if running.handler is not None and running.handler.is_async and running.task is not None:
            running.task.cancel()

    def _drop_buffered(self, job: ClaimedJob, outcome: Outcome) -> None:
        assert self._acks is not None
        self._buffer.remove(job)
        self._per_queue[job.queue] -= 1
        self._acks.add(outcome)

    def _report_progress(self, job_id: int, attempt: int, progress: Any) -> None:
        """Called from handlers (any thread): remember the latest value; a loop writes it."""
        self._progress[(job_id, attempt)] = progress

    # ------------------------------------------------------------------ acknowledging

    async def _flush_acks(self, outcomes: list[Outcome]) -> None:
        await self._execute(self.queries.ack, ack_params(outcomes), prepare=True)
        freed = sorted(
            {
                o.job.queue
                for o in outcomes
                if self._limits.get(o.job.queue, QueueLimits()).limited or o.kind in ("retry", "requeue")
            }
        )
        if freed:  # capacity freed under a global cap, or a job back in line: others look again
            await self._execute(self.queries.wake_queues, {"channel": self.queries.channel, "queues": freed})

    def _acknowledged(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self._held.discard(o.job.id)
            name = _STAT[o.kind]
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    # ------------------------------------------------------------------ background loops

    async def _listen(self) -> None:
        assert self._wake is not None
        wake = self._wake
        queues = set(self.settings.queues)

        def on_queue(name: str) -> None:
            if name in queues:
                wake.set()

        def on_settings(name: str) -> None:
            if name in queues:
                self._limits_read_at = float("-inf")  # re-read before the next claim
                wake.set()

        await listen(
            self.queue.dsn,
            self.queries.channel,
            on_queue,
            self._cancel,
            on_settings,
            wake.set,
            reconnect_delay,
        )

    async def _heartbeat(self, c: Conn) -> None:
        s = self.settings
        params = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": list(s.queues),
            "concurrency": s.concurrency,
            "lease": s.lease_seconds,
            "held": list(self._held),
        }
        rows = await (await c.execute(self.queries.heartbeat, params)).fetchall()
        for job_id, _attempt, cancel_requested in rows:
            if cancel_requested:
                self._cancel(job_id)

    async def _heartbeat_loop(self) -> None:
        assert self._pool is not None
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                async with self._pool.connection() as c:
                    await self._heartbeat(c)
            except Exception as exc:
                log.warning(
                    "heartbeat failed (%s); leases expire in %.0fs",
                    exc,
                    self.settings.lease_seconds,
                )
                interval = min(1.0, self.settings.lease_seconds / 3)
            else:
                interval = self.settings.lease_seconds / 3

    async def _maintenance_loop(self) -> None:
        assert self._pool is not None and self._stopping is not None
        s = self.settings
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(s.rescue_interval)
            try:
                async with self._pool.connection() as c:
                    await maintenance.rescue(c, self.queries, s.lease_seconds)
                    if time.monotonic() - last_prune >= s.prune_interval:
                        last_prune = time.monotonic()
                        await maintenance.prune(c, self.queries, s.keep_completed_seconds, s.prune_batch)
            except Exception as exc:
                log.warning("maintenance round failed: %s", exc)

    async def _save_progress(self) -> None:
        if not self._progress:
            return
        items, self._progress = self._progress, {}
        params = {
            "id": [k[0] for k in items],
            "attempt": [k[1] for k in items],
            "progress": [json.dumps(v) for v in items.values()],
        }
        try:
            await self._execute(self.queries.save_progress, params)
        except Exception as exc:
            log.warning("saving progress failed: %s", exc)
            for key, value in items.items():
                self._progress.setdefault(key, value)

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self._save_progress()

    async def _watchdog_loop(self) -> None:
        interval = self._notifier.watchdog_interval
        if interval is None:
            return
        while True:
            # Ping only while the claim loop turns: a wedged loop must let systemd restart us.
            if time.monotonic() - self._loop_alive_at < max(interval * 2, self.settings.poll_interval * 2):
                self._notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ database helpers

    async def _check_pool(self) -> None:
        assert self._pool is not None
        try:
            await self._pool.check()
        except Exception as exc:
            log.debug("pool check failed: %s", exc)

    async def _sleep_or_stop(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _execute(self, query: str, params: dict[str, Any], prepare: bool | None = None) -> None:
        assert self._pool is not None
        async with self._pool.connection() as c:
            await c.execute(query, params, prepare=prepare)

    async def _fetchall(
        self, query: str, params: dict[str, Any], prepare: bool | None = None
    ) -> list[tuple[Any, ...]]:
        assert self._pool is not None
        async with self._pool.connection() as c:
            return await (await c.execute(query, params, prepare=prepare)).fetchall()

    async def _fetchone(self, query: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        assert self._pool is not None
        async with self._pool.connection() as c:
            return await (await c.execute(query, params)).fetchone()


_STAT = {
    "completed": "completed",
    "retry": "retried",
    "dead": "dead",
    "cancelled": "cancelled",
    "requeue": "requeued",
}


class Worker:
    """The synchronous entry point: ``Worker(queue, queues=("email",)).run()`` blocks until stopped."""

    def __init__(
        self, queue: QueueBase[Any], settings: WorkerSettings | None = None, **overrides: Any
    ) -> None:
        self._worker = AsyncWorker(queue, settings, **overrides)

    @property
    def settings(self) -> WorkerSettings:
        return self._worker.settings

    @property
    def stats(self) -> WorkerStats:
        return self._worker.stats

    def run(self) -> None:
        asyncio.run(self._worker.run())

    def stop(self) -> None:
        self._worker.stop()
