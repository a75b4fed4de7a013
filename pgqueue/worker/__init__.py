"""The worker runtime: :class:`Worker` (blocking) and :class:`AsyncWorker` (asyncio).

The names are loaded on first use (PEP 562): ``import pgqueue`` reaches this package for
:class:`JobContext`, and a producer should not pay for the claimer, executor, listener and the
rest of the worker's machinery it never runs. ``from pgqueue.worker import Worker`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgqueue.worker.context import JobContext
    from pgqueue.worker.core import AsyncWorker, Worker
    from pgqueue.worker.heap import freeze_startup_heap
    from pgqueue.worker.settings import WorkerSettings
    from pgqueue.worker.stats import WorkerStats

_EXPORTS = {
    "AsyncWorker": "pgqueue.worker.core",
    "JobContext": "pgqueue.worker.context",
    "Worker": "pgqueue.worker.core",
    "WorkerSettings": "pgqueue.worker.settings",
    "WorkerStats": "pgqueue.worker.stats",
    "freeze_startup_heap": "pgqueue.worker.heap",
}

__all__ = ["AsyncWorker", "JobContext", "Worker", "WorkerSettings", "WorkerStats", "freeze_startup_heap"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
