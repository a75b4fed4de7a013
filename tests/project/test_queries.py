"""The typed query layer: the ``.sql`` files, the names :class:`Queries` declares, the row
classes, and PostgreSQL agree with one another.

A misspelt statement name fails the type checker; these tests catch what it cannot: a statement
a file defines and nothing declares (or the reverse), a statement no code uses, SQL the server
refuses, and a result whose columns no longer match the class its rows become.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

import pgqueue
from pgqueue import Queue
from pgqueue._base import QueueSettings
from pgqueue._jobs import JobRow
from pgqueue._rows import QueueOverview, RowShapeError, ScheduleRow, dataclass_row, row_maker
from pgqueue._sql import DECLARED, Queries, packaged_statements, parse
from pgqueue.admin import readmodel
from pgqueue.worker.execution import ClaimedJob
from pgqueue.worker.lease_keeper import Renewed
from pgqueue.worker.rescuer import Expired, Rescued

PACKAGE = Path(pgqueue.__file__).parent

# ---------------------------------------------------------------- files and declarations


def test_the_files_define_exactly_the_declared_statements() -> None:
    assert set(packaged_statements()) == DECLARED
    queries = Queries("some_schema")
    for name in DECLARED:
        text = getattr(queries, name)
        assert isinstance(text, str) and text.strip() and "{schema}" not in text, name
    assert queries.schema == "some_schema" and queries.channel == "pgqueue_some_schema"


def test_a_statement_nothing_declares_is_refused() -> None:
    with pytest.raises(RuntimeError, match="not declared on Queries: cancel_evrything"):
        Queries("s", {**packaged_statements(), "cancel_evrything": "SELECT 1"})


def test_a_declared_statement_no_file_defines_is_refused() -> None:
    statements = {k: v for k, v in packaged_statements().items() if k != "enqueue"}
    with pytest.raises(RuntimeError, match=r"defined in no \.sql file: enqueue"):
        Queries("s", statements)


def test_parse_includes_fragments_and_refuses_duplicates_and_unknown_references() -> None:
    found = parse(
        {
            "a.sql": "-- name: one\nWITH x AS (\n    {part}\n)\nSELECT * FROM x\n-- a heading\n",
            "b.sql": "-- fragment: part\n-- what it is\nSELECT 1\nUNION ALL SELECT 2\n",
        }
    )
    assert found == {"one": "WITH x AS (\n    SELECT 1\n    UNION ALL SELECT 2\n)\nSELECT * FROM x"}
    with pytest.raises(RuntimeError, match="defined twice"):
        parse({"a.sql": "-- name: one\nSELECT 1", "b.sql": "-- name: one\nSELECT 2"})
    with pytest.raises(RuntimeError, match="names no fragment"):
        parse({"a.sql": "-- name: one\nSELECT {nothing}"})
    # A regular expression's quantifier is not a reference.
    assert parse({"a.sql": "-- name: one\nSELECT 'x' ~ '^\\d{4}$'"}) == {"one": "SELECT 'x' ~ '^\\d{4}$'"}


def test_every_statement_is_used_by_the_code() -> None:
    """A statement no module names is dead SQL (and a transitional name nobody uses any more is
    due for removal)."""
    code = "\n".join(
        p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if PACKAGE / "_sql" not in p.parents
    )
    used = set(re.findall(r"(?:queries|\bq)\.(\w+)", code))  # queue.queries.x, self._queries.x, q.x
    assert sorted(DECLARED - used) == []


# ---------------------------------------------------------------- statements and the server


def _as_prepared(query: str) -> str:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)[sb]", number, query)


def _columns(conn: psycopg.Connection[Any], query: str) -> list[str]:
    """The result columns of ``query`` as the server plans it (prepared, never run)."""
    pgconn = conn.pgconn
    prepared = pgconn.prepare(b"", _as_prepared(query).encode())
    assert prepared.status == pq.ExecStatus.COMMAND_OK, prepared.get_error_message()
    described = pgconn.describe_prepared(b"")
    assert described.status == pq.ExecStatus.COMMAND_OK, described.get_error_message()
    return [(described.fname(i) or b"").decode() for i in range(described.nfields)]


def test_every_statement_is_accepted_by_postgresql(queue: Queue) -> None:
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        for name in sorted(DECLARED):
            query = getattr(queue.queries, name)
            if query.lstrip().upper().startswith("COPY"):
                continue  # COPY is not preparable; the bulk enqueue tests run it
            try:
                _columns(conn, query)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None


ROW_CLASSES: list[tuple[str, type[Any], dict[str, Any]]] = [
    ("claim", ClaimedJob, {"token": None}),
    ("claim_limited", ClaimedJob, {"token": None}),
    ("queue_settings", QueueSettings, {}),
    ("set_queue", QueueSettings, {}),
    ("heartbeat", Renewed, {}),
    ("expired_leases", Expired, {}),
    ("rescue_expired", Rescued, {}),
    ("get_job", JobRow, {}),
    ("queue_overview", QueueOverview, {}),
    ("list_schedules", ScheduleRow, {}),
    ("admin_queue_runs", readmodel.QueueRuns, {}),
    ("admin_throughput", readmodel.Throughput, {}),
    ("admin_worker_seen", readmodel.WorkerSeen, {}),
    ("admin_failures", readmodel.Failures, {}),
    ("admin_finished_between", readmodel.Finished, {}),
    ("admin_dead_between", readmodel.DeadCount, {}),
    ("admin_list_jobs", readmodel.JobListRow, {}),
    ("admin_workers", readmodel.WorkerRow, {}),
]


@pytest.mark.parametrize(("name", "cls", "constants"), ROW_CLASSES, ids=[r[0] for r in ROW_CLASSES])
def test_result_columns_match_the_row_class(
    queue: Queue, name: str, cls: type[Any], constants: dict[str, Any]
) -> None:
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        columns = _columns(conn, getattr(queue.queries, name))
    row_maker(cls, columns, constants)  # raises RowShapeError on any difference
    # In field order too, so each row is a positional call (the claim path's cost).
    fields = [f for f in cls.__dataclass_fields__ if f not in constants]
    assert columns == fields[: len(columns)], name


# ---------------------------------------------------------------- the row factory


@dataclass(frozen=True, slots=True)
class Pair:
    left: int
    right: str
    note: str | None = None


def test_rows_are_matched_by_name_in_any_order(db: psycopg.Connection[Any]) -> None:
    with db.cursor(row_factory=dataclass_row(Pair)) as cur:
        assert cur.execute("SELECT 'b' AS right, 1 AS left").fetchall() == [Pair(1, "b")]
        assert cur.execute("SELECT 2 AS left, 'c' AS right, 'n' AS note").fetchone() == Pair(2, "c", "n")
    with db.cursor(row_factory=dataclass_row(Pair, right="fixed")) as cur:
        assert cur.execute("SELECT 3 AS left").fetchone() == Pair(3, "fixed")
    with db.cursor(row_factory=dataclass_row(Pair)) as cur:
        cur.execute("SET application_name = 'rows'")  # no result: nothing to match


def test_columns_and_fields_that_differ_are_named(db: psycopg.Connection[Any]) -> None:
    with (
        db.cursor(row_factory=dataclass_row(Pair)) as cur,
        pytest.raises(RowShapeError, match=r"no such field: lft; no column for: left") as raised,
    ):
        cur.execute("SELECT 1 AS lft, 'x' AS right")
    assert "(lft, right)" in str(raised.value) and "Pair (left, right, note)" in str(raised.value)
    with pytest.raises(RowShapeError, match="given twice: left"):
        row_maker(Pair, ["left", "left", "right"], {})
