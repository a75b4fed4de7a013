"""Settings and the task registry shared by :class:`Queue` and :class:`AsyncQueue`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar, overload

from pgqueue.connections import resolve_dsn
from pgqueue.enqueue import JobSpec, make_request
from pgqueue.jobs import JobRequest
from pgqueue.retry import Backoff
from pgqueue.sql import Queries, queries_for
from pgqueue.tasks import Handler, Registry, Task, make_options, task_name

R = TypeVar("R")
DEFAULT_SCHEMA = "pgqueue"
UNIQUE_RACE_RETRIES = 20


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
        schema: str = DEFAULT_SCHEMA,
        notify: bool = True,
        pool_size: int = 10,
        registry: Registry | None = None,
    ) -> None:
        self._dsn = dsn
        self.queries: Queries = queries_for(schema)
        self.notify = notify
        self.pool_size = pool_size
        self.registry = registry if registry is not None else Registry()

    @property
    def schema(self) -> str:
        return self.queries.schema

    @property
    def dsn(self) -> str:
        """The DSN in use: the one given, else ``PGQUEUE_DSN``, else ``DATABASE_URL``."""
        return resolve_dsn(self._dsn)

    def enqueue(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        unique_key: str | None = None,
        conn: Any = None,
    ) -> R:
        raise NotImplementedError  # each twin implements it

    def _request(self, task: str, args: Mapping[str, Any] | None, **options: Any) -> JobRequest:
        return make_request(self.registry, JobSpec(task, args, **options))

    @overload
    def task(self, fn: Handler, /) -> Task[R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        abort_on: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[Handler], Task[R]]: ...

    def task(
        self,
        fn: Handler | None = None,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        abort_on: tuple[type[BaseException], ...] | None = None,
    ) -> Task[R] | Callable[[Handler], Task[R]]:
        """Register a handler: ``@queue.task`` or ``@queue.task(queue="email", max_attempts=5)``.

        Options are checked here, at import time, rather than when the first job fails.
        """
        options = make_options(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            backoff=backoff,
            abort_on=abort_on,
        )
        # Validate the numeric defaults once through the same checks enqueue applies.
        from pgqueue.jobs import build_request

        build_request(
            "_", {}, queue=options.queue, priority=options.priority, delay=None, run_at=None,
            max_attempts=options.max_attempts, timeout=options.timeout, unique_key=None,
        )

        def register(handler: Handler) -> Task[R]:
            registered: Task[R] = Task(task_name(handler, name), handler, options, self.enqueue)
            self.registry.add(registered)
            return registered

        return register(fn) if fn is not None else register
