"""Bad input is refused at enqueue with InvalidJobError (a PgQueueError) and nothing is written."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from pgqueue import (
    AsyncQueue,
    ConfigurationError,
    InvalidJobError,
    JobSpec,
    PgQueueError,
    Queue,
)
from pgqueue.migrate import upgrade
from pgqueue.testing import count_rows

AWARE = datetime(2030, 1, 1, tzinfo=UTC)

# (id, task, args, options) — each one thing wrong.
BAD_ENQUEUES: list[tuple[str, str, Any, dict[str, Any]]] = [
    # args that JSON (or PostgreSQL's jsonb) cannot hold
    ("args-object", "t", {"x": object()}, {}),
    ("args-set", "t", {"x": {1, 2}}, {}),
    ("args-bytes", "t", {"x": b"raw"}, {}),
    ("args-datetime", "t", {"when": AWARE}, {}),
    ("args-decimal", "t", {"x": Decimal("1.5")}, {}),
    ("args-nan", "t", {"x": math.nan}, {}),
    ("args-inf", "t", {"x": -math.inf}, {}),
    ("args-nul-char", "t", {"x": "a\x00b"}, {}),
    ("args-nul-in-key", "t", {"a\x00": 1}, {}),
    ("args-lone-surrogate", "t", {"x": "\ud800"}, {}),
    ("args-int-key", "t", {1: "a"}, {}),
    ("args-nested-bad", "t", {"x": [1, {"y": object()}]}, {}),
    ("args-list", "t", [1, 2], {}),
    ("args-string", "t", "to=a@b.c", {}),
    # task names
    ("task-empty", "", {}, {}),
    ("task-space", "send email", {}, {}),
    ("task-leading-digit", "1task", {}, {}),
    ("task-semicolon", "t;drop", {}, {}),
    ("task-not-str", 42, {}, {}),
    # queue names with odd characters
    ("queue-empty", "t", {}, {"queue": ""}),
    ("queue-space", "t", {}, {"queue": "has space"}),
    ("queue-semicolon", "t", {}, {"queue": "a;b"}),
    ("queue-quote", "t", {}, {"queue": "it's"}),
    ("queue-slash", "t", {}, {"queue": "a/b"}),
    ("queue-newline", "t", {}, {"queue": "a\nb"}),
    ("queue-nul", "t", {}, {"queue": "a\x00"}),
    ("queue-unicode", "t", {}, {"queue": "émails"}),
    ("queue-leading-dash", "t", {}, {"queue": "-x"}),
    ("queue-too-long", "t", {}, {"queue": "q" * 64}),
    ("queue-not-str", "t", {}, {"queue": 7}),
    # priority out of range (1 highest … 10 lowest)
    ("priority-0", "t", {}, {"priority": 0}),
    ("priority-11", "t", {}, {"priority": 11}),
    ("priority-negative", "t", {}, {"priority": -1}),
    ("priority-bool", "t", {}, {"priority": True}),
    ("priority-str", "t", {}, {"priority": "5"}),
    ("priority-float", "t", {}, {"priority": 5.0}),
    # delay and run_at
    ("delay-negative", "t", {}, {"delay": -1}),
    ("delay-negative-timedelta", "t", {}, {"delay": timedelta(seconds=-0.001)}),
    ("delay-nan", "t", {}, {"delay": math.nan}),
    ("delay-inf", "t", {}, {"delay": math.inf}),
    ("delay-str", "t", {}, {"delay": "10"}),
    ("delay-bool", "t", {}, {"delay": True}),
    ("delay-too-long", "t", {}, {"delay": timedelta.max}),
    ("delay-and-run-at", "t", {}, {"delay": 5, "run_at": AWARE}),
    ("run-at-naive", "t", {}, {"run_at": datetime(2030, 1, 1)}),
    ("run-at-str", "t", {}, {"run_at": "2030-01-01T00:00:00Z"}),
    # other options
    ("max-attempts-0", "t", {}, {"max_attempts": 0}),
    ("max-attempts-bool", "t", {}, {"max_attempts": True}),
    ("max-attempts-str", "t", {}, {"max_attempts": "3"}),
    ("timeout-0", "t", {}, {"timeout": 0}),
    ("timeout-negative", "t", {}, {"timeout": -5}),
    ("timeout-nan", "t", {}, {"timeout": math.nan}),
    ("unique-key-empty", "t", {}, {"unique_key": ""}),
    ("unique-key-int", "t", {}, {"unique_key": 42}),
    ("unique-key-nul", "t", {}, {"unique_key": "a\x00b"}),
]

# A registered handler's signature: arguments that could never bind are refused at enqueue.
BAD_TASK_ARGS: list[tuple[str, dict[str, Any]]] = [
    ("missing-required", {"subject": "hi"}),
    ("unexpected", {"to": "a@b.c", "cc": "x@y.z"}),
    ("context-is-not-an-argument", {"to": "a@b.c", "ctx": 1}),
    ("positional-only", {"to": "a@b.c", "flag": True}),
]


@pytest.fixture(scope="module")
def shared_schema(postgres_dsn: str) -> Iterator[str]:
    """One migrated schema for the whole module: every test here must leave it empty."""
    schema = f"pgq_val_{uuid.uuid4().hex[:10]}"
    upgrade(postgres_dsn, schema=schema)
    yield schema
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def refusing_queue(postgres_dsn: str, shared_schema: str) -> Iterator[Queue]:
    with Queue(postgres_dsn, schema=shared_schema) as q:
        yield q


@pytest.fixture
async def refusing_async_queue(postgres_dsn: str, shared_schema: str) -> AsyncIterator[AsyncQueue]:
    async with AsyncQueue(postgres_dsn, schema=shared_schema) as q:
        yield q


@pytest.fixture
def written(postgres_dsn: str, shared_schema: str) -> Callable[[], int]:
    """Rows in the shared schema's jobs and dead-letter tables (0 unless something leaked)."""
    return lambda: (
        count_rows(postgres_dsn, shared_schema, "jobs")
        + count_rows(postgres_dsn, shared_schema, "dead_letter")
    )


def register_send_email(q: Queue | AsyncQueue) -> None:
    @q.task(queue="email")
    def send_email(ctx: Any, flag: bool = False, /, *, to: str, subject: str = "hi") -> None: ...


@pytest.mark.parametrize(
    ("task", "args", "options"),
    [case[1:] for case in BAD_ENQUEUES],
    ids=[c[0] for c in BAD_ENQUEUES],
)
def test_bad_enqueue_is_refused_and_writes_nothing(
    refusing_queue: Queue, written: Callable[[], int], task: Any, args: Any, options: dict[str, Any]
) -> None:
    with pytest.raises(InvalidJobError) as caught:
        refusing_queue.enqueue(task, args, **options)
    assert isinstance(caught.value, PgQueueError)
    with pytest.raises(InvalidJobError):
        refusing_queue.enqueue_many(
            [{"task": "fine"}, {"task": task, "args": args, **options}, {"task": "fine"}]
        )
    assert written() == 0


@pytest.mark.parametrize(
    ("task", "args", "options"),
    [case[1:] for case in BAD_ENQUEUES],
    ids=[c[0] for c in BAD_ENQUEUES],
)
async def test_bad_async_enqueue_is_refused_and_writes_nothing(
    refusing_async_queue: AsyncQueue,
    written: Callable[[], int],
    task: Any,
    args: Any,
    options: dict[str, Any],
) -> None:
    with pytest.raises(InvalidJobError):
        await refusing_async_queue.enqueue(task, args, **options)
    with pytest.raises(InvalidJobError):
        await refusing_async_queue.enqueue_many([JobSpec("fine"), JobSpec(task, args, **options)])
    assert written() == 0


@pytest.mark.parametrize("args", [case[1] for case in BAD_TASK_ARGS], ids=[case[0] for case in BAD_TASK_ARGS])
def test_args_that_do_not_fit_the_registered_task_are_refused(
    refusing_queue: Queue, written: Callable[[], int], args: dict[str, Any]
) -> None:
    register_send_email(refusing_queue)
    with pytest.raises(InvalidJobError, match="send_email"):
        refusing_queue.enqueue("send_email", args)
    task = refusing_queue.registry.require("send_email")
    with pytest.raises(InvalidJobError):
        task.enqueue(**args)
    with pytest.raises(InvalidJobError):
        refusing_queue.enqueue_many(
            [{"task": "send_email", "args": {"to": "ok"}}, {"task": "send_email", "args": args}]
        )
    assert written() == 0


async def test_async_args_that_do_not_fit_the_registered_task_are_refused(
    refusing_async_queue: AsyncQueue, written: Callable[[], int]
) -> None:
    register_send_email(refusing_async_queue)
    for _, args in BAD_TASK_ARGS:
        with pytest.raises(InvalidJobError):
            await refusing_async_queue.enqueue("send_email", args)
    assert written() == 0


def test_args_that_fit_the_registered_task_are_accepted(queue: Queue) -> None:
    register_send_email(queue)

    @queue.task
    def anything(**kwargs: Any) -> None: ...

    assert queue.get_job(queue.enqueue("send_email", {"to": "a@b.c"})).queue == "email"
    assert queue.get_job(queue.enqueue("anything", {"x": 1, "y": [2]})).args == {"x": 1, "y": [2]}


def test_a_bad_job_in_the_middle_of_a_batch_writes_nothing_of_it(
    refusing_queue: Queue, written: Callable[[], int]
) -> None:
    jobs: list[dict[str, Any]] = [{"task": "bulk", "args": {"i": i}} for i in range(1000)]
    jobs[500] = {"task": "bulk", "args": {"i": 500}, "priority": 0}
    with pytest.raises(InvalidJobError, match="#500"):
        refusing_queue.enqueue_many(jobs)
    jobs[500] = {"task": "bulk", "args": {"i": 500}, "unique_key": "k", "queue": "bad queue"}
    with pytest.raises(InvalidJobError, match="#500"):
        refusing_queue.enqueue_many(jobs)
    assert written() == 0


def test_a_refused_encoding_leaves_the_next_jobs_intact(queue: Queue) -> None:
    """The args encoder is reused across calls: one that failed half-way (circular, NaN, an
    unknown type deep inside) must not make the next job's shared, non-circular parts look
    circular, nor change what is stored."""
    looped: dict[str, Any] = {}
    looped["self"] = [looped]
    shared: dict[str, Any] = {"k": [1, "é"]}
    for bad_value in (looped, math.nan, object()):
        shared["bad"] = bad_value  # fails while inside shared, which is then mended and sent again
        with pytest.raises(InvalidJobError):
            queue.enqueue("t", {"x": [shared]})
        del shared["bad"]
        args = {"a": shared, "b": [shared, shared]}
        assert queue.get_job(queue.enqueue("t", args)).args == args
        [job_id] = queue.enqueue_many([JobSpec("t", args)])
        assert queue.get_job(job_id).args == args


def test_threads_encoding_the_same_args_at_once_store_them_all(queue: Queue) -> None:
    """Each thread has its own encoder: threads enqueueing the same (shared) args together, one of
    them failing on purpose in between, store every job exactly."""
    shared = {"k": list(range(50)), "nested": {"a": [{"b": "c"}] * 5}}
    args = {"one": shared, "two": shared}
    failures: list[Exception] = []

    def enqueue_some(fail: bool) -> list[int]:
        ids = []
        for _ in range(20):
            if fail:
                try:
                    queue.enqueue("t", {"x": [shared, math.inf]})
                except InvalidJobError as exc:
                    failures.append(exc)
            ids += queue.enqueue_many([JobSpec("t", args)] * 50)
        return ids

    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(enqueue_some, [True, False, True, False]))
    ids = [i for batch in batches for i in batch]
    assert len(failures) == 40 and len(ids) == 4000
    with psycopg.connect(queue.dsn) as conn:
        stored = conn.execute(
            f'SELECT count(*) FROM "{queue.schema}".jobs WHERE id = ANY(%s) AND args = %s::jsonb',
            (ids, json.dumps(args)),
        ).fetchone()
    assert stored == (4000,)


def test_a_batch_refuses_a_job_it_cannot_read(refusing_queue: Queue, written: Callable[[], int]) -> None:
    for bad in ({"task": "x", "priorty": 1}, {"args": {}}, ("x", {}), "x", None):
        with pytest.raises(InvalidJobError):
            refusing_queue.enqueue_many([{"task": "ok"}, bad])  # type: ignore[list-item]
    assert written() == 0


def test_task_options_are_checked_at_declaration(refusing_queue: Queue) -> None:
    def handler() -> None: ...

    for options in (
        {"priority": 0},
        {"priority": 11},
        {"priority": True},
        {"queue": "bad queue"},
        {"max_attempts": 0},
        {"timeout": -1},
        {"name": "bad name"},
    ):
        with pytest.raises(InvalidJobError):
            refusing_queue.task(**options)(handler)
    with pytest.raises(ConfigurationError):
        refusing_queue.task(backoff=5)(handler)  # type: ignore[arg-type]
    assert len(refusing_queue.registry) == 0


def test_registering_two_handlers_under_one_name_is_refused(refusing_queue: Queue) -> None:
    @refusing_queue.task(name="dup")
    def first() -> None: ...

    def second() -> None: ...

    with pytest.raises(ConfigurationError):
        refusing_queue.task(name="dup")(second)
    assert refusing_queue.registry.require("dup").fn is first.fn


def test_unknown_per_call_option_is_refused(refusing_queue: Queue, written: Callable[[], int]) -> None:
    @refusing_queue.task
    def ping() -> None: ...

    with pytest.raises(InvalidJobError):
        ping.with_options(prority=1)
    with pytest.raises(InvalidJobError):
        ping.with_options(delay=5, run_at=AWARE).enqueue()
    assert written() == 0


def test_every_error_is_a_pgqueue_error() -> None:
    import pgqueue

    for name in (
        "InvalidJobError",
        "UnknownTaskError",
        "JobNotFoundError",
        "ConfigurationError",
        "SchemaNotReadyError",
    ):
        assert issubclass(getattr(pgqueue, name), pgqueue.PgQueueError), name
    assert issubclass(InvalidJobError, ValueError)
