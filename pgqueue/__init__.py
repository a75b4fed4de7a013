"""pgqueue: background jobs for Python that need nothing but PostgreSQL.

Everything public is re-exported here and listed in ``__all__``; other modules are internal.
"""

from pgqueue._aqueue import AsyncQueue
from pgqueue._enqueue import JobSpec
from pgqueue._jobs import Job, JobState
from pgqueue._queue import Queue
from pgqueue._retry import Abort, Backoff, Retry, exponential, fixed, linear
from pgqueue._schedules import Schedule
from pgqueue._tasks import Registry, Task, TaskOptions
from pgqueue.errors import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    HandlerProcessDied,
    InvalidJobError,
    InvalidQueueSettingsError,
    JobCancelled,
    JobNotFoundError,
    JobTimeout,
    NotFoundError,
    PgQueueError,
    ScheduleNotFoundError,
    SchemaNotReadyError,
    UndecodableArguments,
    UnknownTaskError,
    UnstorableProgress,
    UnstorableResult,
)
from pgqueue.worker.context import JobContext

__version__ = "0.1.0"

__all__ = [
    "Abort",
    "AsyncQueue",
    "AuthenticationError",
    "Backoff",
    "ConfigurationError",
    "ConflictError",
    "DatabaseConfigurationError",
    "DatabaseUnavailableError",
    "HandlerProcessDied",
    "InvalidJobError",
    "InvalidQueueSettingsError",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobNotFoundError",
    "JobSpec",
    "JobState",
    "JobTimeout",
    "NotFoundError",
    "PgQueueError",
    "Queue",
    "Registry",
    "Retry",
    "Schedule",
    "ScheduleNotFoundError",
    "SchemaNotReadyError",
    "Task",
    "TaskOptions",
    "UndecodableArguments",
    "UnknownTaskError",
    "UnstorableProgress",
    "UnstorableResult",
    "__version__",
    "exponential",
    "fixed",
    "linear",
]
