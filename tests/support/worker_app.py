"""The app the worker tests run: a Queue whose handlers write what happened into test tables.

Worker subprocesses load it as ``worker_app:queue`` (``tests/`` on ``PYTHONPATH``); the DSN comes
from ``PGQUEUE_DSN`` and the schema from ``PGQUEUE_SCHEMA``. In-process tests call
:func:`build_app` with their own DSN and schema.

Every handler first inserts a row into ``<schema>.test_log`` (job id, attempt, task, the worker's
pid, the database's ``clock_timestamp()`` at the handler's start) and, for jobs that take time,
fills ``finished_at`` at the end, so tests judge order, timing and duplicates by the database's
clock alone. ``<schema>.test_flags`` lets a test flip a handler from failing to succeeding.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import weakref
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

import pgqueue
from pgqueue import Abort, Queue, Retry
from pgqueue.worker.context import JobContext

TABLES = """
CREATE TABLE IF NOT EXISTS {schema}.test_log (
    seq          bigserial PRIMARY KEY,
    job_id       bigint NOT NULL,
    task         text NOT NULL,
    attempt      int NOT NULL,
    pid          int NOT NULL,
    note         text,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    cancelled_at timestamptz
);
CREATE INDEX IF NOT EXISTS test_log_job_idx ON {schema}.test_log (job_id);
CREATE TABLE IF NOT EXISTS {schema}.test_flags (name text PRIMARY KEY);
"""


def create_tables(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(TABLES).format(schema=sql.Identifier(schema)))  # type: ignore[arg-type]


class App:
    """A queue with its handlers, plus the connections the handlers use to record their runs."""

    # How the handlers' own logging pool connects (a pooler in transaction mode needs more).
    pool_kwargs: dict[str, Any] = {"autocommit": True}  # noqa: RUF012 (read-only)

    def __init__(self, dsn: str | None, schema: str) -> None:
        self.schema = schema
        self.queue = Queue(dsn, schema=schema)
        # Keyed by the loop itself, weakly: a finished loop's pool goes with it, and a new loop
        # that happens to get a dead one's id() never inherits a pool whose tasks died with it.
        self._pools: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[AsyncConnectionPool[Any], asyncio.Task[None]]
        ] = weakref.WeakKeyDictionary()
        ident = sql.Identifier(schema)
        self.q_insert = sql.SQL(
            "INSERT INTO {}.test_log (job_id, task, attempt, pid, note) VALUES (%s, %s, %s, %s, %s)"
            " RETURNING seq"
        ).format(ident)
        self.q_insert_done = sql.SQL(
            "INSERT INTO {}.test_log (job_id, task, attempt, pid, note, finished_at)"
            " VALUES (%s, %s, %s, %s, %s, clock_timestamp())"
        ).format(ident)
        self.q_finish = sql.SQL(
            "UPDATE {}.test_log SET finished_at = clock_timestamp() WHERE seq = %s"
        ).format(ident)
        self.q_cancelled = sql.SQL(
            "UPDATE {}.test_log SET cancelled_at = clock_timestamp() WHERE seq = %s"
        ).format(ident)
        self.q_flag = sql.SQL("SELECT 1 FROM {}.test_flags WHERE name = %s").format(ident)
        register(self)

    # -- recording from async handlers (one small pool per event loop) ----------------------

    async def _pool(self) -> AsyncConnectionPool[Any]:
        """The running loop's pool, once it holds its first connection.

        Every handler awaits the one opening: were some to skip it once the pool is open but
        not yet full, they would take the first connection as it arrives, the opener's wait
        for a full pool would time out and close the pool under them. Opened with ``wait`` so
        no connection attempt still runs in the background when the job ends (an isolated
        child cancels what its job left running). A pool that failed to open is replaced.
        """
        loop = asyncio.get_running_loop()
        entry = self._pools.get(loop)
        if entry is None or (entry[1].done() and entry[0].closed):
            pool = AsyncConnectionPool(
                self.queue.dsn,
                min_size=1,
                max_size=3,
                open=False,
                kwargs=self.pool_kwargs,
                name="worker-app",
            )
            entry = self._pools[loop] = (pool, loop.create_task(pool.open(wait=True, timeout=10)))
        pool, opening = entry
        await asyncio.shield(opening)
        return pool

    async def _sql(self, query: sql.Composed, params: tuple[Any, ...]) -> Any:
        """Run one statement; a connection killed under us (a test terminating backends) is
        replaced and the statement tried again, so the handler's own bookkeeping survives."""
        pool = await self._pool()
        tries = 8  # more than the pool holds: every dead connection is discarded on the way
        for attempt in range(tries):
            try:
                async with pool.connection(timeout=10) as c:
                    cur = await c.execute(query, params)
                    return await cur.fetchone() if cur.description else None
            except psycopg.OperationalError:
                if attempt == tries - 1:
                    raise
                await asyncio.sleep(0.01)
        return None

    async def log_start(self, ctx: JobContext, note: str | None = None) -> int:
        row = await self._sql(self.q_insert, (ctx.job_id, ctx.task, ctx.attempt, os.getpid(), note))
        return int(row[0])

    async def log_done(self, ctx: JobContext, note: str | None = None) -> None:
        await self._sql(self.q_insert_done, (ctx.job_id, ctx.task, ctx.attempt, os.getpid(), note))

    async def log_finish(self, seq: int) -> None:
        await self._sql(self.q_finish, (seq,))

    async def log_cancelled(self, seq: int) -> None:
        await self._sql(self.q_cancelled, (seq,))

    async def flag_set(self, name: str) -> bool:
        return await self._sql(self.q_flag, (name,)) is not None

    async def aclose(self) -> None:
        """Close the pool of the running loop (call from the loop that used it)."""
        entry = self._pools.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].close()

    # -- recording from sync handlers (threads: a connection per call) -----------------------

    def log_start_sync(self, ctx: JobContext, note: str | None = None) -> int:
        with psycopg.connect(self.queue.dsn, autocommit=True) as c:
            row = c.execute(self.q_insert, (ctx.job_id, ctx.task, ctx.attempt, os.getpid(), note)).fetchone()
        assert row is not None
        return int(row[0])

    def log_finish_sync(self, seq: int) -> None:
        with psycopg.connect(self.queue.dsn, autocommit=True) as c:
            c.execute(self.q_finish, (seq,))


def register(app: App) -> None:
    q = app.queue

    @q.task(name="record", max_attempts=5, backoff=pgqueue.fixed(0.1))
    async def record(ctx: JobContext, sleep: float = 0.0, note: str | None = None) -> int:
        """Record the run; with ``sleep``, also when it ended."""
        if not sleep:
            await app.log_done(ctx, note)
            return ctx.job_id
        seq = await app.log_start(ctx, note)
        await asyncio.sleep(sleep)
        await app.log_finish(seq)
        return ctx.job_id

    @q.task(name="record_sync")
    def record_sync(ctx: JobContext, sleep: float = 0.0, note: str | None = None) -> int:
        seq = app.log_start_sync(ctx, note)
        if sleep:
            time.sleep(sleep)
        app.log_finish_sync(seq)
        return ctx.job_id

    @q.task(name="noop")
    async def noop() -> None:
        """Nothing at all: for tests that time the queue, not the handler."""

    @q.task(name="nap")
    async def nap(seconds: float) -> float:
        """Sleeps and records nothing: for tests where the database refuses the handlers' writes."""
        await asyncio.sleep(seconds)
        return seconds

    @q.task(name="sleep_async")
    async def sleep_async(ctx: JobContext, seconds: float) -> str:
        """Sleeps; if cancelled (timeout, cancel, shutdown) it records when, then gives way."""
        seq = await app.log_start(ctx)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            await app.log_cancelled(seq)
            raise
        await app.log_finish(seq)
        return "slept"

    @q.task(name="sleep_sync")
    def sleep_sync(ctx: JobContext, seconds: float) -> str:
        seq = app.log_start_sync(ctx)
        time.sleep(seconds)
        app.log_finish_sync(seq)
        return "slept"

    @q.task(name="flaky_fixed", max_attempts=5, backoff=pgqueue.fixed(0.5))
    async def flaky_fixed(ctx: JobContext, fails: int) -> int:
        await app.log_start(ctx)
        if ctx.attempt <= fails:
            raise RuntimeError(f"planned failure {ctx.attempt} of {fails}")
        return ctx.attempt

    @q.task(name="flaky_exp", max_attempts=5, backoff=pgqueue.exponential(base=0.2, factor=2, jitter=0))
    async def flaky_exp(ctx: JobContext, fails: int) -> int:
        await app.log_start(ctx)
        if ctx.attempt <= fails:
            raise RuntimeError(f"planned failure {ctx.attempt} of {fails}")
        return ctx.attempt

    @q.task(name="needs_flag", max_attempts=2, backoff=pgqueue.fixed(0.1))
    async def needs_flag(ctx: JobContext, flag: str) -> str:
        """Fails until the test sets ``flag`` in the flags table."""
        await app.log_start(ctx)
        if not await app.flag_set(flag):
            raise ValueError(f"flag {flag!r} is not set")
        return "flag found"

    @q.task(name="abort_now")
    async def abort_now(ctx: JobContext) -> None:
        await app.log_start(ctx)
        raise Abort("this input can never work")

    @q.task(name="retry_later", max_attempts=3)
    async def retry_later(ctx: JobContext, seconds: float) -> int:
        await app.log_start(ctx)
        if ctx.attempt == 1:
            raise Retry(in_=seconds)
        return ctx.attempt

    # Hostile retry policies: a backoff is user code too, and may raise or say nonsense.
    def backoff_with_a_bug(attempt: int) -> float:
        raise ZeroDivisionError("a backoff with a bug")

    for name, backoff in (
        ("backoff_raises", backoff_with_a_bug),
        ("backoff_infinite", lambda attempt: float("inf")),
        ("backoff_text", lambda attempt: "soon"),
    ):

        @q.task(name=name, max_attempts=2, backoff=backoff)
        async def fails_every_time(ctx: JobContext) -> None:
            await app.log_start(ctx)
            raise RuntimeError(f"planned failure {ctx.attempt}")

    @q.task(name="retry_never", backoff=pgqueue.fixed(0.1))
    async def retry_never(ctx: JobContext) -> int:
        await app.log_start(ctx)
        if ctx.attempt == 1:
            raise Retry(in_=float("inf"))
        return ctx.attempt

    @q.task(name="stops_when_told", max_attempts=5, backoff=pgqueue.fixed(0.1))
    def stops_when_told(ctx: JobContext, seconds: float) -> str:
        """Works until told to cancel (ctx.is_cancelled), then says so by raising its own error."""
        app.log_start_sync(ctx)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ctx.is_cancelled:
                raise RuntimeError("told to stop")
            time.sleep(0.02)
        return "worked to the end"

    @q.task(name="cancels_itself", max_attempts=5, backoff=pgqueue.fixed(0.1))
    async def cancels_itself(ctx: JobContext) -> None:
        """Decides on its own that the job is not wanted any more."""
        await app.log_start(ctx)
        raise pgqueue.JobCancelled("not wanted any more")

    @q.task(name="fail_on_flag", max_attempts=5, backoff=pgqueue.fixed(0.1))
    async def fail_on_flag(ctx: JobContext, flag: str, seconds: float) -> str:
        """Runs until the test sets ``flag``, then fails; or ends after ``seconds``."""
        await app.log_start(ctx)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await app.flag_set(flag):
                raise RuntimeError(f"flag {flag!r} is set")
            await asyncio.sleep(0.02)
        return "no flag"

    @q.task(name="progress_then_sleep")
    async def progress_then_sleep(ctx: JobContext, seconds: float) -> str:
        seq = await app.log_start(ctx)
        ctx.set_progress(30)
        await asyncio.sleep(0.1)
        ctx.set_progress({"step": "halfway", "percent": 50})
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            await app.log_cancelled(seq)
            raise
        await app.log_finish(seq)
        return "done"

    @q.task(name="progress_to_end")
    def progress_to_end(ctx: JobContext) -> str:
        seq = app.log_start_sync(ctx)
        ctx.set_progress(40)
        time.sleep(0.8)  # long enough for the worker to write 40 while the job runs
        ctx.set_progress(100)
        app.log_finish_sync(seq)
        return "done"

    cycles: list[weakref.ref[Cycle]] = []

    @q.task(name="leave_cycle")
    async def leave_cycle(size: int) -> None:
        """Leaves ``size`` bytes in a reference cycle: garbage only the cycle collector frees."""
        cycles.append(weakref.ref(Cycle(size)))

    @q.task(name="heap")
    async def heap() -> dict[str, int]:
        """The worker process's collector: objects frozen, cycles left by handlers, still alive."""
        alive = sum(ref() is not None for ref in cycles)
        return {"frozen": gc.get_freeze_count(), "left": len(cycles), "alive": alive}


class Cycle:
    """An object that refers to itself, so no reference count ever drops to zero."""

    def __init__(self, size: int) -> None:
        self.me = self
        self.payload = bytearray(size)


app = App(os.environ.get("PGQUEUE_DSN"), os.environ.get("PGQUEUE_SCHEMA", "pgqueue"))
queue = app.queue
