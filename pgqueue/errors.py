"""The exceptions pgqueue raises, all under one base class so callers can catch them together."""


class PgQueueError(Exception):
    """Base class of every error pgqueue raises on purpose."""


class InvalidJobError(PgQueueError, ValueError):
    """Refused at enqueue: the job's task, arguments or options are not acceptable.

    Raised before anything is written, so a refused enqueue leaves the database untouched.
    """


class UnknownTaskError(PgQueueError, LookupError):
    """A task name that no handler is registered for."""


class JobNotFoundError(PgQueueError, LookupError):
    """No job (live or dead-lettered) has that id."""


class ConfigurationError(PgQueueError):
    """A setting is missing or malformed (DSN, schema name, worker options…)."""


class DatabaseUnavailableError(PgQueueError):
    """No connection to PostgreSQL could be had in time (server down, wrong DSN, pool exhausted)."""


class SchemaNotReadyError(PgQueueError):
    """The database has no pgqueue schema, or an older one: run ``pgqueue migrate``."""
