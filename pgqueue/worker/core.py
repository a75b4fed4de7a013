"""The worker: wires its services together for one run and shuts them down cleanly.

Each service is one file with one loop (see the package's modules):

- claimer: claims batches into the executor when there is room;
- executor: starts jobs in free slots and runs their handlers (threads, processes, the loop);
- completer: writes outcomes and start marks in batches;
- lease keeper: renews leases from its own thread, names a blocked event loop;
- rescuer, pruner: upkeep any live worker does; progress: writes reported progress;
- listener: turns notifications into wake-ups, cancellations and settings changes.

State that exists only while a worker runs lives in a :class:`WorkerRun`, built by ``run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgqueue._base import QueueBase
from pgqueue._connections import classify_connection_error, is_transient
from pgqueue.errors import ConfigurationError, SchemaNotReadyError
from pgqueue.worker.claimer import Claimer
from pgqueue.worker.completer import Completer
from pgqueue.worker.db import ServiceConnection, reconnect_delay
from pgqueue.worker.execution import ClaimedJob, Runners
from pgqueue.worker.executor import Executor
from pgqueue.worker.handoff import give_back
from pgqueue.worker.lease_keeper import Beat, LeaseKeeper
from pgqueue.worker.listener import Handlers, listen
from pgqueue.worker.processes import ProcessSlots
from pgqueue.worker.progress import ProgressWriter
from pgqueue.worker.pruner import Pruner
from pgqueue.worker.rescuer import Rescuer
from pgqueue.worker.sdnotify import SystemdNotifier
from pgqueue.worker.settings import WorkerSettings
from pgqueue.worker.signals import StopSignals
from pgqueue.worker.stats import WorkerStats

log = logging.getLogger("pgqueue.worker")
EVER = datetime.max.replace(tzinfo=UTC)  # give back every hand-off, whenever it was made

__all__ = ["AsyncWorker", "Worker", "WorkerStats"]


@dataclass
class WorkerRun:
    """Everything one run of a worker holds; gone when the run ends."""

    stopping: asyncio.Event
    connections: list[ServiceConnection]
    threads: ThreadPoolExecutor
    processes: ProcessSlots | None
    executor: Executor
    completer: Completer
    claimer: Claimer
    progress: ProgressWriter
    rescuer: Rescuer
    pruner: Pruner
    lease_keeper: LeaseKeeper
    listener_recheck: asyncio.Event  # set: the listener tests at once that it still hears
    helpers: list[asyncio.Task[Any]] = field(default_factory=list)


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
        self._notifier = SystemdNotifier()
        self._signals = 0
        self._stop_requested = False
        self._run: WorkerRun | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_signals: StopSignals | None = None

    # ------------------------------------------------------------------ life cycle

    def stop(self) -> None:
        """Stop claiming and shut down gracefully (what SIGTERM does). Safe from any thread."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self) -> None:
        """Run until stopped; returns after a clean shutdown."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        if self._install_signals:
            signals = StopSignals(self._loop, self._on_signal)
            self._stop_signals = signals if signals.install() else None
        run = self._build(self._loop, self._stopping)
        try:
            if not await self._open(run):
                log.info("worker %s stopped before it reached the database", self.id)
                return
            if run.processes is not None:
                await run.processes.start()
            run.lease_keeper.start()
            run.helpers = self._start_helpers(run)
            s = self.settings
            log.info(
                "worker %s started: queues=%s concurrency=%d isolation=%s",
                self.id,
                ",".join(s.queues),
                s.concurrency,
                s.isolation,
            )
            self._notifier.ready(f"processing {','.join(s.queues)}")
            self._run = run
            try:
                await run.claimer.run()
            finally:
                self._notifier.stopping()
                await self._shutdown(run)
        finally:
            self._run = None
            if self._stop_signals is not None:
                self._stop_signals.remove()
                self._stop_signals = None
            run.lease_keeper.stop()
            for conn in run.connections:
                await conn.close()
            if run.processes is not None:
                await run.processes.close()
            run.threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.id)

    def _build(self, loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> WorkerRun:
        s, q = self.settings, self.queries
        dsn = self.queue.dsn
        # A write refused as read-only makes the listener test that it still hears (a switchover
        # can leave it on the old primary, up and read-only, while NOTIFYs go to the new one).
        recheck = asyncio.Event()
        claim_conn = ServiceConnection(dsn, "", on_read_only=recheck.set)
        ack_conn = ServiceConnection(dsn, "ack", on_read_only=recheck.set)
        upkeep_conn = ServiceConnection(dsn, "upkeep", on_read_only=recheck.set)
        threads = ThreadPoolExecutor(max_workers=s.concurrency, thread_name_prefix="pgqueue-job")
        processes = self._process_slots()
        progress = ProgressWriter(upkeep_conn, q)
        # The services call each other back; the lambdas bind ``ex`` and ``cl`` once both exist.
        completer = Completer(
            ack_conn,
            q,
            on_written=lambda outcomes: ex.written(outcomes),
            wake_after=lambda outcomes: cl.after_written(outcomes),
        )
        runners = Runners(
            threads=threads,
            processes=processes,
            on_abandoned=lambda future: ex.abandon(future),
            default_isolation=s.isolation,
        )
        ex = Executor(
            loop=loop,
            worker_id=self.id,
            concurrency=s.concurrency,
            prefetch=s.prefetch,
            registry=self.registry,
            runners=runners,
            completer=completer,
            progress=progress,
            stats=self.stats,
            on_capacity=lambda: cl.capacity_freed(),
            on_job_end=self._job_ended,
        )
        cl = Claimer(
            claim_conn, q, s, ex, self.id, stopping=stopping, leases_renewable=lambda: keeper.renewable()
        )
        keeper = LeaseKeeper(
            dsn,
            q,
            Beat(self.id, list(s.queues), s.concurrency, s.lease_seconds),
            loop,
            held=ex.held,
            abandoned=lambda: ex.abandoned,
            on_renewed=ex.renewed,
            blocker=lambda: ex.blocker(asyncio.current_task(loop)),
            block_warning=s.block_warning,
            on_renewable=cl.wake.set,
        )
        return WorkerRun(
            stopping=stopping,
            connections=[claim_conn, ack_conn, upkeep_conn],
            threads=threads,
            processes=processes,
            executor=ex,
            completer=completer,
            claimer=cl,
            progress=progress,
            rescuer=Rescuer(upkeep_conn, q, lease_seconds=s.lease_seconds, interval=s.rescue_interval),
            pruner=Pruner(
                upkeep_conn,
                q,
                keep_seconds=s.keep_completed_seconds,
                batch=s.prune_batch,
                interval=s.prune_interval,
            ),
            lease_keeper=keeper,
            listener_recheck=recheck,
        )

    def _job_ended(self, job: ClaimedJob) -> None:
        if self._stop_signals is not None:
            self._stop_signals.after_job(lambda: f"job {job.id} ({job.task})")

    def _running_jobs(self) -> str:
        run = self._run
        jobs = [r.job for r in run.executor.running.values()] if run is not None else []
        return ", ".join(f"job {j.id} ({j.task})" for j in jobs) or "no job"

    def _process_slots(self) -> ProcessSlots | None:
        """Child processes, if this worker or any of its tasks runs handlers isolated."""
        s = self.settings
        wanted = s.isolation == "process" or any(t.options.isolation == "process" for t in self.registry)
        if not wanted:
            return None
        if not s.app:
            raise ConfigurationError(
                "process isolation needs the app's import path (module:attribute) for the child "
                "processes: start the worker with `pgqueue worker myapp.jobs:queue`, or pass app=…"
            )
        return ProcessSlots(s.app, s.concurrency)

    def _start_helpers(self, run: WorkerRun) -> list[asyncio.Task[Any]]:
        def on_settings(name: str) -> None:
            if name in self.settings.queues:
                run.claimer.settings_changed()

        def on_queue(name: str) -> None:
            if name in self.settings.queues:
                run.claimer.wake.set()

        def on_wake(worker_id: str) -> None:
            if worker_id == self.id:
                run.claimer.woken()

        def on_take(worker_id: str, job: str) -> None:
            if worker_id == self.id:
                run.claimer.handed(job)

        listener = listen(
            self.settings.listen_dsn or self.queue.dsn,
            self.queue.dsn,
            self.queries.channel,
            self.id,
            Handlers(
                on_queue=on_queue,
                on_wake=on_wake,
                on_take=on_take,
                on_cancel=run.executor.cancel,
                on_settings=on_settings,
                on_reconnect=run.claimer.listening_again,
                on_deaf=run.claimer.notifications_lost,
                on_hearing=run.claimer.hearing,
            ),
            reconnect_delay,
            run.listener_recheck,
        )
        return [
            asyncio.create_task(run.completer.run(), name="pgqueue-completer"),
            asyncio.create_task(listener, name="pgqueue-listener"),
            asyncio.create_task(run.lease_keeper.tick(), name="pgqueue-tick"),
            asyncio.create_task(run.rescuer.run(), name="pgqueue-rescuer"),
            asyncio.create_task(run.pruner.run(), name="pgqueue-pruner"),
            asyncio.create_task(run.progress.run(), name="pgqueue-progress"),
            asyncio.create_task(self._watchdog_loop(run), name="pgqueue-watchdog"),
            *(
                [asyncio.create_task(self._stop_signals.guard(self._running_jobs), name="pgqueue-signals")]
                if self._stop_signals is not None
                else []
            ),
        ]

    async def _open(self, run: WorkerRun) -> bool:
        """Wait for the database (logging each failure) and check the schema is migrated;
        False when the worker was told to stop before the database answered."""
        failures = 0
        conn = run.connections[0]
        while True:
            try:
                await self._register(conn)
                if failures:
                    log.info("database reachable after %d failed attempts", failures)
                return True
            except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
                raise SchemaNotReadyError(
                    f"schema {self.queries.schema!r} is not migrated to this version: run `pgqueue migrate`"
                ) from exc
            except Exception as exc:
                if not is_transient(exc):  # wrong password, no such database: say so and stop
                    raise classify_connection_error(exc) from exc
                failures += 1
                log.warning("cannot reach the database (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.stopping.wait(), timeout=reconnect_delay(failures))
                if run.stopping.is_set():
                    return False

    async def _register(self, conn: ServiceConnection) -> None:
        """Check the schema and write this worker's row."""
        async with conn.use() as c:
            await c.execute(self.queries.schema_version)
            await c.execute(
                self.queries.heartbeat,
                {
                    "id": self.id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "queues": list(self.settings.queues),
                    "concurrency": self.settings.concurrency,
                    "abandoned": 0,
                    "lease": self.settings.lease_seconds,
                    "held": [],
                    "token": [],
                },
            )

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning(
                "second %s: exiting now; running jobs will be rescued by lease",
                signal.Signals(sig).name,
            )
            os._exit(1)
        running = len(self._run.executor.running) if self._run is not None else 0
        log.info("%s: stop claiming, finishing %d running jobs", signal.Signals(sig).name, running)
        assert self._stopping is not None
        self._stopping.set()

    async def _shutdown(self, run: WorkerRun) -> None:
        """Let running jobs finish within the grace period, hand back the rest, write every outcome."""
        ex = run.executor
        ex.release_buffer()  # claimed, never started: back to the queue at once, uncharged
        tasks = [r.task for r in ex.running.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.grace_period)
            if pending:
                log.warning("grace period over: re-queueing %d unfinished jobs", len(ex.running))
            for r in list(ex.running.values()):
                if r.task is not None:
                    r.task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
                ex.hand_back_unstoppable()
        try:
            await asyncio.wait_for(run.completer.drained(), timeout=max(10.0, self.settings.lease_seconds))
        except TimeoutError:
            log.error("could not write %d outcomes before exit; their leases will expire", len(run.completer))
        await run.progress.write()
        for helper in run.helpers:
            helper.cancel()
        await asyncio.gather(*run.helpers, return_exceptions=True)
        try:
            async with run.connections[0].use() as c:
                # Every outcome is written: a job still claimed here that never started is a
                # hand-off whose notification came too late to be read.
                queues = await give_back(c, self.queries, self.id, self.settings.lease_seconds, EVER, [])
                if queues:
                    back_to = ",".join(sorted(set(queues)))
                    log.info("jobs handed over as this worker stopped went back to %s", back_to)
                await c.execute(self.queries.deregister_worker, {"id": self.id})
        except Exception as exc:
            log.warning("could not deregister worker: %s", exc)

    async def _watchdog_loop(self, run: WorkerRun) -> None:
        interval = self._notifier.watchdog_interval
        if interval is None:
            return
        while True:
            # Ping only while the claim loop turns: a wedged loop must let systemd restart us.
            if time.monotonic() - run.claimer.alive_at < max(interval * 2, self.settings.poll_interval * 2):
                self._notifier.watchdog()
            await asyncio.sleep(interval)


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
        run_to_the_end(self._worker.run())

    def stop(self) -> None:
        self._worker.stop()


# How long tasks left on the loop after the worker stopped get to end once cancelled.
LEFTOVER_WAIT = 1.0


def run_to_the_end(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)``, except that it returns even when a task left behind ignores its
    cancellation: asyncio.run waits for every such task, so one handler coroutine that swallows
    CancelledError (its job already handed back at shutdown) would keep the worker from exiting.
    Nor does it join the loop's default executor's threads, which a runaway handler may hold,
    and a handler calling ``loop.stop()`` only pauses the worker: the loop runs on."""
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(main)
        while True:
            try:
                loop.run_until_complete(task)
                break
            except RuntimeError:
                if task.done():
                    raise
                log.warning("the event loop was stopped by code the worker runs (a handler?); resuming")
    finally:
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in leftovers:
            t.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=LEFTOVER_WAIT))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
