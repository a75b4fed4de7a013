"""Hostile handlers for the worker fault suite, on top of the ordinary ones of ``worker_app``.

Worker subprocesses load it as ``fault_app:queue`` (``tests/faults`` and ``tests/`` on
``PYTHONPATH``); the DSN comes from ``PGQUEUE_DSN`` and the schema from ``PGQUEUE_SCHEMA``. The
test process builds a :class:`FaultApp` of its own on the test's schema to enqueue with the same
task options and argument checks.

Like ``worker_app``, every handler records its run in ``<schema>.test_log`` (job id, attempt,
pid, the database's clock at the start and, for handlers that take time, at the end), so tests
count runs and judge timing by the database alone.

The handlers are module-level functions (registered by call, so each module attribute stays the
plain function): a worker that runs handlers in child processes may import them by name. They
record through the module-level :data:`app`, the one the worker process loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import worker_app
from psycopg import sql

import pgqueue
from pgqueue.worker.context import JobContext

FAST_FLAG = "fast"  # set by a test: sleep_unless_fast then sleeps 0.2 s only

# What each ``kind`` of bad_result returns: none of them can be stored as a jsonb result.
BAD_RESULTS: dict[str, Callable[[], Any]] = {
    "nul": lambda: "abc\x00def",
    "surrogate": lambda: "\ud800",
    "dict_nul": lambda: {"ok": 1, "text": "a\x00b"},
    "dict_key_nul": lambda: {"k\x00": 1},
    "dict_surrogate": lambda: {"ok": 1, "nested": ["fine", "lone \ud800 surrogate"]},
    "set": lambda: {1, 2, 3},
    "datetime": lambda: datetime.now(UTC),
    "nan": lambda: math.nan,
    "huge": lambda: "x" * (300 << 20),  # past the size a stored value may take
}

BAD_MESSAGES = {"nul": "bad\x00value", "surrogate": "bad\ud800value"}

BAD_PROGRESS: dict[str, Callable[[], dict[str, Any]]] = {
    "datetime": lambda: {"at": datetime.now()},
    "nul": lambda: {"s": "a\x00b"},
    "huge": lambda: {"s": "x" * (20 << 20)},
}

BASE_EXCEPTIONS: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(7),
    "KeyboardInterrupt": lambda: KeyboardInterrupt(),
    "GeneratorExit": lambda: GeneratorExit(),
    # Raised by the handler itself, no one cancelled it: not the worker's shutdown.
    "CancelledError": lambda: asyncio.CancelledError(),
}


class UnprintableError(Exception):
    """An exception that cannot be turned into a message."""

    def __str__(self) -> str:
        raise RuntimeError("this exception refuses to be printed")


def _unstorable_progress() -> type[BaseException]:
    """``pgqueue.errors.UnstorableProgress`` (looked up at run time: older versions lack it)."""
    from pgqueue import errors

    found: type[BaseException] = getattr(errors, "UnstorableProgress", Exception)
    return found


class FaultApp(worker_app.App):
    """``worker_app``'s queue and handlers, plus the hostile ones below."""

    def __init__(self, dsn: str | None, schema: str) -> None:
        super().__init__(dsn, schema)
        self.q_runs = sql.SQL("SELECT count(*) FROM {}.test_log WHERE job_id = %s").format(
            sql.Identifier(schema)
        )
        self.per_task_isolation = register_faults(self.queue)

    def runs_so_far_sync(self, job_id: int) -> int:
        with psycopg.connect(self.queue.dsn, autocommit=True) as c:
            row = c.execute(self.q_runs, (job_id,)).fetchone()
        assert row is not None
        return int(row[0])


# ---------------------------------------------------------------------------- results


async def bad_result(ctx: JobContext, kind: str) -> Any:
    await app.log_done(ctx, kind)
    return BAD_RESULTS[kind]()


def bad_result_sync(ctx: JobContext, kind: str) -> Any:
    app.log_finish_sync(app.log_start_sync(ctx, kind))
    return BAD_RESULTS[kind]()


# ---------------------------------------------------------------------------- exceptions


async def raise_bad_message(ctx: JobContext, kind: str) -> None:
    await app.log_done(ctx, kind)
    raise ValueError(BAD_MESSAGES[kind])


def raise_bad_message_sync(ctx: JobContext, kind: str) -> None:
    app.log_finish_sync(app.log_start_sync(ctx, kind))
    raise ValueError(BAD_MESSAGES[kind])


async def raise_unprintable(ctx: JobContext) -> None:
    await app.log_done(ctx)
    raise UnprintableError()


def raise_unprintable_sync(ctx: JobContext) -> None:
    app.log_finish_sync(app.log_start_sync(ctx))
    raise UnprintableError()


async def raise_base(ctx: JobContext, kind: str) -> None:
    await app.log_done(ctx, kind)
    raise BASE_EXCEPTIONS[kind]()


def raise_base_sync(ctx: JobContext, kind: str) -> None:
    app.log_finish_sync(app.log_start_sync(ctx, kind))
    raise BASE_EXCEPTIONS[kind]()


async def cancel_itself(ctx: JobContext) -> None:
    """Cancels the task it runs in, as a library misusing ``Task.cancel`` would."""
    await app.log_done(ctx)
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)


async def stop_loop(ctx: JobContext) -> str:
    """Stops the event loop it runs on."""
    await app.log_done(ctx)
    asyncio.get_running_loop().stop()
    await asyncio.sleep(0)
    return "stopped the loop"


# What ``replace_stop_signal`` installs for SIGTERM in place of the worker's own handler.
STOP_REPLACEMENTS: dict[str, Any] = {
    "ignore": signal.SIG_IGN,
    "default": signal.SIG_DFL,
    "swallow": lambda signum, frame: None,
}


async def replace_stop_signal(ctx: JobContext, replacement: str, seconds: float = 0) -> str:
    """Installs its own SIGTERM handler (as some libraries do at import), then runs ``seconds``."""
    await app.log_start(ctx)
    signal.signal(signal.SIGTERM, STOP_REPLACEMENTS[replacement])
    await asyncio.sleep(seconds)
    return "replaced"


async def ignore_cancel(ctx: JobContext, seconds: float) -> str:
    """Swallows every cancellation until ``seconds`` have passed: it cannot be stopped."""
    await app.log_start(ctx)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(deadline - time.monotonic())
    return "outlived every cancel"


# ---------------------------------------------------------------------------- progress


def progress_refused(ctx: JobContext, kind: str) -> str:
    """Catches the refusal of its unstorable progress and says what it caught."""
    seq = app.log_start_sync(ctx, kind)
    try:
        ctx.set_progress(BAD_PROGRESS[kind]())
    except _unstorable_progress() as exc:
        app.log_finish_sync(seq)
        return "refused" if type(exc).__name__ == "UnstorableProgress" else f"caught {type(exc).__name__}"
    app.log_finish_sync(seq)
    return "accepted"


async def progress_uncaught(ctx: JobContext, kind: str) -> str:
    """Lets the refusal of its unstorable progress fail the attempt."""
    seq = await app.log_start(ctx, kind)
    ctx.set_progress(BAD_PROGRESS[kind]())
    await asyncio.sleep(0.2)
    await app.log_finish(seq)
    return "accepted"


async def progress_40(ctx: JobContext, seconds: float) -> str:
    seq = await app.log_start(ctx)
    ctx.set_progress(40)
    await asyncio.sleep(seconds)
    await app.log_finish(seq)
    return "done"


# ---------------------------------------------------------------------------- runaways


def runaway(ctx: JobContext, seconds: float) -> str:
    """Loops past any timeout until its own deadline, then writes its end marker."""
    seq = app.log_start_sync(ctx)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    app.log_finish_sync(seq)
    return "ran to the end"


def runaway_isolated(ctx: JobContext, seconds: float) -> str:
    """The same, registered with ``isolation="process"``."""
    return runaway(ctx, seconds)


def retry_soon_isolated(ctx: JobContext, seconds: float) -> int:
    """Asks for its retry ``seconds`` from now (its backoff says 5 s), from a child process."""
    app.log_start_sync(ctx)
    if ctx.attempt == 1:
        raise pgqueue.Retry(in_=seconds)
    return ctx.attempt


def exit_process(ctx: JobContext, code: int) -> None:
    app.log_start_sync(ctx)
    os._exit(code)


async def block_loop(ctx: JobContext, seconds: float, rename_task: str | None = None) -> str:
    """Blocks the event loop it runs on (``time.sleep`` in a coroutine); first, with
    ``rename_task``, renames the asyncio task it runs in (a name the worker may not expect)."""
    if rename_task is not None:
        task = asyncio.current_task()
        assert task is not None
        task.set_name(rename_task)
    seq = await app.log_start(ctx)
    time.sleep(seconds)
    await app.log_finish(seq)
    return "woke"


# ---------------------------------------------------------------------------- crashes


async def sleep_return_pid(ctx: JobContext, first_seconds: float, later_seconds: float) -> int:
    """Sleeps ``first_seconds`` on the job's first logged run, ``later_seconds`` on any later one;
    returns the pid of the process that ran it."""
    earlier = await asyncio.to_thread(app.runs_so_far_sync, ctx.job_id)
    seq = await app.log_start(ctx, "first" if earlier == 0 else "later")
    try:
        await asyncio.sleep(first_seconds if earlier == 0 else later_seconds)
    except asyncio.CancelledError:  # e.g. its worker learnt it lost the job: recorded, then gives way
        await app.log_cancelled(seq)
        raise
    await app.log_finish(seq)
    return os.getpid()


async def sleep_unless_fast(ctx: JobContext, seconds: float) -> int:
    seq = await app.log_start(ctx)
    fast = await app.flag_set(FAST_FLAG)
    await asyncio.sleep(0.2 if fast else seconds)
    await app.log_finish(seq)
    return ctx.attempt


async def poison(ctx: JobContext) -> None:
    """Kills the worker process that runs it."""
    await app.log_start(ctx)
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- registration


def register_faults(q: pgqueue.Queue) -> bool:
    """Register the handlers above on ``q``; whether ``isolation="process"`` per task was taken."""
    quick = pgqueue.fixed(0.2)
    handlers: list[Callable[..., Any]] = [
        bad_result,
        bad_result_sync,
        raise_bad_message,
        raise_bad_message_sync,
        raise_unprintable,
        raise_unprintable_sync,
        raise_base,
        raise_base_sync,
        cancel_itself,
        ignore_cancel,
        replace_stop_signal,
        stop_loop,
        progress_refused,
        progress_uncaught,
        progress_40,
        runaway,
        exit_process,
        block_loop,
        sleep_return_pid,
        sleep_unless_fast,
        poison,
    ]
    for fn in handlers:
        q.task(name=fn.__name__, max_attempts=1, backoff=quick)(fn)
    task: Callable[..., Any] = q.task
    try:
        task(name="runaway_isolated", max_attempts=1, backoff=quick, isolation="process")(runaway_isolated)
        slow = pgqueue.fixed(5)
        isolated = task(name="retry_soon_isolated", max_attempts=2, backoff=slow, isolation="process")
        isolated(retry_soon_isolated)
    except TypeError:  # a pgqueue without per-task isolation: registered plain, so the app imports
        q.task(name="runaway_isolated", max_attempts=1, backoff=quick)(runaway_isolated)
        return False
    return True


app = FaultApp(os.environ.get("PGQUEUE_DSN"), os.environ.get("PGQUEUE_SCHEMA", "pgqueue"))
queue = app.queue
