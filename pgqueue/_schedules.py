"""Recurring schedules: their definition, validation and fire-time triggers.

Triggers are APScheduler 3 triggers with two corrections a cron user expects:

* numeric days of the week follow cron (0 and 7 are Sunday), not APScheduler's Monday-first
  numbering, so ``0 8 * * 1-5`` means Monday to Friday;
* a job pinned to an hour that a daylight-saving change repeats runs once, not twice (the
  second 02:30 on the autumn night is skipped); an hour that a change skips still runs once,
  at the same instant an hour later on the wall clock. Expressions that run every hour
  (``*`` in the hour field) keep running every real hour.

Interval schedules are anchored on a fixed instant, so every scheduler process computes the same
fire times: that is what lets the database keep exactly one enqueue per fire time.

APScheduler is the ``scheduler`` extra and is imported only when a trigger is first built: a
producer or a worker that declares no schedule neither needs it installed nor pays for loading it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgqueue._jobs import dump_args
from pgqueue._naming import check_queue_name, check_task_name
from pgqueue.errors import ConfigurationError

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

MisfirePolicy = Literal["skip", "coalesce"]


class ScheduleOptions(TypedDict, total=False):
    """The optional fields of a :class:`Schedule`, as keyword arguments of the queue's methods."""

    cron: str | None
    every: timedelta | None
    timezone: str
    queue: str | None
    priority: int | None
    max_attempts: int | None
    paused: bool
    misfire: MisfirePolicy
    misfire_grace: timedelta


INTERVAL_ANCHOR = datetime(2000, 1, 1, tzinfo=UTC)
_SCHEDULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True, slots=True)
class Schedule:
    """One recurring job: a task with fixed args, fired by a cron expression or an interval."""

    name: str
    task: str
    args: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    paused: bool = False
    misfire: MisfirePolicy = "skip"
    misfire_grace: timedelta = timedelta(minutes=1)
    next_fire_at: datetime | None = None
    last_fire_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SCHEDULE_NAME.fullmatch(self.name):
            raise ConfigurationError(f"invalid schedule name {self.name!r}")
        try:
            check_task_name(self.task)
            if self.queue is not None:
                check_queue_name(self.queue)
            dump_args(self.args)
        except ValueError as exc:
            raise ConfigurationError(f"schedule {self.name!r}: {exc}") from exc
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(f"schedule {self.name!r}: give exactly one of cron= or every=")
        if self.every is not None and self.every.total_seconds() <= 0:
            raise ConfigurationError(f"schedule {self.name!r}: every= must be positive")
        if self.misfire not in ("skip", "coalesce"):
            raise ConfigurationError(f"schedule {self.name!r}: misfire is 'skip' or 'coalesce'")
        if self.misfire_grace.total_seconds() < 0:
            raise ConfigurationError(f"schedule {self.name!r}: misfire_grace must not be negative")
        self.trigger()  # a bad cron string or zone fails here, when the schedule is declared

    def zone(self) -> tzinfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(f"schedule {self.name!r}: unknown time zone {self.timezone!r}") from exc

    def trigger(self) -> BaseTrigger:
        """The APScheduler trigger that computes this schedule's fire times."""
        zone = self.zone()
        try:
            triggers = trigger_classes()
        except ConfigurationError as exc:
            raise ConfigurationError(f"schedule {self.name!r}: {exc}") from exc.__cause__
        if self.every is not None:
            trigger: BaseTrigger = triggers.interval(
                seconds=self.every.total_seconds(), start_date=INTERVAL_ANCHOR, timezone=zone
            )
            return trigger
        assert self.cron is not None
        try:
            return cron_trigger(self.cron, zone)
        except ValueError as exc:
            raise ConfigurationError(f"schedule {self.name!r}: invalid cron {self.cron!r}: {exc}") from exc

    def next_fire_time(self, after: datetime | None = None) -> datetime | None:
        now = after or datetime.now(UTC)
        fire: datetime | None = self.trigger().get_next_fire_time(None, now)
        return fire.astimezone(UTC) if fire is not None else None

    def last_fire_time(self, before: datetime) -> datetime | None:
        """The latest fire time at or before ``before`` (for catching up a missed fire)."""
        trigger = self.trigger()
        window = max(timedelta(days=1), (self.every or timedelta(0)) * 2)
        start = before - window
        latest: datetime | None = None
        fire = trigger.get_next_fire_time(None, start)
        while fire is not None and fire <= before:
            latest = fire
            fire = trigger.get_next_fire_time(fire, fire.astimezone(UTC) + timedelta(microseconds=1))
        return latest.astimezone(UTC) if latest is not None else None


def _cron_day_of_week(field_text: str) -> str:
    """Translate cron day-of-week numbers (0/7 = Sunday) into names APScheduler reads unambiguously."""
    parts = []
    for part in field_text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*" and not step_text:
            parts.append("*")
            continue
        if base == "*":
            first, last = 0, 6
        elif re.fullmatch(r"\d+-\d+", base):
            first, last = (int(x) for x in base.split("-"))
        elif base.isdigit():
            first = last = int(base)
            if step_text:
                last = 6
        else:
            parts.append(part)  # names (mon-fri, sat) already mean what cron means
            continue
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last and step >= 1):
            raise ValueError(f"day-of-week {part!r} is out of range 0-7")
        parts.extend(_DAY_NAMES[day % 7] for day in range(first, last + 1, step))
    return ",".join(dict.fromkeys(parts))


SCHEDULER_EXTRA_MISSING = (
    "schedules need APScheduler, which the scheduler extra installs: pip install 'pgqueue[scheduler]'"
)


class TriggerClasses(NamedTuple):
    """APScheduler's trigger classes, with the cron trigger corrected as the module doc says."""

    interval: Any
    cron: Any
    either: Any


@functools.cache
def trigger_classes() -> TriggerClasses:
    """Import APScheduler (once) and build the DST-safe cron trigger on top of it.

    The class is built here rather than at module level because its base class is APScheduler's:
    defining it at import time would make ``import pgqueue`` load, and require, the extra.
    """
    try:
        from apscheduler.triggers.combining import OrTrigger
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger
    except ImportError as exc:
        raise ConfigurationError(SCHEDULER_EXTRA_MISSING) from exc

    class DstSafeCronTrigger(CronTrigger):  # type: ignore[misc]
        """A cron trigger that does not fire twice when a daylight-saving change repeats an hour."""

        pinned_hour: bool = True

        def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
            fire: datetime | None = super().get_next_fire_time(previous_fire_time, now)
            while fire is not None and self.pinned_hour and _is_repeated_wall_time(fire):
                # Step past it in absolute time: wall-clock arithmetic would drop the fold and
                # land on the same repeated time again.
                fire = super().get_next_fire_time(fire, fire.astimezone(UTC) + timedelta(microseconds=1))
            return fire

    return TriggerClasses(interval=IntervalTrigger, cron=DstSafeCronTrigger, either=OrTrigger)


def cron_trigger(expression: str, zone: tzinfo) -> BaseTrigger:
    """A trigger for a 5-field cron expression, read as cron reads it.

    When both day of month and day of week are restricted, cron fires on days matching
    either (``0 0 1 * 1``: the 1st and every Monday), so the trigger is the union of two.
    """
    values = expression.split()
    if len(values) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(values)}")
    minute, hour, day, month, weekday = values
    if day != "*" and weekday != "*":
        either: BaseTrigger = trigger_classes().either(
            [
                _cron_part(minute, hour, day, month, "*", zone),
                _cron_part(minute, hour, "*", month, weekday, zone),
            ]
        )
        return either
    return _cron_part(minute, hour, day, month, weekday, zone)


def _cron_part(minute: str, hour: str, day: str, month: str, weekday: str, zone: tzinfo) -> BaseTrigger:
    trigger: BaseTrigger = trigger_classes().cron(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_cron_day_of_week(weekday),
        timezone=zone,
    )
    trigger.pinned_hour = hour != "*"
    return trigger


def _is_repeated_wall_time(moment: datetime) -> bool:
    """True for the second occurrence of a wall-clock time that a DST change repeats."""
    zone = moment.tzinfo
    if zone is None:
        return False
    wall = moment.replace(tzinfo=None)
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and moment.utcoffset() == second.utcoffset()


def fire_key(schedule_name: str, fire_time: datetime) -> str:
    """The unique key of the job for one fire time (UTC, so equal instants give equal keys)."""
    return f"schedule:{schedule_name}:{fire_time.astimezone(UTC).isoformat()}"
