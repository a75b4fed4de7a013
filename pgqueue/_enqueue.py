"""What the sync and async queues share: turning calls into validated rows and query parameters.

The twins (:mod:`pgqueue._queue`, :mod:`pgqueue._aqueue`) only add the I/O around these functions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from typing_extensions import Unpack

from pgqueue._jobs import OPTION_NAMES, JobOptions, JobRequest, check_unique_key, dump_args, short_repr
from pgqueue._sql import Queries
from pgqueue._tasks import Registry, Task, TaskOptions
from pgqueue.errors import InvalidJobError

# Rows per COPY write: small enough that the database stores one chunk while the client checks
# and formats the next (larger chunks leave it idle until the whole batch has been checked).
COPY_CHUNK_ROWS = 64


_SPEC_FIELDS = OPTION_NAMES | {"task", "args", "scheduled_for"}


class JobSpec:
    """One job for :meth:`Queue.enqueue_many`: ``JobSpec("send_email", {"to": to}, delay=60)``.

    ``scheduled_for`` is the fire time a schedule enqueues the job for (see ``ctx.scheduled_for``).
    """

    __slots__ = ("args", "options", "scheduled_for", "task")

    def __init__(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        scheduled_for: datetime | None = None,
        **options: Unpack[JobOptions],
    ) -> None:
        if not options.keys() <= OPTION_NAMES:
            raise InvalidJobError(f"unknown job options {sorted(set(options) - OPTION_NAMES)}")
        self.task = task
        self.args = args
        self.options = options
        self.scheduled_for = scheduled_for

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        when = f", scheduled_for={self.scheduled_for!r}" if self.scheduled_for is not None else ""
        return f"JobSpec({self.task!r}, {short_repr(self.args)}{extra}{when})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobSpec):
            return NotImplemented
        return (self.task, self.args, self.options, self.scheduled_for) == (
            other.task,
            other.args,
            other.options,
            other.scheduled_for,
        )

    __hash__ = None  # type: ignore[assignment]  # args and options are mutable mappings


def as_spec(item: JobSpec | Mapping[str, Any]) -> JobSpec:
    if type(item) is JobSpec:
        return item
    if type(item) is dict or isinstance(item, Mapping):
        if not item.keys() <= _SPEC_FIELDS:
            unknown = set(item) - _SPEC_FIELDS
            raise InvalidJobError(f"unknown job fields {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}")
        if "task" not in item:
            raise InvalidJobError(f"job {short_repr(dict(item))} has no 'task'")
        return JobSpec(**item)
    raise InvalidJobError(f"enqueue_many takes JobSpec objects or dicts, not {type(item).__name__}")


def build_request(spec: JobSpec, defaults: TaskOptions) -> JobRequest:
    """Validate every field of one job, unset options taken from ``defaults``; raises
    :class:`InvalidJobError` on the first bad one, before anything is written."""
    options = spec.options
    queue = options.get("queue")
    priority = options.get("priority")
    delay = options.get("delay")
    run_at = options.get("run_at")
    max_attempts = options.get("max_attempts")
    timeout = options.get("timeout")
    unique_key = options.get("unique_key")
    if delay is not None and run_at is not None:
        raise InvalidJobError("give either delay or run_at, not both")
    return JobRequest.checked(
        spec.task,
        spec.args,
        queue=queue if queue is not None else defaults.queue,
        priority=priority if priority is not None else defaults.priority,
        delay=delay,
        run_at=run_at,
        max_attempts=max_attempts if max_attempts is not None else defaults.max_attempts,
        timeout=timeout if timeout is not None else defaults.timeout,
        unique_key=unique_key,
        scheduled_for=spec.scheduled_for,
    )


def make_request(registry: Registry, spec: JobSpec) -> JobRequest:
    """Validate one job against its task's signature and defaults (unknown tasks get defaults)."""
    task = registry.get(spec.task) if isinstance(spec.task, str) else None
    request = build_request(spec, task.options if task is not None else TaskOptions())
    if task is not None:
        task.check_args(request.args)
    return request


def _options_key(spec: JobSpec) -> tuple[Any, ...]:
    """Every field but args and unique key, with types (so ``True`` never passes for ``1``)."""
    if not spec.options:  # the usual bulk job: the task's defaults
        return (spec.task, spec.scheduled_for)
    return (
        spec.task,
        spec.scheduled_for,
        *[(name, type(value), value) for name, value in spec.options.items() if name != "unique_key"],
    )


class Batch:
    """The jobs of one :meth:`Queue.enqueue_many`, checked as they stream into COPY.

    Validating a thousand jobs costs the client about as long as storing them costs the
    database, so the two overlap: the jobs go out in chunks of :data:`COPY_CHUNK_ROWS`, each
    checked just before it is sent, while the server stores the chunk before it. The first
    chunk is checked when the batch is made, before any I/O, so a batch bad from its first job
    is refused without touching the database. A bad job further on raises :class:`Refused`
    inside the COPY: the statement fails, the transaction around it rolls back, and nothing of
    the batch is written; the caller re-raises the job's own error (its message never goes to
    the server's log).

    A bulk enqueue repeats a few option sets thousands of times: each set is validated once,
    then only each job's own args and unique key are checked. Jobs with a unique key go through
    an INSERT instead (conflicts are skipped per row), so those batches are checked in full first,
    as are batches written in the caller's transaction (``stream=False``): a failed statement
    there would abort a transaction the caller goes on using.
    """

    __slots__ = ("_registry", "_set_of", "_templates", "_validated", "due_now", "requests", "specs", "unique")

    def __init__(
        self, registry: Registry, jobs: Iterable[JobSpec | Mapping[str, Any]], *, stream: bool = True
    ) -> None:
        self._registry = registry
        self._validated: dict[tuple[Any, ...], tuple[int, Task[Any] | None]] = {}
        self._templates: list[JobRequest] = []  # the first job of each option set
        self._set_of: list[int] = []  # per checked job: its option set's place in _templates
        self.specs: list[JobSpec] = []
        self.requests: list[JobRequest] = []  # the checked ones, in order
        unique, due_now = False, True
        for index, item in enumerate(jobs):
            try:
                spec = as_spec(item)
            except InvalidJobError as exc:
                raise InvalidJobError(f"job #{index}: {exc}") from exc
            options = spec.options
            if options:
                unique = unique or options.get("unique_key") is not None
                due_now = due_now and options.get("delay") is None and options.get("run_at") is None
            self.specs.append(spec)
        self.unique = unique
        # Every job runs as soon as it commits: COPY leaves run_at to its default, now(), the
        # transaction's clock (the one delays resolve against). Parsing a timestamp per row was
        # a fifth of the server's time for the COPY.
        self.due_now = due_now
        self.check(COPY_CHUNK_ROWS if stream and not unique else len(self.specs))

    def __len__(self) -> int:
        return len(self.specs)

    def check(self, upto: int) -> list[JobRequest]:
        """The requests of the first ``upto`` jobs, checking those not checked yet."""
        requests, specs, validated, templates = self.requests, self.specs, self._validated, self._templates
        for index in range(len(requests), min(upto, len(specs))):
            spec = specs[index]
            try:
                try:
                    key: tuple[Any, ...] | None = _options_key(spec)
                    known = validated.get(key)  # type: ignore[arg-type]
                except TypeError:  # an unhashable option: the full check below names it
                    key, known = None, None
                if known is None:
                    request = make_request(self._registry, spec)
                    if key is not None:
                        validated[key] = (len(templates), self._registry.get(request.task))
                    self._set_of.append(len(templates))
                    templates.append(request)
                    requests.append(request)
                    continue
                option_set, task = known
                template = templates[option_set]
                args = {} if spec.args is None else spec.args
                args_json = dump_args(args)
                unique_key = spec.options.get("unique_key")
                check_unique_key(unique_key)
                if task is not None:
                    task.check_args(args)
                self._set_of.append(option_set)
                requests.append(template.with_args(args, args_json, unique_key))
            except InvalidJobError as exc:
                raise InvalidJobError(f"job #{index}: {exc}") from exc
        return requests

    def copy_text(self, ids: Sequence[int], now: datetime) -> Iterator[str]:
        """COPY text for ``copy_jobs`` (or ``copy_jobs_due_now``), a chunk at a time, each chunk
        checked as it is made; a bad job raises :class:`Refused` carrying its error.

        Written by hand rather than row by row through the driver: it is the hot loop of a bulk
        enqueue. Queue and task names are already restricted to characters that need no
        escaping; JSON text holds no raw tabs or newlines, so doubling backslashes is all it
        needs. A batch shares a few option sets (usually one), so the columns around the args
        are formatted once per set.
        """
        around: dict[int, tuple[str, str]] = {}
        for start in range(0, len(self.specs), COPY_CHUNK_ROWS):
            stop = start + COPY_CHUNK_ROWS
            try:
                requests = self.check(stop)
            except InvalidJobError as exc:
                raise Refused(exc) from None
            lines = []
            rows = zip(ids[start:stop], requests[start:stop], self._set_of[start:stop], strict=True)
            for job_id, r, option_set in rows:
                parts = around.get(option_set)
                if parts is None:
                    parts = around[option_set] = _copy_parts(r, now, self.due_now)
                args = r.args_json.replace("\\", "\\\\") if "\\" in r.args_json else r.args_json
                lines.append(f"{job_id}\t{parts[0]}{args}{parts[1]}")
            yield "".join(lines)


class Refused(Exception):
    """A job of a streaming batch failed its check: raised inside the COPY to abort it."""

    def __init__(self, error: InvalidJobError) -> None:
        super().__init__("a job of the batch was refused")
        self.error = error


def _copy_parts(r: JobRequest, now: datetime, due_now: bool) -> tuple[str, str]:
    """The COPY text before and after a job's args, for every job sharing its options."""
    tail = [str(r.priority)]
    if not due_now:
        run_at = r.run_at if r.run_at is not None else now + timedelta(seconds=r.delay_seconds)
        tail.append(run_at.isoformat())
    tail += [str(r.max_attempts), _copy_value(r.timeout), _copy_value(r.scheduled_for)]
    return f"{r.queue}\t{r.task}\t", "\t" + "\t".join(tail) + "\n"


def wake_params(
    queries: Queries, queues: list[str], *, notify: bool = True, commits_alone: bool = True, waker: str = ""
) -> dict[str, Any]:
    """How a write that queued jobs wakes workers (the ``wake_one`` fragment and its callers).

    A statement that commits by itself wakes one waiting worker (never ``waker``), chosen when it
    runs; one inside the caller's transaction notifies every listener at commit instead, since
    whoever waits then, possibly long after the statement, is who must hear of it.
    """
    return {
        "channel": queries.channel,
        "queues": queues,
        "wake_one": notify and commits_alone,
        "broadcast": notify and not commits_alone,
        "waker": waker,
    }


def enqueue_params(
    queries: Queries, request: JobRequest, notify: bool, *, commits_alone: bool
) -> dict[str, Any]:
    """The ``enqueue`` statement's parameters. A job due now, written by a statement that commits
    by itself, may be handed to a waiting worker (``handoff``) under a new claim ``token``."""
    wake = wake_params(queries, [request.queue], notify=notify, commits_alone=commits_alone)
    due_now = request.run_at is None and not request.delay_seconds
    handoff = bool(wake["wake_one"] and due_now and request.scheduled_for is None)
    return {
        **wake,
        "handoff": handoff,
        "token": uuid.uuid4() if handoff else None,
        "queue": request.queue,
        "task": request.task,
        "args": request.args_json,
        "priority": request.priority,
        "run_at": request.run_at,
        "delay": request.delay_seconds,
        "max_attempts": request.max_attempts,
        "timeout": request.timeout,
        "unique_key": request.unique_key,
        "scheduled_for": request.scheduled_for,
    }


def _copy_value(value: datetime | float | None) -> str:
    if value is None:
        return "\\N"
    return value.isoformat() if isinstance(value, datetime) else repr(value)


def unique_params(requests: Sequence[JobRequest], ids: Sequence[int]) -> dict[str, Any]:
    return {
        "id": list(ids),
        "queue": [r.queue for r in requests],
        "task": [r.task for r in requests],
        "args": [r.args_json for r in requests],
        "priority": [r.priority for r in requests],
        "run_at": [r.run_at for r in requests],
        "delay": [r.delay_seconds for r in requests],
        "max_attempts": [r.max_attempts for r in requests],
        "timeout": [r.timeout for r in requests],
        "unique_key": [r.unique_key for r in requests],
        "scheduled_for": [r.scheduled_for for r in requests],
    }


def resolve_conflicts(
    requests: Sequence[JobRequest],
    reserved: Sequence[int],
    inserted: set[int],
    existing: Mapping[tuple[str, str], int],
) -> list[int]:
    """For each request, its new id, or the id of the live job that already holds its unique key."""
    result = []
    for job_id, r in zip(reserved, requests, strict=True):
        if job_id in inserted:
            result.append(job_id)
        else:
            assert r.unique_key is not None  # only keyed rows can conflict
            result.append(existing[(r.queue, r.unique_key)])
    return result


def distinct_queues(requests: Iterable[JobRequest]) -> list[str]:
    return sorted({r.queue for r in requests})
