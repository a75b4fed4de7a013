"""Settings and the task registry shared by :class:`Queue` and :class:`AsyncQueue`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Self, TypeVar, overload

from typing_extensions import Unpack

from pgqueue._connections import connect_wait as resolve_connect_wait
from pgqueue._connections import connection_kwargs, prepared_statements_enabled, resolve_dsn
from pgqueue._enqueue import JobSpec, build_request
from pgqueue._jobs import JobOptions
from pgqueue._naming import check_queue_name
from pgqueue._schedules import MisfirePolicy, Schedule
from pgqueue._sql import Queries, queries_for
from pgqueue._tasks import Handler, Registry, Task, TaskSettings, make_options, task_name
from pgqueue.errors import ConfigurationError, InvalidJobError, InvalidQueueSettingsError

R = TypeVar("R")


class Keep:
    """The default of settings that should stay as they are unless given (``None`` clears them)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


def _seconds_or_none(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise InvalidQueueSettingsError(f"retention must not be negative, got {value!r}")
    return seconds


def _schema(schema: str | None) -> str:
    if schema is not None:
        return schema
    from pgqueue._settings import resolve_schema  # pydantic loads with the first queue, not at import

    return resolve_schema()


UNIQUE_RACE_RETRIES = 20


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's settings shared by every worker (the ``queues`` table)."""

    name: str
    paused: bool
    concurrency: int | None
    rate_limit: float | None


class QueueBase(Generic[R]):
    """Where jobs go (DSN, schema) and which handlers exist (the registry).

    ``R`` is what enqueueing returns: ``int`` for :class:`Queue`, an awaitable of it for
    :class:`AsyncQueue`. Nothing connects until the first call that needs the database, so a
    module can build its queue at import time and a CLI can supply the DSN later.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        notify: bool = True,
        pool_size: int = 10,
        registry: Registry | None = None,
        schedules: list[Schedule] | None = None,
        connect_wait: float | None = None,
        prepared_statements: bool | None = None,
    ) -> None:
        """``connect_wait``: seconds a call keeps retrying a database that refuses, restarts or is
        out of connection slots before it raises :class:`DatabaseUnavailableError` (default
        ``$PGQUEUE_CONNECT_WAIT``, else 5); failures retrying cannot fix (credentials, no such
        database) raise at once. ``prepared_statements=False`` (default
        ``$PGQUEUE_PREPARED_STATEMENTS``, else on) never prepares statements server-side, as
        PgBouncer in transaction mode requires.
        """
        self._dsn = dsn
        self.connect_wait = resolve_connect_wait(connect_wait)
        self.prepared_statements = (
            prepared_statements if prepared_statements is not None else prepared_statements_enabled()
        )
        # Names the connections (application_name "pgqueue-<role> host:pid"); the CLI and the
        # scheduler set their own before first use.
        self.connection_role = "client"
        self.declared_schedules: list[Schedule] = schedules if schedules is not None else []
        # The schema: given, else $PGQUEUE_SCHEMA (so one env file serves CLI and app), else "pgqueue".
        self.queries: Queries = queries_for(_schema(schema))
        self.notify = notify
        self.pool_size = pool_size
        self.registry = registry if registry is not None else Registry()

    @classmethod
    def like(cls, other: QueueBase[Any], *, pool_size: int | None = None) -> Self:
        """A queue of this kind (sync or async) for the same database, schema, tasks and
        settings as ``other``, with a pool of its own: how the scheduler and the admin get the
        sync twin of an app's :class:`AsyncQueue`. Its connections are named by its own role."""
        return cls(
            other._dsn,
            schema=other.schema,
            notify=other.notify,
            pool_size=other.pool_size if pool_size is None else pool_size,
            registry=other.registry,
            schedules=other.declared_schedules,
            connect_wait=other.connect_wait,
            prepared_statements=other.prepared_statements,
        )

    def use_dsn(self, dsn: str) -> None:
        """Point an already-built queue at another database (the CLI's ``--dsn``), before first use."""
        self._dsn = dsn

    def _queue_settings_params(
        self,
        name: str,
        *,
        paused: bool | None = None,
        concurrency: int | Keep | None = KEEP,
        rate_limit: float | Keep | None = KEEP,
        keep_completed: timedelta | float | None = None,
        keep_completed_count: int | None = None,
        keep_dead: timedelta | float | None = None,
    ) -> dict[str, Any]:
        try:
            check_queue_name(name)
        except InvalidJobError as exc:
            raise InvalidQueueSettingsError(str(exc)) from None
        if (
            not isinstance(concurrency, Keep)
            and concurrency is not None
            and (isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1)
        ):
            raise InvalidQueueSettingsError(
                f"concurrency must be an integer >= 1 or None, got {concurrency!r}"
            )
        if (
            not isinstance(rate_limit, Keep)
            and rate_limit is not None
            and (isinstance(rate_limit, bool) or not isinstance(rate_limit, int | float) or rate_limit <= 0)
        ):
            raise InvalidQueueSettingsError(
                f"rate_limit must be a positive number of jobs/s or None, got {rate_limit!r}"
            )
        if keep_completed_count is not None and keep_completed_count < 0:
            raise InvalidQueueSettingsError("keep_completed_count must not be negative")
        return {
            "name": name,
            "paused": paused,
            "concurrency": None if isinstance(concurrency, Keep) else concurrency,
            "clear_concurrency": concurrency is None,
            "rate_limit": None if isinstance(rate_limit, Keep) else rate_limit,
            "clear_rate_limit": rate_limit is None,
            "keep_completed": _seconds_or_none(keep_completed),
            "keep_completed_count": keep_completed_count,
            "keep_dead": _seconds_or_none(keep_dead),
        }

    @property
    def schema(self) -> str:
        return self.queries.schema

    @property
    def dsn(self) -> str:
        """The DSN in use: the one given, else ``PGQUEUE_DSN``, else ``DATABASE_URL``."""
        return resolve_dsn(self._dsn)

    def _pool_kwargs(self) -> dict[str, Any]:
        """The connect keyword arguments of the queue's own connections (see
        :func:`pgqueue._connections.connection_kwargs`), autocommit included."""
        return {
            "autocommit": True,
            **connection_kwargs(
                self.connection_role, dsn=self.dsn, prepared_statements=self.prepared_statements
            ),
        }

    def enqueue(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        conn: Any = None,
        **options: Unpack[JobOptions],
    ) -> R:
        raise NotImplementedError  # each twin implements it

    @overload
    def task(self, fn: Handler, /) -> Task[R]: ...

    @overload
    def task(
        self, *, name: str | None = None, **settings: Unpack[TaskSettings]
    ) -> Callable[[Handler], Task[R]]: ...

    def task(
        self, fn: Handler | None = None, *, name: str | None = None, **settings: Unpack[TaskSettings]
    ) -> Task[R] | Callable[[Handler], Task[R]]:
        """Register a handler: ``@queue.task`` or ``@queue.task(queue="email", max_attempts=5)``.

        Options are checked here, at import time, rather than when the first job fails.
        """
        options = make_options(**settings)
        # Validate the numeric defaults once through the same checks enqueue applies.
        build_request(JobSpec("_"), options)

        def register(handler: Handler) -> Task[R]:
            registered: Task[R] = Task(task_name(handler, name), handler, options, self.enqueue)
            self.registry.add(registered)
            return registered

        return register(fn) if fn is not None else register

    def schedule(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        cron: str | None = None,
        every: timedelta | None = None,
        timezone: str = "UTC",
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        misfire: MisfirePolicy = "skip",
        misfire_grace: timedelta = timedelta(minutes=1),
    ) -> Schedule:
        """Declare a recurring job in code; every scheduler process stores and fires it.

        The cron string and time zone are checked here: a bad one fails at import, naming the
        schedule. ``name`` defaults to the task name and must be unique.
        """
        declared = Schedule(
            name=name or task,
            task=task,
            args=dict(args or {}),
            cron=cron,
            every=every,
            timezone=timezone,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            misfire=misfire,
            misfire_grace=misfire_grace,
        )
        if any(s.name == declared.name for s in self.declared_schedules):
            raise ConfigurationError(f"schedule {declared.name!r} is declared twice")
        self.declared_schedules.append(declared)
        return declared

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: timedelta | None = None,
        timezone: str = "UTC",
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        misfire: MisfirePolicy = "skip",
        misfire_grace: timedelta = timedelta(minutes=1),
    ) -> Callable[[Handler], Task[R]]:
        """Register a handler as a task and run it on a schedule: ``@queue.periodic(cron="0 2 * * *")``."""

        def register(handler: Handler) -> Task[R]:
            registered = self.task(
                name=name,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                timeout=timeout,
            )(handler)
            self.schedule(
                registered.name,
                args,
                cron=cron,
                every=every,
                timezone=timezone,
                name=registered.name,
                queue=registered.options.queue,
                priority=priority,
                max_attempts=max_attempts,
                misfire=misfire,
                misfire_grace=misfire_grace,
            )
            return registered

        return register
