"""The ``@queue.task`` decorator and the registry that maps task names to handlers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypedDict, TypeVar

from typing_extensions import Unpack

from pgqueue._jobs import DEFAULT_MAX_ATTEMPTS, DEFAULT_PRIORITY, DEFAULT_QUEUE, OPTION_NAMES, JobOptions
from pgqueue._naming import check_queue_name, check_task_name
from pgqueue._retry import DEFAULT_BACKOFF, Backoff
from pgqueue.errors import ConfigurationError, InvalidJobError, UnknownTaskError

R = TypeVar("R")
Handler = Callable[..., Any]
CONTEXT_PARAMETER = "ctx"
Isolation = Literal["thread", "process"]
ISOLATIONS: tuple[Isolation, ...] = ("thread", "process")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Defaults a task applies to every job it enqueues, and how the worker treats its failures."""

    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float | None = None
    backoff: Backoff = DEFAULT_BACKOFF
    abort_on: tuple[type[BaseException], ...] = ()
    # "process" runs the handler in a child process that is killed at its timeout; None follows
    # the worker's --isolation setting.
    isolation: Isolation | None = None


def _signature_without_context(fn: Handler) -> inspect.Signature:
    signature = inspect.signature(fn)
    params = [p for name, p in signature.parameters.items() if name != CONTEXT_PARAMETER]
    return signature.replace(parameters=params)


@dataclass(slots=True)
class Task(Generic[R]):
    """A registered handler. Call it to run it in-process; ``enqueue`` it to run it on a worker."""

    name: str
    fn: Handler
    options: TaskOptions
    _enqueue: Callable[..., R] = field(repr=False)
    takes_context: bool = False
    is_async: bool = False
    _signature: inspect.Signature = field(init=False, repr=False)
    _fitting: set[frozenset[str]] = field(init=False, repr=False, default_factory=set)

    def __post_init__(self) -> None:
        self.takes_context = CONTEXT_PARAMETER in inspect.signature(self.fn).parameters
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self._signature = _signature_without_context(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def check_args(self, args: Mapping[str, Any]) -> None:
        """Refuse arguments the handler could never accept, at enqueue instead of on the worker."""
        # Whether keyword arguments bind depends only on their names: remember the sets that did.
        names = frozenset(args)
        if names in self._fitting:
            return
        try:
            self._signature.bind(**args)
        except TypeError as exc:
            raise InvalidJobError(f"arguments do not fit task {self.name!r}: {exc}") from exc
        if len(self._fitting) < 64:
            self._fitting.add(names)

    def enqueue(self, **kwargs: Any) -> R:
        """Enqueue one job with this task's defaults; keyword arguments become the job's args."""
        return self._enqueue(self.name, kwargs)

    def with_options(self, *, conn: Any = None, **overrides: Unpack[JobOptions]) -> BoundTask[R]:
        """Enqueue with overrides: ``send_email.with_options(delay=60, conn=tx).enqueue(to=…)``."""
        if not overrides.keys() <= OPTION_NAMES:
            unknown = sorted(set(overrides) - OPTION_NAMES)
            raise InvalidJobError(f"unknown enqueue options {unknown}; allowed: {sorted(OPTION_NAMES)}")
        return BoundTask(self, overrides, conn)


@dataclass(frozen=True, slots=True)
class BoundTask(Generic[R]):
    """A task with per-call options and connection (see :meth:`Task.with_options`)."""

    task: Task[R]
    overrides: JobOptions
    conn: Any = None

    def enqueue(self, **kwargs: Any) -> R:
        return self.task._enqueue(self.task.name, kwargs, conn=self.conn, **self.overrides)


class Registry:
    """Task names to handlers. A producer-only app may leave it empty and enqueue by name."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any]] = {}

    def add(self, task: Task[Any]) -> None:
        existing = self._tasks.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ConfigurationError(f"task name {task.name!r} is already registered")
        self._tasks[task.name] = task

    def get(self, name: str) -> Task[Any] | None:
        return self._tasks.get(name)

    def require(self, name: str) -> Task[Any]:
        task = self._tasks.get(name)
        if task is None:
            raise UnknownTaskError(f"no handler is registered for task {name!r}")
        return task

    def __iter__(self) -> Iterator[Task[Any]]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)


class TaskSettings(TypedDict, total=False):
    """The options ``@queue.task(...)`` and ``@queue.periodic(...)`` take; unset ones keep
    :class:`TaskOptions`' defaults."""

    queue: str | None
    priority: int | None
    max_attempts: int | None
    timeout: float | None
    backoff: Backoff | None
    abort_on: tuple[type[BaseException], ...] | None
    isolation: Isolation | None


TASK_SETTING_NAMES = frozenset(TaskSettings.__annotations__)


def make_options(**given: Unpack[TaskSettings]) -> TaskOptions:
    """Task options checked at declaration, so a typo fails at import rather than at 3 AM."""
    unknown = set(given) - TASK_SETTING_NAMES
    if unknown:
        raise TypeError(f"task() got unexpected keyword arguments {sorted(unknown)}")
    changes: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    if "queue" in changes:
        check_queue_name(changes["queue"])
    if "backoff" in changes and not callable(changes["backoff"]):
        raise ConfigurationError("backoff must be callable: (attempt) -> seconds")
    if "abort_on" in changes:
        changes["abort_on"] = tuple(changes["abort_on"])
    if "isolation" in changes and changes["isolation"] not in ISOLATIONS:
        raise ConfigurationError(f"isolation must be one of {ISOLATIONS}, got {changes['isolation']!r}")
    return replace(TaskOptions(), **changes)


def task_name(fn: Handler, name: str | None) -> str:
    return check_task_name(name if name is not None else fn.__name__)
