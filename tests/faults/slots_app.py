"""Handlers for the process-isolation tests, loaded in child processes as ``slots_app:queue``.

Each one misbehaves in one particular way (loops, exits, raises what should not be raised,
returns what cannot be stored) so the tests can check the parent survives it. The queue never
connects: registering handlers needs no database.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pgqueue import Queue
from pgqueue.worker.context import JobContext

# A child told to boot slowly (the timeout test) sleeps while importing the app, as a heavy app does.
time.sleep(float(os.environ.get("SLOTS_APP_IMPORT_SECONDS", "0")))

queue = Queue(None)


@queue.task
def echo(value: Any) -> Any:
    return value


@queue.task
def nothing() -> None:
    return None


@queue.task
def give_set() -> Any:
    return {1, 2, 3}


@queue.task
def give_nan() -> Any:
    return {"value": float("nan")}


@queue.task
def fail(message: str) -> None:
    raise ValueError(message)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words for it")


@queue.task
def fail_unprintably() -> None:
    raise Unprintable()


@queue.task
def raise_base(kind: str) -> None:
    exc: BaseException = {
        "SystemExit": SystemExit(4),
        "KeyboardInterrupt": KeyboardInterrupt(),
        "GeneratorExit": GeneratorExit(),
    }[kind]
    raise exc


@queue.task
def pid() -> int:
    return os.getpid()


@queue.task
def spin() -> None:
    """A handler that never returns: the case threads cannot handle."""
    while True:
        pass


@queue.task
def exit_hard(code: int) -> None:
    os._exit(code)


@queue.task
def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@queue.task
def report_progress(steps: list[int], ctx: JobContext) -> dict[str, Any]:
    for step in steps:
        ctx.set_progress(step)
    ctx.set_progress({"stage": "done"})
    return {"job_id": ctx.job_id, "attempt": ctx.attempt, "worker_id": ctx.worker_id, "task": ctx.task}


@queue.task
def overlap(path: str, seconds: float) -> None:
    """Append start and end lines to ``path`` (O_APPEND: each small write lands whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"start {time.time():.6f} {os.getpid()}\n".encode())
        time.sleep(seconds)
        os.write(fd, f"end {time.time():.6f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@queue.task
async def async_double(x: int) -> dict[str, Any]:
    await asyncio.sleep(0.05)
    return {"doubled": x * 2, "in_loop": asyncio.get_running_loop().is_running()}


@queue.task
def spawn_and_spin(path: str) -> None:
    """Start a grandchild, note its pid, then never return."""
    import subprocess

    grandchild = subprocess.Popen(["sleep", "30"])
    with open(path, "w") as f:
        f.write(str(grandchild.pid))
    while True:
        pass
