"""Reading and writing the ``schedules`` table, shared by every scheduler process and the CLI."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from pgqueue.errors import PgQueueError
from pgqueue.jobs import dump_args
from pgqueue.schedules import Schedule

if TYPE_CHECKING:
    from pgqueue.queue import Queue


class ScheduleNotFoundError(PgQueueError, LookupError):
    """No schedule has that name."""


def schedule_params(schedule: Schedule, from_code: bool) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "task": schedule.task,
        "args": dump_args(schedule.args),
        "queue": schedule.queue,
        "priority": schedule.priority,
        "max_attempts": schedule.max_attempts,
        "cron": schedule.cron,
        "every_seconds": schedule.every.total_seconds() if schedule.every else None,
        "timezone": schedule.timezone,
        "paused": schedule.paused,
        "misfire_policy": schedule.misfire,
        "misfire_grace_seconds": schedule.misfire_grace.total_seconds(),
        "from_code": from_code,
        "next_fire_at": None if schedule.paused else schedule.next_fire_time(),
    }


def schedule_from_row(row: tuple[Any, ...]) -> Schedule:
    (
        name,
        task,
        args,
        cron,
        every_seconds,
        zone,
        queue,
        priority,
        max_attempts,
        paused,
        misfire,
        grace,
        next_fire_at,
        last_fire_at,
        _updated_at,
    ) = row
    return Schedule(
        name=name,
        task=task,
        args=args,
        cron=cron,
        every=timedelta(seconds=every_seconds) if every_seconds is not None else None,
        timezone=zone,
        queue=queue,
        priority=priority,
        max_attempts=max_attempts,
        paused=paused,
        misfire=misfire,
        misfire_grace=timedelta(seconds=grace),
        next_fire_at=next_fire_at,
        last_fire_at=last_fire_at,
    )


class ScheduleStore:
    """The schedules table through one queue's connection pool.

    Reads and the declared-schedules sync (one transaction of its own) run again on a fresh
    connection when the first is lost midway; single writes do not (they may have taken effect).
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.queries = queue.queries

    def sync_declared(self, schedules: Iterable[Schedule]) -> None:
        """Store the schedules declared in code; forget code schedules no longer declared."""
        schedules = list(schedules)

        def store(conn: psycopg.Connection[Any]) -> None:
            for schedule in schedules:
                conn.execute(self.queries.upsert_schedule, schedule_params(schedule, from_code=True))
            conn.execute(self.queries.delete_stale_code_schedules, {"names": [s.name for s in schedules]})

        self.queue._run(None, store, "transaction")

    def upsert(self, schedule: Schedule) -> bool:
        """Add or replace a run-time schedule; True when it is new."""
        params = schedule_params(schedule, from_code=False)
        row = self.queue._run(
            None, lambda c: c.execute(self.queries.upsert_schedule, params).fetchone(), "never"
        )
        return bool(row and row[0])

    def list(self) -> list[Schedule]:
        rows = self.queue._run(None, lambda c: c.execute(self.queries.list_schedules).fetchall(), "read")
        return [schedule_from_row(row) for row in rows]

    def get(self, name: str) -> Schedule:
        for schedule in self.list():
            if schedule.name == name:
                return schedule
        raise ScheduleNotFoundError(f"no schedule named {name!r}")

    def set_paused(self, name: str, paused: bool) -> None:
        self._change(self.queries.set_schedule_paused, {"name": name, "paused": paused})

    def delete(self, name: str) -> None:
        self._change(self.queries.delete_schedule, {"name": name})

    def set_next_fire(self, name: str, next_fire_at: datetime | None) -> None:
        params = {"name": name, "next_fire_at": next_fire_at}
        self.queue._run(None, lambda c: c.execute(self.queries.set_next_fire, params), "never")

    def _change(self, query: str, params: dict[str, Any]) -> None:
        if self.queue._run(None, lambda c: c.execute(query, params).fetchone(), "never") is None:
            raise ScheduleNotFoundError(f"no schedule named {params['name']!r}")
