"""Hostile input is refused at enqueue by name, quickly, with nothing written; and no stored row,
however its timestamps got there, can make ``get_job`` or an admin page fail.

Each refusal must be an :class:`InvalidJobError` naming the field and its limit (never a raw
RecursionError, OverflowError or psycopg error), arrive within two seconds, and leave the jobs
table empty, through every way in: ``Queue``/``AsyncQueue`` ``enqueue`` and ``enqueue_many``,
``Task.with_options(...).enqueue`` and the CLI.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from admin_support import AUTH, bury, insert_job
from fastapi.testclient import TestClient
from psycopg import sql

from pgqueue import AsyncQueue, InvalidJobError, JobSpec, JobState, Queue
from pgqueue._enqueue import COPY_CHUNK_ROWS
from pgqueue._jobs import (
    LATEST_DELAYED_RUN_AT,
    MAX_ARGS_DEPTH,
    MAX_TIMEOUT_SECONDS,
    MAX_UNIQUE_KEY_BYTES,
)
from pgqueue.cli import main as cli_main

REFUSAL_SECONDS = 2.0
STREAMED = COPY_CHUNK_ROWS * 2 + 5  # a bulk job checked while its batch streams into COPY
LATEST = datetime.max.replace(tzinfo=UTC)
EARLIEST = datetime.min.replace(tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")


def nested_lists(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def nested_tuples(levels: int) -> Any:
    value: Any = ()
    for _ in range(levels):
        value = (value,)
    return value


def nested_objects(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@dataclass(frozen=True)
class Hostile:
    """One bad enqueue: built lazily (some values are deep or huge), and what the error says."""

    id: str
    make: Callable[[], tuple[Any, dict[str, Any]]]  # (args, options)
    message: str
    task: str = "t"
    via_task: bool = True  # whether Task.with_options can carry it
    extra: dict[str, Any] = field(default_factory=dict)


DEEP = rf"nested more than {MAX_ARGS_DEPTH} levels deep"
KEY_LIMIT = rf"unique_key is \d+ bytes long in UTF-8; the limit is {MAX_UNIQUE_KEY_BYTES} bytes"
TIMEOUT_LIMIT = rf"timeout must be a positive number of seconds up to {MAX_TIMEOUT_SECONDS}"
RUN_AT_RANGE = r"run_at must fall within years 1 to 9999 in UTC"
DELAY_LIMIT = r"delay is too long: the job would run after 9999-12-30 UTC"

HOSTILE: list[Hostile] = [
    # args PostgreSQL or Python's JSON could not take, or could not give back
    Hostile("args-10000-nested-objects", lambda: ({"x": nested_objects(10_000)}, {}), DEEP),
    Hostile("args-10000-nested-lists", lambda: ({"x": nested_lists(10_000)}, {}), DEEP),
    Hostile("args-deep-inside-a-list", lambda: ({"x": [1, 2, {"y": nested_lists(500)}]}, {}), DEEP),
    Hostile("args-one-level-too-deep", lambda: ({"x": nested_lists(MAX_ARGS_DEPTH)}, {}), DEEP),
    Hostile("args-deep-tuples", lambda: ({"x": nested_tuples(200)}, {}), DEEP),
    Hostile("args-int-5000-digits", lambda: ({"x": [10**5000]}, {}), r"Exceeds the limit \(4300 digits\)"),
    Hostile(
        "args-20-mb",
        lambda: ({"blob": "x" * (20 << 20)}, {}),
        r"job args are 20\.0 MB as JSON, more than the 16 MB a stored value may take",
    ),
    Hostile("args-int-key-5000-digits", lambda: ({10**5000: 1}, {}), r"keys must be strings, got <int>"),
    # unique keys beyond the index's reach, or not encodable at all
    Hostile("unique-key-3000-chars", lambda: ({}, {"unique_key": "k" * 3000}), KEY_LIMIT),
    Hostile("unique-key-1002-utf8-bytes", lambda: ({}, {"unique_key": "é" * 501}), KEY_LIMIT),
    Hostile("unique-key-10-mb", lambda: ({}, {"unique_key": "k" * 10_000_000}), KEY_LIMIT),
    Hostile("unique-key-lone-surrogate", lambda: ({}, {"unique_key": "a\ud800"}), r"unique_key is not valid"),
    # run times outside what both timestamptz and datetime hold
    Hostile("delay-10-pow-400", lambda: ({}, {"delay": 10**400}), DELAY_LIMIT),
    Hostile("delay-float-max", lambda: ({}, {"delay": 1.7e308}), DELAY_LIMIT),
    Hostile("delay-past-year-9999", lambda: ({}, {"delay": timedelta(days=3_000_000)}), DELAY_LIMIT),
    Hostile(
        "run-at-9999-new-york",
        lambda: ({}, {"run_at": datetime(9999, 12, 31, 23, 0, tzinfo=NEW_YORK)}),
        RUN_AT_RANGE,
    ),
    Hostile(
        "run-at-before-year-1-utc",
        lambda: ({}, {"run_at": datetime(1, 1, 1, 5, 0, tzinfo=timezone(timedelta(hours=14)))}),
        RUN_AT_RANGE,
    ),
    # numbers that overflow a float or mean nothing
    Hostile("timeout-10-pow-400", lambda: ({}, {"timeout": 10**400}), TIMEOUT_LIMIT),
    Hostile("timeout-inf", lambda: ({}, {"timeout": math.inf}), TIMEOUT_LIMIT),
    Hostile("timeout-over-a-year", lambda: ({}, {"timeout": MAX_TIMEOUT_SECONDS + 1}), TIMEOUT_LIMIT),
    Hostile(
        "max-attempts-10-pow-400",
        lambda: ({}, {"max_attempts": 10**400}),
        r"max_attempts must be an integer from 1 to 1000000",
    ),
    Hostile(
        "max-attempts-over-limit",
        lambda: ({}, {"max_attempts": 1_000_001}),
        r"max_attempts must be an integer from 1 to 1000000, got 1000001",
    ),
    Hostile(
        "priority-5000-digits",
        lambda: ({}, {"priority": 10**5000}),
        r"priority must be an integer from 1 to 10, got <int>",
    ),
    # names far past their length limits (never cached, never matched character by character)
    Hostile(
        "queue-name-1-mb",
        lambda: ({}, {"queue": "q" * 1_000_000}),
        r"queue name is 1000000 characters long; the limit is 63",
    ),
    Hostile(
        "task-name-1-mb",
        lambda: ({}, {}),
        r"task name is 1000000 characters long; the limit is 200",
        task="t" * 1_000_000,
        via_task=False,
    ),
]


@contextmanager
def refused(message: str) -> Iterator[None]:
    """The block raises InvalidJobError matching ``message``, within the time bound."""
    started = time.perf_counter()
    with pytest.raises(InvalidJobError, match=message):
        yield
    elapsed = time.perf_counter() - started
    assert elapsed < REFUSAL_SECONDS, f"refusal took {elapsed:.2f}s"


def written(count: Callable[..., int]) -> int:
    return count("jobs") + count("dead_letter")


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_enqueue_is_refused_by_name(queue: Queue, count: Callable[..., int], case: Hostile) -> None:
    args, options = case.make()
    with refused(case.message):
        queue.enqueue(case.task, args, **options)
    with refused(rf"job #1: .*{case.message}"):
        queue.enqueue_many([JobSpec("fine"), JobSpec(case.task, args, **options), JobSpec("fine")])
    # Deep in a batch, the job is checked while the COPY streams: refused all the same, by name.
    with refused(rf"job #{STREAMED}: .*{case.message}"):
        queue.enqueue_many([JobSpec("fine")] * STREAMED + [JobSpec(case.task, args, **options)] * 2)
    if set(options) <= {"unique_key"} and case.task == "t":
        # Bulk enqueue checks an option set once, then only each job's args and key: the job
        # that repeats the options of earlier ones must be refused all the same.
        with refused(rf"job #2: .*{case.message}"):
            queue.enqueue_many(
                [{"task": "t"}, {"task": "t", "args": {"i": 1}}, {"task": "t", "args": args, **options}]
            )
    if case.via_task:

        @queue.task(name="anything")
        def anything(**kwargs: Any) -> None: ...

        if all(isinstance(key, str) for key in args):
            with refused(case.message):
                anything.with_options(**options).enqueue(**args)
    assert written(count) == 0


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
async def test_hostile_async_enqueue_is_refused_by_name(
    async_queue: AsyncQueue, count: Callable[..., int], case: Hostile
) -> None:
    args, options = case.make()
    with refused(case.message):
        await async_queue.enqueue(case.task, args, **options)
    with refused(rf"job #1: .*{case.message}"):
        await async_queue.enqueue_many([JobSpec("fine"), JobSpec(case.task, args, **options)])
    with refused(rf"job #{STREAMED}: .*{case.message}"):
        await async_queue.enqueue_many([JobSpec("fine")] * STREAMED + [JobSpec(case.task, args, **options)])
    if case.via_task and all(isinstance(key, str) for key in args):

        @async_queue.task(name="anything")
        async def anything(**kwargs: Any) -> None: ...

        with refused(case.message):
            await anything.with_options(**options).enqueue(**args)
    assert written(count) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (JobSpec("t", scheduled_for=datetime(2030, 1, 1)), r"scheduled_for must be a timezone-aware"),
        (JobSpec("t", scheduled_for="2030-01-01"), r"scheduled_for must be a timezone-aware"),  # type: ignore[arg-type]
        (
            JobSpec("t", scheduled_for=datetime(9999, 12, 31, 22, tzinfo=NEW_YORK)),
            r"scheduled_for must fall within years 1 to 9999 in UTC",
        ),
        (JobSpec("t", run_at=datetime(9999, 12, 31, 20, tzinfo=NEW_YORK)), RUN_AT_RANGE),
    ],
    ids=["naive", "string", "year-10000-utc", "run-at-bulk"],
)
def test_bulk_only_fields_are_checked_too(
    queue: Queue, count: Callable[..., int], spec: JobSpec, message: str
) -> None:
    with refused(message):
        queue.enqueue_many([spec])
    assert written(count) == 0


def test_cli_enqueue_refuses_by_name(
    postgres_dsn: str, pgqueue_schema: str, count: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["enqueue", "--dsn", postgres_dsn, "--schema", pgqueue_schema, "t"]
    deep = "[" * 200 + "]" * 200
    for extra, message in (
        (["--unique-key", "k" * 3000], "unique_key is 3000 bytes long"),
        (["--args", f'{{"x": {deep}}}'], f"nested more than {MAX_ARGS_DEPTH} levels deep"),
        (["--delay", "1e400"], "delay must be a timedelta or a number of seconds"),
        (["--delay", "1e12"], "delay is too long"),
    ):
        started = time.perf_counter()
        assert cli_main([*base, *extra]) == 2
        assert time.perf_counter() - started < REFUSAL_SECONDS + 1  # the CLI also connects
        assert message in capsys.readouterr().err
    assert written(count) == 0


def test_values_at_the_limits_are_accepted_and_read_back(queue: Queue, db: psycopg.Connection[Any]) -> None:
    deepest = {"x": nested_lists(MAX_ARGS_DEPTH - 1)}
    assert queue.get_job(queue.enqueue("t", deepest)).args == deepest
    big = {"n": 10**400, "m": -(10**4299)}  # jsonb holds them and Python reads them back
    assert queue.get_job(queue.enqueue("t", big)).args == big

    key = "é" * (MAX_UNIQUE_KEY_BYTES // 2)  # exactly the limit in UTF-8
    first = queue.enqueue("t", unique_key=key, queue="q" * 63)
    assert queue.enqueue("t", unique_key=key, queue="q" * 63) == first  # the index still dedupes
    assert queue.enqueue_many([JobSpec("t", unique_key=key, queue="q" * 63)]) == [first]

    last = datetime(9999, 12, 31, 18, 59, tzinfo=NEW_YORK)  # 23:59 UTC, the last day there is
    assert queue.get_job(queue.enqueue("t", run_at=last)).run_at == last
    assert queue.get_job(queue.enqueue("t", run_at=EARLIEST)).run_at == EARLIEST

    job = queue.get_job(
        queue.enqueue("t" * 200, timeout=MAX_TIMEOUT_SECONDS, max_attempts=1_000_000, priority=10)
    )
    assert (job.timeout, job.max_attempts) == (float(MAX_TIMEOUT_SECONDS), 1_000_000)

    # The longest delay: resolved by the server's clock, it still gives a readable row.
    row = db.execute("SELECT now()").fetchone()
    assert row is not None
    longest = (LATEST_DELAYED_RUN_AT - row[0]).total_seconds() - 3600
    for job_id in [queue.enqueue("t", delay=longest), *queue.enqueue_many([JobSpec("t", delay=longest)])]:
        run_at = queue.get_job(job_id).run_at
        assert run_at is not None and run_at.year == 9999


# ------------------------------------------------------------------ rows Python cannot represent

OUT_OF_RANGE = {
    "run_at": "10000-01-01 00:00:00+00",
    "created_at": "-infinity",
    "started_at": "infinity",
    "finished_at": "294276-12-31 00:00:00+00",
    "scheduled_for": "4713-01-01 00:00:00+00 BC",
}
EXPECTED = {
    "run_at": LATEST,
    "created_at": EARLIEST,
    "started_at": LATEST,
    "finished_at": LATEST,
    "scheduled_for": EARLIEST,
}


def spoil(db: psycopg.Connection[Any], schema: str, table: str, job_id: int, values: dict[str, str]) -> None:
    """Write timestamps behind pgqueue's back, as an old version or a hand-written UPDATE could."""
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = {}::timestamptz").format(sql.Identifier(column), sql.Literal(value))
        for column, value in values.items()
    )
    db.execute(
        sql.SQL("UPDATE {}.{} SET {} WHERE id = {}").format(
            sql.Identifier(schema), sql.Identifier(table), assignments, sql.Literal(job_id)
        )
    )


def dead_job(db: psycopg.Connection[Any], schema: str) -> int:
    job_id = bury(db, schema)
    spoil(
        db,
        schema,
        "dead_letter",
        job_id,
        {"created_at": "-infinity", "started_at": "12000-06-01 00:00:00+00", "failed_at": "infinity"},
    )
    return job_id


def test_get_job_loads_out_of_range_timestamps(
    queue: Queue, db: psycopg.Connection[Any], postgres_dsn: str
) -> None:
    job_id = queue.enqueue("t")
    spoil(db, queue.schema, "jobs", job_id, OUT_OF_RANGE)
    dead_id = dead_job(db, queue.schema)

    job = queue.get_job(job_id)
    assert {name: getattr(job, name) for name in EXPECTED} == EXPECTED
    assert job.state is JobState.QUEUED and job.is_delayed
    dead = queue.get_job(dead_id)
    assert (dead.state, dead.created_at, dead.started_at, dead.finished_at) == (
        JobState.DEAD,
        EARLIEST,
        LATEST,
        LATEST,
    )

    # On the caller's own connection too, and that connection is left as psycopg made it.
    with psycopg.connect(postgres_dsn) as own:
        assert queue.get_job(job_id, conn=own).run_at == LATEST
        with pytest.raises(psycopg.DataError):
            own.execute("SELECT 'infinity'::timestamptz").fetchone()


async def test_async_get_job_loads_out_of_range_timestamps(
    async_queue: AsyncQueue, db: psycopg.Connection[Any], postgres_dsn: str
) -> None:
    job_id = await async_queue.enqueue("t")
    spoil(db, async_queue.schema, "jobs", job_id, OUT_OF_RANGE)
    dead_id = dead_job(db, async_queue.schema)

    job = await async_queue.get_job(job_id)
    assert {name: getattr(job, name) for name in EXPECTED} == EXPECTED
    assert (await async_queue.get_job(dead_id)).finished_at == LATEST

    async with await psycopg.AsyncConnection.connect(postgres_dsn) as own:
        assert (await async_queue.get_job(job_id, conn=own)).created_at == EARLIEST
        with pytest.raises(psycopg.DataError):
            await (await own.execute("SELECT '-infinity'::timestamptz")).fetchone()


def spoiled_admin_rows(db: psycopg.Connection[Any], schema: str) -> list[int]:
    """A queued, a completed, a running and a dead job, each with timestamps Python cannot hold."""
    queued = insert_job(db, schema)
    spoil(db, schema, "jobs", queued, {"run_at": "infinity", "created_at": "10000-01-01 00:00:00+00"})
    finished = insert_job(db, schema, state="completed", attempts=1, result={"ok": True})
    spoil(db, schema, "jobs", finished, {"started_at": "-infinity", "finished_at": "infinity"})
    running = insert_job(db, schema, state="running", attempts=1, worker_id="w1")
    spoil(
        db,
        schema,
        "jobs",
        running,
        {"started_at": "4713-01-01 00:00:00+00 BC", "lease_expires_at": "infinity"},
    )
    return [queued, finished, running, dead_job(db, schema)]


def answers(client: TestClient, path: str, **params: Any) -> Any:
    response = client.get(path, headers=AUTH, params=params)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"
    return response


def test_admin_job_lists_and_details_survive_out_of_range_timestamps(
    client: TestClient, pgqueue_queue: Queue, db: psycopg.Connection[Any]
) -> None:
    ids = spoiled_admin_rows(db, pgqueue_queue.schema)
    dead = ids[-1]
    assert {job["id"] for job in answers(client, "/api/jobs").json()["jobs"]} == set(ids)
    for state in ("queued", "completed", "running", "dead"):
        answers(client, "/api/jobs", state=state)
    assert {job["id"] for job in answers(client, "/api/dead").json()["jobs"]} == {dead}
    for job_id in ids:
        assert answers(client, f"/api/jobs/{job_id}").json()["id"] == job_id
    answers(client, f"/api/dead/{dead}")
    # The server-rendered pages read through the same pooled connections.
    answers(client, "/jobs")
    answers(client, "/jobs", state="dead")
    for job_id in ids:
        answers(client, f"/jobs/{job_id}")


def test_admin_queue_stats_survive_out_of_range_timestamps(
    client: TestClient, pgqueue_queue: Queue, db: psycopg.Connection[Any]
) -> None:
    spoiled_admin_rows(db, pgqueue_queue.schema)
    answers(client, "/api/queues")
    answers(client, "/api/queues/email")
    answers(client, "/")
