"""Every read the admin makes, in one place: the API routes, the dashboard, the health checks,
the alert loop and the metrics collector all go through :class:`ReadModel`.

It owns the SQL those reads run: the admin's own statements (``admin.sql``) and the shared
ones the client reads with (``queue_overview``, ``get_job``, ``list_schedules``,
``schema_version``), so a count or a job looks the same in the admin as through
:class:`pgqueue.Queue`. Rows become the dataclasses below by column name
(:func:`pgqueue._rows.dataclass_row`), then the response models of :mod:`pgqueue.admin.schemas`.
No HTTP here, and no writes (those are :mod:`pgqueue.admin.actions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

import psycopg

from pgqueue._jobs import JobRow
from pgqueue._rows import QueueOverview, ScheduleRow, dataclass_row
from pgqueue._sql import Queries
from pgqueue.admin.checks import AlertRule, Snapshot, failure_windows
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

Conn = psycopg.Connection[Any]
T = TypeVar("T")


# ---------------------------------------------------------------- rows of admin.sql


@dataclass(frozen=True, slots=True)
class QueueRuns:
    """``admin_queue_runs``: a queue's completions within the run-time window."""

    name: str
    count: int
    avg: float | None
    p95: float | None


@dataclass(frozen=True, slots=True)
class Throughput:
    """``admin_throughput``: completions of one queue in the minute ``ago`` minutes back."""

    name: str
    ago: int
    count: int


@dataclass(frozen=True, slots=True)
class WorkerSeen:
    """``admin_worker_seen``: seconds since a worker serving the queue sent a heartbeat."""

    name: str
    age: float


@dataclass(frozen=True, slots=True)
class Failures:
    """``admin_failures``: failed attempts of one queue within the window."""

    queue: str
    failures: int


@dataclass(frozen=True, slots=True)
class Finished:
    """``admin_finished_between``: jobs of one queue and outcome in one run-time bucket."""

    name: str
    outcome: str
    bucket: int
    count: int
    seconds: float | None


@dataclass(frozen=True, slots=True)
class DeadCount:
    """``admin_dead_between``: jobs of one queue dead-lettered within the window."""

    queue: str
    count: int


@dataclass(frozen=True, slots=True)
class JobListRow:
    """``admin_list_jobs``: the fields of :class:`~pgqueue.admin.schemas.JobSummary`."""

    id: int
    queue: str
    task: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """``admin_workers``: a registered worker and the running jobs it holds."""

    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float
    running: int
    job_ids: list[int]


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What the job list may be narrowed to; every field optional."""

    queue: str | None = None
    state: StateFilter | None = None
    task: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


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


def schedule_out(row: ScheduleRow, redact: Redactor) -> ScheduleOut:
    args = row.args if isinstance(row.args, dict) else {}
    return ScheduleOut(
        name=row.name,
        task=row.task,
        args=redact_value(redact, args),
        queue=row.queue,
        cron=row.cron,
        every_seconds=row.every_seconds,
        timezone=row.timezone,
        paused=row.paused,
        next_fire_at=row.next_fire_at,
        last_fire_at=row.last_fire_at,
    )


def health_row(row: QueueOverview) -> dict[str, Any]:
    """A queue's row as the health checks judge it (:class:`~pgqueue.admin.checks.Snapshot`)."""
    return {f.name: getattr(row, f.name) for f in fields(row)}


class ReadModel:
    """The admin's reads over one schema; each takes an open connection, so a route reads
    everything a page shows on one pooled connection."""

    def __init__(self, queries: Queries) -> None:
        self.q = queries

    def _rows(self, conn: Conn, cls: type[T], query: str, params: Mapping[str, Any] | None = None) -> list[T]:
        with conn.cursor(row_factory=dataclass_row(cls)) as cur:
            return cur.execute(query, params).fetchall()

    @staticmethod
    def _value(conn: Conn, query: str, params: Mapping[str, Any] | None = None) -> Any:
        """The one value of a one-column, one-row read (None without a row)."""
        row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    # ---------------------------------------------------------------- queues

    def queues(self, conn: Conn) -> list[QueueOverview]:
        """Counts, oldest waiting age and settings per queue (one scan of jobs)."""
        return self._rows(conn, QueueOverview, self.q.queue_overview)

    def queue_names(self, conn: Conn) -> list[str]:
        return [r.queue for r in self.queues(conn)]

    def queue_stats(self, conn: Conn, options: AdminOptions) -> QueueList:
        rows = self.queues(conn)
        names = [r.queue for r in rows]
        minutes = options.throughput_minutes
        window = options.run_window_seconds
        runs = {
            r.name: r
            for r in self._rows(conn, QueueRuns, self.q.admin_queue_runs, {"queues": names, "window": window})
        }
        series: dict[str, list[int]] = {name: [0] * minutes for name in names}
        for t in self._rows(conn, Throughput, self.q.admin_throughput, {"queues": names, "minutes": minutes}):
            if 0 <= t.ago < minutes:
                series[t.name][minutes - 1 - t.ago] = t.count
        stats = []
        for r in rows:
            run = runs.get(r.queue)
            stats.append(
                QueueStats(
                    name=r.queue,
                    counts=StateCounts(
                        queued=r.queued,
                        delayed=r.delayed,
                        retrying=r.retrying,
                        running=r.running,
                        completed=r.completed,
                        cancelled=r.cancelled,
                        dead=r.dead,
                    ),
                    paused=r.paused,
                    concurrency=r.concurrency,
                    rate_limit=r.rate_limit,
                    throughput=series[r.queue],
                    completed_recently=run.count if run else 0,
                    avg_run_seconds=run.avg if run else None,
                    p95_run_seconds=run.p95 if run else None,
                    oldest_waiting_seconds=r.oldest_waiting,
                )
            )
        return QueueList(queues=stats, throughput_minutes=minutes, run_window_seconds=window)

    # ---------------------------------------------------------------- jobs

    def list_jobs(
        self, conn: Conn, where: JobFilter, *, before_id: int | None, limit: int, redact: Redactor
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
            "live": where.state in (None, "queued", "delayed", "retrying", "running"),
            "finished": where.state in (None, "completed", "cancelled"),
            "dead": where.state in (None, "dead"),
        }
        rows = self._rows(conn, JobListRow, self.q.admin_list_jobs, params)
        page = rows[:limit]
        errors = redact_strings(redact, [r.last_error for r in page])
        jobs = [
            JobSummary(**{f.name: getattr(r, f.name) for f in fields(r)} | {"last_error": e})
            for r, e in zip(page, errors, strict=True)
        ]
        return JobPage(jobs=jobs, next_cursor=jobs[-1].id if len(rows) > limit else None)

    def job_row(self, conn: Conn, job_id: int) -> JobRow | None:
        """A live, finished or dead-lettered job as stored, nothing redacted: for deciding, not showing."""
        rows = self._rows(conn, JobRow, self.q.get_job, {"id": job_id})
        return rows[0] if rows else None

    def get_job(self, conn: Conn, job_id: int, redact: Redactor) -> JobDetail | None:
        """A live, finished or dead-lettered job with everything that can carry a secret — arguments,
        result, progress, every error's message and traceback, the unique key — passed through
        ``redact``."""
        row = self.job_row(conn, job_id)
        if row is None:
            return None
        errors = _attempt_errors(redact_value(redact, row.errors))
        return JobDetail(
            id=row.id,
            queue=row.queue,
            task=row.task,
            state="delayed" if row.delayed else row.state.value,
            priority=row.priority,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            run_at=row.run_at,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            worker_id=row.worker_id,
            last_error=errors[-1].message if errors else None,
            args=redact_value(redact, row.args) if isinstance(row.args, dict) else {},
            result=redact_value(redact, row.result),
            progress=redact_value(redact, row.progress),
            errors=errors,
            timeout=row.timeout,
            unique_key=redact_strings(redact, [row.unique_key])[0],
            scheduled_for=row.scheduled_for,
            lease_expires_at=row.lease_expires_at,
            cancel_requested=row.cancel_requested,
        )

    # ---------------------------------------------------------------- workers and schedules

    def workers(self, conn: Conn, stale_seconds: float) -> WorkerList:
        return WorkerList(
            workers=[
                WorkerOut(
                    id=r.id,
                    host=r.host,
                    pid=r.pid,
                    queues=list(r.queues),
                    concurrency=r.concurrency,
                    started_at=r.started_at,
                    heartbeat_at=r.heartbeat_at,
                    heartbeat_age_seconds=r.heartbeat_age,
                    alive=r.heartbeat_age < stale_seconds,
                    running_jobs=r.running,
                    job_ids=list(r.job_ids),
                )
                for r in self._rows(conn, WorkerRow, self.q.admin_workers)
            ]
        )

    def schedules(self, conn: Conn, redact: Redactor) -> ScheduleList:
        rows = self._rows(conn, ScheduleRow, self.q.list_schedules)
        return ScheduleList(schedules=[schedule_out(r, redact) for r in rows])

    def schedule(self, conn: Conn, name: str, redact: Redactor) -> ScheduleOut | None:
        """One schedule by name (there are few: the list is read and searched)."""
        for row in self._rows(conn, ScheduleRow, self.q.list_schedules):
            if row.name == name:
                return schedule_out(row, redact)
        return None

    # ---------------------------------------------------------------- health and metrics

    def schema_version(self, conn: Conn) -> str | None:
        """The migration the schema is at (raises UndefinedTable on an unmigrated schema)."""
        version = self._value(conn, self.q.schema_version)
        return None if version is None else str(version)

    def live_workers(self, conn: Conn, stale_seconds: float) -> int:
        return int(self._value(conn, self.q.admin_live_workers, {"stale": stale_seconds}) or 0)

    def abandoned_threads(self, conn: Conn, stale_seconds: float) -> int:
        """Summed over live workers (UndefinedColumn on a schema from before migration 0003)."""
        return int(self._value(conn, self.q.admin_abandoned_threads, {"stale": stale_seconds}) or 0)

    def failures(
        self,
        conn: Conn,
        *,
        window: float,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, int]:
        """Failed attempts per queue recorded within [since, until] (default: the last
        ``window`` seconds)."""
        params = {"window": window, "since": since, "until": until}
        return {r.queue: r.failures for r in self._rows(conn, Failures, self.q.admin_failures, params)}

    def worker_seen(self, conn: Conn) -> dict[str, float]:
        return {r.name: r.age for r in self._rows(conn, WorkerSeen, self.q.admin_worker_seen)}

    def snapshot(self, conn: Conn, rules: tuple[AlertRule, ...], stale_seconds: float) -> Snapshot:
        """What the alert rules are judged on (:func:`pgqueue.admin.checks.evaluate`)."""
        return Snapshot(
            queues={r.queue: health_row(r) for r in self.queues(conn)},
            failures={w: self.failures(conn, window=w) for w in failure_windows(rules)},
            worker_seen=self.worker_seen(conn),
            live_workers=self.live_workers(conn, stale_seconds),
        )

    def clock(self, conn: Conn, lag_seconds: float) -> datetime:
        """The database's clock less ``lag_seconds``: rows stamped before it have committed."""
        until: datetime = self._value(conn, self.q.admin_clock, {"lag": lag_seconds})
        return until

    def finished_between(
        self, conn: Conn, names: Sequence[str], since: datetime, until: datetime, bounds: Sequence[float]
    ) -> list[Finished]:
        params = {"queues": list(names), "bounds": list(bounds), "since": since, "until": until}
        return self._rows(conn, Finished, self.q.admin_finished_between, params)

    def dead_between(self, conn: Conn, since: datetime, until: datetime) -> list[DeadCount]:
        return self._rows(conn, DeadCount, self.q.admin_dead_between, {"since": since, "until": until})
