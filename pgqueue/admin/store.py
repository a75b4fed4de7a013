"""Read the queue tables into the admin's response models. No HTTP here, no writes.

Each function takes an open connection and the schema's named queries, so the API routes, the
dashboard, the health checks and the metrics collector all read through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgqueue.admin.redaction import Redactor, redact_strings, redact_value
from pgqueue.admin.schemas import (
    AttemptError,
    JobDetail,
    JobPage,
    JobSummary,
    QueueList,
    QueueStats,
    ScheduleList,
    ScheduleOut,
    StateCounts,
    StateFilter,
    WorkerList,
    WorkerOut,
)
from pgqueue.admin.settings import AdminOptions
from pgqueue.sql import Queries

Conn = psycopg.Connection[Any]
_COUNT_FIELDS = ("queued", "delayed", "retrying", "running", "completed", "cancelled", "dead")


def _rows(conn: Conn, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def queue_rows(conn: Conn, queries: Queries) -> list[dict[str, Any]]:
    """Counts, oldest waiting age and settings per queue (one scan of jobs)."""
    return _rows(conn, queries.admin_queue_counts)


def queue_stats(conn: Conn, queries: Queries, options: AdminOptions) -> QueueList:
    rows = queue_rows(conn, queries)
    names = [r["name"] for r in rows]
    minutes = options.throughput_minutes
    runs = {
        r["name"]: r
        for r in _rows(
            conn, queries.admin_queue_runs, {"queues": names, "window": options.run_window_seconds}
        )
    }
    series: dict[str, list[int]] = {name: [0] * minutes for name in names}
    for r in _rows(conn, queries.admin_throughput, {"queues": names, "minutes": minutes}):
        ago = int(r["ago"])
        if 0 <= ago < minutes:
            series[r["name"]][minutes - 1 - ago] = int(r["count"])
    stats = []
    for r in rows:
        run = runs.get(r["name"], {})
        stats.append(
            QueueStats(
                name=r["name"],
                counts=StateCounts(**{f: int(r[f]) for f in _COUNT_FIELDS}),
                paused=r["paused"],
                concurrency=r["concurrency"],
                rate_limit=r["rate_limit"],
                throughput=series[r["name"]],
                completed_recently=int(run.get("count") or 0),
                avg_run_seconds=run.get("avg"),
                p95_run_seconds=run.get("p95"),
                oldest_waiting_seconds=r["oldest_waiting"],
            )
        )
    return QueueList(queues=stats, throughput_minutes=minutes, run_window_seconds=options.run_window_seconds)


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What the job list may be narrowed to; every field optional."""

    queue: str | None = None
    state: StateFilter | None = None
    task: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def list_jobs(
    conn: Conn,
    queries: Queries,
    where: JobFilter,
    *,
    before_id: int | None,
    limit: int,
    redact: Redactor,
) -> JobPage:
    """One page, newest first; ``next_cursor`` is the id to pass as ``before_id`` next.

    Each row's last error message goes through ``redact``: messages repeat what failed, DSNs
    and tokens included."""
    params = {
        "queue": where.queue,
        "state": where.state,
        "task": where.task,
        "created_after": where.created_after,
        "created_before": where.created_before,
        "before_id": before_id,
        "limit": limit + 1,
        "live": where.state != "dead",
        "dead": where.state in (None, "dead"),
    }
    rows = _rows(conn, queries.admin_list_jobs, params)
    errors = redact_strings(redact, [r["last_error"] for r in rows[:limit]])
    jobs = [JobSummary(**{**r, "last_error": e}) for r, e in zip(rows[:limit], errors, strict=True)]
    return JobPage(jobs=jobs, next_cursor=jobs[-1].id if len(rows) > limit else None)


def _attempt_errors(errors: Any) -> list[AttemptError]:
    """Errors as the worker wrote them; anything else a hand-edited row holds is kept as text."""
    out = []
    for entry in errors if isinstance(errors, list) else []:
        if not isinstance(entry, dict):
            out.append(AttemptError(message=str(entry)))
            continue
        attempt = entry.get("attempt")
        out.append(
            AttemptError(
                attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
                **{
                    k: None if entry.get(k) is None else str(entry[k])
                    for k in ("at", "type", "message", "traceback")
                },
            )
        )
    return out


def get_job(conn: Conn, queries: Queries, job_id: int, redact: Redactor) -> JobDetail | None:
    """A live or dead-lettered job with everything that can carry a secret — arguments,
    result, progress, every error's message and traceback, the unique key — passed through
    ``redact``."""
    rows = _rows(conn, queries.admin_get_job, {"id": job_id})
    if not rows:
        return None
    row = rows[0]
    errors = _attempt_errors(redact_value(redact, row["errors"]))
    redacted = ("args", "result", "progress", "errors", "unique_key")
    return JobDetail(
        **{k: v for k, v in row.items() if k not in redacted},
        last_error=errors[-1].message if errors else None,
        args=redact_value(redact, row["args"]) if isinstance(row["args"], dict) else {},
        result=redact_value(redact, row["result"]),
        progress=redact_value(redact, row["progress"]),
        errors=errors,
        unique_key=redact_strings(redact, [row["unique_key"]])[0],
    )


def workers(conn: Conn, queries: Queries, stale_seconds: float) -> WorkerList:
    out = []
    for r in _rows(conn, queries.admin_workers):
        age = float(r["heartbeat_age"])
        out.append(
            WorkerOut(
                id=r["id"],
                host=r["host"],
                pid=r["pid"],
                queues=list(r["queues"]),
                concurrency=r["concurrency"],
                started_at=r["started_at"],
                heartbeat_at=r["heartbeat_at"],
                heartbeat_age_seconds=age,
                alive=age < stale_seconds,
                running_jobs=int(r["running"]),
                job_ids=list(r["job_ids"]),
            )
        )
    return WorkerList(workers=out)


def schedule_from_row(row: dict[str, Any], redact: Redactor) -> ScheduleOut:
    args = row["args"] if isinstance(row["args"], dict) else {}
    return ScheduleOut(**{**row, "args": redact_value(redact, args)})


def schedules(conn: Conn, queries: Queries, redact: Redactor) -> ScheduleList:
    return ScheduleList(
        schedules=[schedule_from_row(r, redact) for r in _rows(conn, queries.admin_schedules)]
    )
