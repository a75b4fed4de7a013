"""How a :class:`~pgqueue.Schedule` is stored: its ``schedules`` row, both ways."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgqueue._jobs import dump_args
from pgqueue._rows import ScheduleRow
from pgqueue._schedules import Schedule


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


def schedule_from_row(row: ScheduleRow) -> Schedule:
    return Schedule(
        name=row.name,
        task=row.task,
        args=row.args,
        cron=row.cron,
        every=timedelta(seconds=row.every_seconds) if row.every_seconds is not None else None,
        timezone=row.timezone,
        queue=row.queue,
        priority=row.priority,
        max_attempts=row.max_attempts,
        paused=row.paused,
        misfire=row.misfire_policy,
        misfire_grace=timedelta(seconds=row.misfire_grace_seconds),
        next_fire_at=row.next_fire_at,
        last_fire_at=row.last_fire_at,
    )
