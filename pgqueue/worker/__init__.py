"""The worker runtime: :class:`Worker` (blocking) and :class:`AsyncWorker` (asyncio)."""

from pgqueue.worker.context import JobContext
from pgqueue.worker.core import AsyncWorker, Worker
from pgqueue.worker.settings import WorkerSettings
from pgqueue.worker.stats import WorkerStats

__all__ = ["AsyncWorker", "JobContext", "Worker", "WorkerSettings", "WorkerStats"]
