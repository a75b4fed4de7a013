"""Fixtures and seed data shared by the admin tests (imported by the test_admin_* modules).

The seed puts rows in every state the admin shows, written the way the worker writes them
(errors with attempt/at/type/message/traceback), so counts and views are checked exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pgqueue import Queue
from pgqueue.admin import AdminAuth, AdminOptions, AlertSettings, create_admin_app

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

TRACEBACK = 'Traceback (most recent call last):\n  File "jobs.py", line 3\nValueError: smtp down'


def error(attempt: int, message: str = "smtp down", *, at: str = "now") -> dict[str, Any]:
    return {
        "attempt": attempt,
        "at": at,
        "type": "ValueError",
        "message": message,
        "traceback": TRACEBACK,
    }


def _errors_json(conn: psycopg.Connection[Any], entries: list[dict[str, Any]]) -> str:
    """Stamp "now" entries with the database's clock, as the worker stamps its own."""
    row = conn.execute("SELECT to_json(now())::text").fetchone()
    assert row is not None
    now = json.loads(row[0])
    return json.dumps([{**e, "at": now if e["at"] == "now" else e["at"]} for e in entries])


def insert_job(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    queue: str = "email",
    task: str = "send_email",
    state: str = "queued",
    args: Any = None,
    run_in: float = 0.0,
    attempts: int = 0,
    errors: list[dict[str, Any]] | None = None,
    result: Any = None,
    worker_id: str | None = None,
    ran_for: float = 0.25,
    finished_ago: float = 1.0,
    unique_key: str | None = None,
) -> int:
    """One job in any state, with consistent timestamps: a row of ``jobs`` while it is live, of
    ``finished_jobs`` (with an id from the jobs' sequence, as a real finish keeps) once done."""
    finished = state in ("completed", "cancelled")
    started = finished or state == "running"
    columns = (
        "queue, task, args, priority, state, run_at, attempts, max_attempts, errors, created_at,"
        " result, worker_id, started_at, finished_at, unique_key"
    )
    values = f"""%(queue)s, %(task)s, %(args)s::jsonb, 5, %(state)s::text::"{schema}".job_state,
        now() + make_interval(secs => %(run_in)s), %(attempts)s, 3, %(errors)s::jsonb, now(),
        %(result)s::jsonb, %(worker)s,
        CASE WHEN %(started)s THEN now() - make_interval(secs => %(ago)s + %(ran)s) END,
        CASE WHEN %(finished)s THEN now() - make_interval(secs => %(ago)s) END, %(unique_key)s"""
    if finished:
        table = "finished_jobs"
        columns = f"id, {columns}"
        values = f"""nextval(pg_get_serial_sequence('"{schema}".jobs', 'id')), {values}"""
    else:
        table = "jobs"
        columns = f"{columns}, lease_expires_at"
        values = f"{values}, CASE WHEN %(state)s::text = 'running' THEN now() + interval '30 seconds' END"
    row = conn.execute(
        f'INSERT INTO "{schema}".{table} ({columns}) VALUES ({values}) RETURNING id',
        {
            "queue": queue,
            "task": task,
            "args": json.dumps(args or {}),
            "state": state,
            "run_in": run_in,
            "attempts": attempts,
            "errors": _errors_json(conn, errors or []),
            "result": None if result is None else json.dumps(result),
            "worker": worker_id,
            "started": started,
            "finished": finished,
            "ago": finished_ago if finished else 0.0,
            "ran": ran_for,
            "unique_key": unique_key,
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def bury(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    queue: str = "email",
    task: str = "send_email",
    args: Any = None,
    attempts: int = 3,
    unique_key: str | None = None,
) -> int:
    """A dead-lettered job, as the worker leaves it after the last failed attempt."""
    row = conn.execute(
        f"""INSERT INTO "{schema}".dead_letter (id, queue, task, args, priority, attempts,
                max_attempts, unique_key, errors, created_at, started_at, failed_at)
            VALUES (nextval(pg_get_serial_sequence('"{schema}".jobs', 'id')), %s, %s, %s::jsonb,
                    5, %s, %s, %s, %s::jsonb, now() - interval '1 hour',
                    now() - interval '1 minute', now())
            RETURNING id""",
        [
            queue,
            task,
            json.dumps(args or {}),
            attempts,
            attempts,
            unique_key,
            _errors_json(conn, [error(i + 1) for i in range(attempts)]),
        ],
    ).fetchone()
    assert row is not None
    return int(row[0])


def seed(queue: Queue) -> dict[str, int]:
    """Every state on queue "email", a little on "reports", two workers, two schedules."""
    s = queue.schema
    ids: dict[str, int] = {}
    with queue.connection() as c:
        ids["queued"] = insert_job(c, s, args={"to": "a@b.c", "password": "hunter2"})
        ids["queued2"] = insert_job(c, s, args={"to": "d@e.f"})
        ids["delayed"] = insert_job(c, s, run_in=3600)
        ids["retrying"] = insert_job(c, s, run_in=600, attempts=1, errors=[error(1)])
        ids["running"] = insert_job(c, s, state="running", attempts=1, worker_id="w1")
        for n in range(3):
            ids[f"completed{n}"] = insert_job(
                c,
                s,
                state="completed",
                attempts=1,
                result={"ok": True, "token": "abc"},
                ran_for=0.1 * (n + 1),
            )
        ids["cancelled"] = insert_job(c, s, state="cancelled")
        ids["dead"] = bury(c, s, args={"to": "x@y.z", "api_key": "k-123"})
        ids["reports_completed"] = insert_job(
            c, s, queue="reports", task="build_report", state="completed", attempts=1, result=42
        )
        ids["reports_dead"] = bury(c, s, queue="reports", task="build_report")
        c.execute(
            f"""INSERT INTO "{s}".workers (id, host, pid, queues, concurrency, heartbeat_at)
                VALUES ('w1', 'host-a', 101, '{{email}}', 8, now()),
                       ('w2', 'host-b', 202, '{{reports}}', 2, now() - interval '10 minutes')"""
        )
        c.execute(
            f"""INSERT INTO "{s}".schedules (name, task, args, queue, cron, every_seconds,
                    next_fire_at, last_fire_at)
                VALUES ('nightly-report', 'build_report', '{{"secret": "s3"}}', 'reports',
                        '0 3 * * *', NULL, now() + interval '5 hours', now() - interval '19 hours'),
                       ('tick', 'send_email', '{{}}', NULL, NULL, 60,
                        now() + interval '1 minute', now())"""
        )
    return ids


def admin_app(queue: Queue, **kwargs: Any) -> FastAPI:
    kwargs.setdefault("auth", AdminAuth(token=TOKEN))
    kwargs.setdefault("alerts", AlertSettings())
    kwargs.setdefault("options", AdminOptions(metrics_lag_seconds=0))
    return create_admin_app(queue, **kwargs)


@pytest.fixture
def app(pgqueue_queue: Queue) -> FastAPI:
    return admin_app(pgqueue_queue)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://admin.test") as c:
        yield c


@pytest.fixture
def seeded(pgqueue_queue: Queue) -> dict[str, int]:
    return seed(pgqueue_queue)
