"""The driver side of the harness protocol: standard library only, shared by every system's driver.

A driver is one process, started by the harness with the system's own virtualenv's Python:

    <venv>/bin/python bench/peers/<system>_driver.py '<json command>'

It writes one JSON object per line to stdout (its original stdout: anything a library prints goes
to stderr instead) and reads control lines from stdin:

    harness -> driver   argv[1]: {"op": ..., "dsn": ..., ...parameters}
                        stdin:   "stop"            (long-running ops end gracefully)
    driver -> harness   {"event": "ready"}         (a worker is up, or an app is connected)
                        {"event": "progress", "done": N, "at": unix time}
                        {"event": "result", ...}   (last line; exit code 0)
                        {"event": "error", "message": ...}   (exit code 1)

Operations every driver implements (the ``System`` methods below):

    setup                         install the system's schema and its queues
    enqueue   mode, n, batch      insert n jobs (``task``: "noop" or "sleep") one by one or in
                                  batches; seconds taken
              [notify]            (False: without NOTIFY, for the systems that can)
              [queue]             the queue they go to (default "bench")
              [delay]             seconds until they may run (a delayed backlog)
              [priority]          "high": the system's level that runs before its default one
              [sleep]             a "sleep" job's length in seconds (default 0.02; args ``s``)
    worker    concurrency, task, latency, warmup   run jobs until "stop"; count, first start,
                                  last end and (optionally) enqueue->start latency percentiles
              [queues]            the queues this one worker process serves (default ["bench"]),
                                  configured as the system's docs say one process serves several
    produce   rate, duration      enqueue at a fixed rate for a duration (every job carries the
              [queue]             time taken just before its enqueue call: ``t``)
    app       connections, duration, notify, rows   write-heavy app: per transaction insert
                                  ``rows`` app rows and enqueue one job; committed transactions
    count                         jobs not yet finished (to check nothing was lost)

Any op may carry ``start_at`` (unix time): the driver waits until then before running it, so
that producers started one after another run their loops at the same time.

Job arguments are ``{"t": float}`` (enqueue time, seconds since the epoch) or ``{"w": 1}`` for a
warm-up or backlog job whose latency is not recorded, plus ``"s"`` (seconds) for a sleep job
whose length is not the default. ``job_args`` builds them from the command; a bulk enqueue uses
one set per batch, taken as the batch starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

QUEUE = "bench"
APP_TABLE = "bench_app_rows"

# Keep the protocol channel clean: the real stdout is ours, Python-level prints go to stderr.
_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr


def emit(event: str, **fields: Any) -> None:
    _OUT.write(json.dumps({"event": event, **fields}) + "\n")
    _OUT.flush()


def percentiles(values: list[float], points: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds of values in seconds, plus count/max/mean."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    out: dict[str, float] = {"count": len(ordered)}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[f"p{int(p)}_ms"] = ordered[rank - 1] * 1000
    out["max_ms"] = ordered[-1] * 1000
    out["mean_ms"] = sum(ordered) / len(ordered) * 1000
    return out


class Recorder:
    """What a worker's handler writes down: how many ran, when, and each job's latency."""

    def __init__(self) -> None:
        self.count = 0
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.latencies: list[float] = []
        self.record_latency = False

    def started(self, args: Any) -> float:
        now = time.time()
        if self.first_start is None:
            self.first_start = now
        if self.record_latency and isinstance(args, dict) and "t" in args:
            self.latencies.append(now - float(args["t"]))
        return now

    def finished(self) -> None:
        self.count += 1
        self.last_end = time.time()

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first_start": self.first_start,
            "last_end": self.last_end,
            "latency": percentiles(self.latencies) if self.record_latency else None,
        }


RECORDER = Recorder()


class ProcessClock:
    """Where this process's time went while a worker ran (for ``bench.profile``): the cyclic
    garbage collector's passes by generation (``gc.callbacks``), and the scheduler's account of
    the main thread from ``/proc/thread-self/schedstat`` (Linux): seconds on a CPU, and seconds
    runnable but waiting for one (another process, a database backend, had the core)."""

    SCHEDSTAT = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        self.passes = {generation: [0, 0.0] for generation in range(3)}
        self._began = 0.0
        self._sched_at_start = self._schedstat()

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        counted = self.passes[info["generation"]]
        counted[0] += 1
        counted[1] += time.perf_counter() - self._began

    def _schedstat(self) -> list[int] | None:
        try:
            with open(self.SCHEDSTAT) as f:
                return [int(v) for v in f.read().split()]
        except OSError:
            return None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "collector": {
                f"gen{g}": {"passes": n, "seconds": round(t, 4)} for g, (n, t) in self.passes.items()
            }
        }
        start, end = self._sched_at_start, self._schedstat()
        if start is not None and end is not None:
            out["on_cpu_s"] = round((end[0] - start[0]) / 1e9, 3)
            out["runnable_waiting_s"] = round((end[1] - start[1]) / 1e9, 3)
        return out


def job_args(command: dict[str, Any]) -> dict[str, Any]:
    """A job's arguments: its enqueue time, or a warm-up marker (``warm``) never counted as
    latency; and a sleep job's length when the command gives one (``sleep``)."""
    args: dict[str, Any] = {"w": 1} if command.get("warm") else {"t": time.time()}
    if command.get("sleep") is not None:
        args["s"] = float(command["sleep"])
    return args


def queues_of(command: dict[str, Any]) -> list[str]:
    """The queues a worker command serves (default: the one bench queue)."""
    return list(command.get("queues") or [QUEUE])


def noop_handler_body(args: Any) -> None:
    RECORDER.started(args)
    RECORDER.finished()


async def sleep_handler_body(args: Any) -> None:
    RECORDER.started(args)
    await asyncio.sleep(float(args.get("s", 0.02)) if isinstance(args, dict) else 0.02)
    RECORDER.finished()


class StopSignal:
    """Set when the harness writes "stop" (or closes our stdin)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self._loop = loop
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        self._loop.call_soon_threadsafe(self.event.set)

    async def wait(self) -> None:
        await self.event.wait()


async def report_progress(stop: asyncio.Event, interval: float = 0.2) -> None:
    while not stop.is_set():
        emit("progress", done=RECORDER.count, at=time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    emit("progress", done=RECORDER.count, at=time.time())


async def run_worker(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    command: dict[str, Any],
) -> dict[str, Any]:
    """Start a system's worker, report progress until told to stop, stop it, summarise."""
    RECORDER.record_latency = bool(command.get("latency"))
    clock = ProcessClock() if command.get("clock") else None
    if clock is not None:
        gc.callbacks.append(clock)
    stop_signal = StopSignal(asyncio.get_running_loop())
    done = asyncio.Event()
    progress = asyncio.create_task(report_progress(done))
    runner = asyncio.create_task(start())
    emit("ready")
    waiter = asyncio.create_task(stop_signal.wait())
    await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():  # the worker died on its own: surface its error
        waiter.cancel()
        done.set()
        await progress
        runner.result()
        raise RuntimeError("worker returned before it was stopped")
    await stop()
    try:
        await asyncio.wait_for(runner, 60)
    except TimeoutError:
        runner.cancel()
    done.set()
    await progress
    if clock is not None:
        gc.callbacks.remove(clock)
        return {**RECORDER.summary(), "clock": clock.summary()}
    return RECORDER.summary()


async def run_producer(
    enqueue_one: Callable[[dict[str, Any]], Awaitable[Any]],
    enqueue_batch: Callable[[list[dict[str, Any]]], Awaitable[Any]],
    command: dict[str, Any],
) -> dict[str, Any]:
    """Enqueue at ``rate`` jobs/s for ``duration`` s: a tick every ``tick`` s carries
    rate*tick jobs (one call per tick: single when one job, else the system's batch API).
    Ticks follow a fixed schedule; a late tick is not made up by a burst beyond its own jobs."""
    rate, duration = float(command["rate"]), float(command["duration"])
    tick = float(command.get("tick") or max(0.005, 1.0 / rate))
    warmup = int(command.get("warmup", 0))
    for _ in range(warmup):
        await enqueue_one({"w": 1})
    if warmup:
        await asyncio.sleep(float(command.get("warmup_pause", 0.5)))
    emit("ready")
    begin = time.time()
    owed = 0.0
    sent = 0
    calls: list[float] = []
    n_ticks = round(duration / tick)
    for i in range(n_ticks):
        due = begin + i * tick
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        owed += rate * tick
        k = int(owed)
        if k <= 0:
            continue
        owed -= k
        t0 = time.time()
        if k == 1:
            await enqueue_one({"t": t0})
        else:
            await enqueue_batch([{"t": t0}] * k)
        calls.append(time.time() - t0)
        sent += k
    end = time.time()
    elapsed = end - begin
    return {
        "enqueued": sent,
        "seconds": elapsed,
        "rate": sent / elapsed,
        "begin": begin,
        "end": end,
        "enqueue_call": percentiles(calls),
    }


async def run_app(
    transaction: Callable[[Any, int], Awaitable[None]],
    connect: Callable[[], Awaitable[Any]],
    command: dict[str, Any],
) -> dict[str, Any]:
    """``connections`` loops, each committing transactions (app rows + one job) until the time is up."""
    n_conn, duration, rows = (
        int(command["connections"]),
        float(command["duration"]),
        int(command.get("rows", 3)),
    )
    conns = [await connect() for _ in range(n_conn)]
    counts = [0] * n_conn
    emit("ready")
    end = time.time() + duration

    async def loop(i: int) -> None:
        c = conns[i]
        while time.time() < end:
            await transaction(c, rows)
            counts[i] += 1

    begin = time.time()
    await asyncio.gather(*(loop(i) for i in range(n_conn)))
    elapsed = time.time() - begin
    for c in conns:
        await c.close()
    return {"transactions": sum(counts), "seconds": elapsed, "tx_per_s": sum(counts) / elapsed}


async def run_psycopg_app(
    dsn: str, command: dict[str, Any], enqueue: Callable[[Any], Awaitable[None]] | None
) -> dict[str, Any]:
    """The write-heavy app on psycopg connections: each transaction inserts the app's rows and
    then calls ``enqueue(connection)`` in the same transaction (None: the app with no job)."""
    import psycopg

    sync_commit = "on" if command.get("sync_commit", True) else "off"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        await c.execute(APP_DDL)

    async def connect() -> Any:
        return await psycopg_app_connection(dsn, sync_commit)

    async def transaction(c: Any, rows: int) -> None:
        async with c.transaction():
            async with c.cursor() as cur:
                await cur.executemany(APP_INSERT, [(i, 10.5, "payment") for i in range(rows)])
            if enqueue is not None:
                await enqueue(c)

    return await run_app(transaction, connect, command)


APP_DDL = f"""CREATE TABLE IF NOT EXISTS {APP_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account int NOT NULL, amount numeric NOT NULL, note text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now())"""
APP_INSERT = f"INSERT INTO {APP_TABLE} (account, amount, note) VALUES (%s, %s, %s)"
APP_INSERT_DOLLAR = f"INSERT INTO {APP_TABLE} (account, amount, note) VALUES ($1, $2, $3)"


def main(system_factory: Callable[[dict[str, Any]], Any], default_loop: str = "asyncio") -> None:
    """Parse the command, run the op on the system, print the result line."""
    command = json.loads(sys.argv[1])
    op = command["op"]

    async def go() -> dict[str, Any]:
        system = system_factory(command)
        method = getattr(system, op)
        if command.get("start_at"):  # several drivers started together begin together
            await asyncio.sleep(max(0.0, float(command["start_at"]) - time.time()))
        return await method(command)

    try:
        runner = command.get("loop") or default_loop
        if runner == "uvloop":
            import uvloop  # type: ignore[import-not-found]

            result = uvloop.run(go())
        else:
            result = asyncio.run(go())
    except BaseException as exc:  # report every failure to the harness, then exit non-zero
        traceback.print_exc()
        emit("error", message=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    emit("result", **(result or {}))
    sys.exit(0)


async def psycopg_app_connection(dsn: str, sync_commit: str) -> Any:
    """A psycopg connection for the write-heavy app scenario (drivers built on psycopg)."""
    import psycopg

    c = await psycopg.AsyncConnection.connect(dsn)
    await c.execute(f"SET synchronous_commit = {sync_commit}")
    await c.commit()
    return c


async def psycopg_count(dsn: str, query: str) -> dict[str, Any]:
    """Jobs left and jobs finished, from a query returning (remaining, finished)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        cur = await c.execute(query)
        row = await cur.fetchone()
        assert row is not None
        return {"remaining": int(row[0]), "finished": int(row[1])}
