"""The exceptions pgqueue raises, all under one base class so callers can catch them together.

Every error class lives here: a caller finds them all in one place, and no module has to import
another's internals to name a failure. ``Retry`` and ``Abort`` (:mod:`pgqueue._retry`) are not
errors but a handler's requests, so they stay with the retry policies.
"""


class PgQueueError(Exception):
    """Base class of every error pgqueue raises on purpose."""


class InvalidJobError(PgQueueError, ValueError):
    """Refused at enqueue: the job's task, arguments or options are not acceptable.

    Raised before anything is written, so a refused enqueue leaves the database untouched.
    """


class UndecodableArguments(PgQueueError, ValueError):
    """A claimed job's stored arguments cannot be decoded (JSON nested deeper than Python's
    decoder goes, written by another client): the job is dead-lettered on its first attempt."""


class InvalidQueueSettingsError(PgQueueError, ValueError):
    """Refused by ``configure_queue``: a limit or retention that cannot apply (nothing is changed)."""


class UnknownTaskError(PgQueueError, LookupError):
    """A task name that no handler is registered for."""


class NotFoundError(PgQueueError, LookupError):
    """The job, schedule or queue asked for does not exist (the admin answers 404)."""


class JobNotFoundError(NotFoundError):
    """No job (live or dead-lettered) has that id."""


class ScheduleNotFoundError(NotFoundError):
    """No schedule has that name."""


class ConflictError(PgQueueError):
    """The thing exists but its state does not allow the action, e.g. retrying a running job
    (the admin answers 409)."""


class ConfigurationError(PgQueueError):
    """A setting is missing or malformed (DSN, schema name, worker options…)."""


class DatabaseUnavailableError(PgQueueError):
    """No connection to PostgreSQL could be had in time (server down, wrong DSN, pool exhausted)."""


class DatabaseConfigurationError(ConfigurationError):
    """The DSN leads nowhere retrying could fix: no such database, role or host, an unparsable
    DSN, an SSL mismatch. Raised at the first attempt, with the server's (or libpq's) message."""


class AuthenticationError(DatabaseConfigurationError):
    """The server refused the credentials (wrong password, none given, rejected by pg_hba.conf)."""


class SchemaNotReadyError(PgQueueError):
    """The database has no pgqueue schema, or an older one: run ``pgqueue migrate``."""


class UnstorableResult(PgQueueError, ValueError):
    """A handler returned a value PostgreSQL cannot store (not JSON, NUL, a lone surrogate…).

    Recorded as the attempt's error, which then follows the task's retry policy: the value is
    lost, so the attempt cannot count as completed.
    """


class UnstorableProgress(PgQueueError, ValueError):
    """Raised into the handler by ``ctx.set_progress`` for a value that cannot be stored (or is
    not a number 0-100 or a dict).

    Raised at the call, where the handler can still react, instead of failing later in a
    background write that nobody would see.
    """


class JobTimeout(PgQueueError):
    """The handler ran past the job's timeout."""


class JobCancelled(PgQueueError):
    """The job was cancelled while it ran."""


class HandlerProcessDied(PgQueueError):
    """The process running an isolated handler exited without reporting an outcome."""
