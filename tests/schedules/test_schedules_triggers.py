"""Schedule fire times, evaluated without waiting: DST in real zones, cron day-of-week, validation.

``fire_times`` walks a trigger the way the running scheduler does (APScheduler asks for the next
fire time with the previous one and a "now" just after it); ``fresh_fire_times`` walks it the
way a scheduler that has just started, or ``Scheduler.fire`` computing the stored next fire time,
does (no previous fire time). Both must agree, and both are checked as UTC instants.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from pgqueue import ConfigurationError, Queue, Schedule

REPO = Path(__file__).resolve().parents[2]
HOUR = timedelta(hours=1)
MAX_FIRES = 2000


def fire_times(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    """Fire times in [start, end) as UTC instants, as a long-running scheduler meets them."""
    trigger = schedule.trigger()
    fires: list[datetime] = []
    fire = trigger.get_next_fire_time(None, start)
    while fire is not None and fire < end:
        fires.append(fire.astimezone(UTC))
        assert len(fires) < MAX_FIRES, f"{schedule.cron}: runaway trigger, last {fires[-3:]}"
        fire = trigger.get_next_fire_time(fire, fire.astimezone(UTC) + timedelta(milliseconds=5))
    return fires


def fresh_fire_times(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    """The same, each one asked for afresh after the previous instant (``next_fire_time``)."""
    fires: list[datetime] = []
    fire = schedule.next_fire_time(start)
    while fire is not None and fire < end:
        fires.append(fire)
        assert len(fires) < MAX_FIRES, f"{schedule.cron}: runaway trigger, last {fires[-3:]}"
        fire = schedule.next_fire_time(fire + timedelta(microseconds=1))
    return fires


def both_ways(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    running = fire_times(schedule, start, end)
    fresh = fresh_fire_times(schedule, start, end)
    assert running == fresh, f"{schedule.cron} in {schedule.timezone}: {running} != {fresh}"
    return running


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


# ---------------------------------------------------------------------------- DST

# (zone, transition day, cron, the one fire on that day as a UTC instant)
DAILY_ON_TRANSITION_DAYS = [
    # Spring forward, 02:00 -> 03:00: 02:30 does not exist; runs once, at 03:30 CEST.
    ("Europe/Paris", date(2026, 3, 29), "30 2 * * *", utc(2026, 3, 29, 1, 30)),
    # Fall back, 03:00 -> 02:00: 02:30 happens twice; runs once, at the first (CEST).
    ("Europe/Paris", date(2026, 10, 25), "30 2 * * *", utc(2026, 10, 25, 0, 30)),
    # Spring forward in New York: 02:30 does not exist; runs once, at 03:30 EDT.
    ("America/New_York", date(2026, 3, 8), "30 2 * * *", utc(2026, 3, 8, 7, 30)),
    # Fall back in New York repeats 01:00-02:00: 02:30 (EST) happens once.
    ("America/New_York", date(2026, 11, 1), "30 2 * * *", utc(2026, 11, 1, 7, 30)),
    # ... and 01:30 happens twice: runs once, at the first (EDT).
    ("America/New_York", date(2026, 11, 1), "30 1 * * *", utc(2026, 11, 1, 5, 30)),
]


@pytest.mark.parametrize(("zone_name", "day", "cron", "expected"), DAILY_ON_TRANSITION_DAYS)
def test_daily_cron_runs_once_on_dst_transition_days_and_once_on_ordinary_days(
    zone_name: str, day: date, cron: str, expected: datetime
) -> None:
    zone = ZoneInfo(zone_name)
    schedule = Schedule(name="nightly", task="cleanup", cron=cron, timezone=zone_name)
    start = local_midnight(day - timedelta(days=3), zone)
    end = local_midnight(day + timedelta(days=4), zone)

    fires = both_ways(schedule, start, end)

    per_day = Counter(f.astimezone(zone).date() for f in fires)
    assert per_day == {day + timedelta(days=n): 1 for n in range(-3, 4)}, fires
    assert [f for f in fires if f.astimezone(zone).date() == day] == [expected]
    wanted_hour, wanted_minute = int(cron.split()[1]), int(cron.split()[0])
    for fire in fires:
        local = fire.astimezone(zone)
        if local.date() != day:  # ordinary days: the wall-clock time asked for, in that zone
            assert (local.hour, local.minute) == (wanted_hour, wanted_minute), local
    assert fires == sorted(set(fires))


# (zone, transition day, hours that local day has)
TRANSITIONS = [
    ("Europe/Paris", date(2026, 3, 29), 23),
    ("Europe/Paris", date(2026, 10, 25), 25),
    ("America/New_York", date(2026, 3, 8), 23),
    ("America/New_York", date(2026, 11, 1), 25),
]


@pytest.mark.parametrize(("zone_name", "day", "hours"), TRANSITIONS)
def test_hourly_cron_fires_every_real_hour_across_dst_transitions(
    zone_name: str, day: date, hours: int
) -> None:
    zone = ZoneInfo(zone_name)
    schedule = Schedule(name="hourly", task="tick", cron="0 * * * *", timezone=zone_name)

    on_the_day = both_ways(schedule, local_midnight(day, zone), local_midnight(day + timedelta(days=1), zone))
    assert len(on_the_day) == hours

    around = both_ways(
        schedule,
        local_midnight(day - timedelta(days=1), zone),
        local_midnight(day + timedelta(days=2), zone),
    )
    assert len(around) == 24 + hours + 24
    gaps = {b - a for a, b in itertools.pairwise(around)}
    assert gaps == {HOUR}, f"not one fire per real hour: {sorted(gaps)}"  # so strictly increasing too
    assert all(f.minute == 0 and f.second == 0 for f in around)


# Crons pinned to several hours around a fall-back night: only the *repeated* wall times are
# dropped; the times after the repeated hour still run.
PINNED_HOURS_ON_FALL_BACK = [
    # 02:30 CEST, (02:30 CET is the repeat: dropped), 03:30 CET.
    (
        "Europe/Paris",
        date(2026, 10, 25),
        "30 2,3 * * *",
        [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 2, 30)],
    ),
    # 01:00 CEST, 02:00 CEST, (02:00 CET dropped), 03:00 CET, 04:00 CET.
    (
        "Europe/Paris",
        date(2026, 10, 25),
        "0 1-4 * * *",
        [utc(2026, 10, 24, 23), utc(2026, 10, 25, 0), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3)],
    ),
    # 01:00 and 01:30 EDT, (01:00 and 01:30 EST dropped), 02:00, 02:30, 03:00, 03:30 EST.
    (
        "America/New_York",
        date(2026, 11, 1),
        "*/30 1-3 * * *",
        [
            utc(2026, 11, 1, 5),
            utc(2026, 11, 1, 5, 30),
            utc(2026, 11, 1, 7),
            utc(2026, 11, 1, 7, 30),
            utc(2026, 11, 1, 8),
            utc(2026, 11, 1, 8, 30),
        ],
    ),
    # Spring forward: 02:30 CET does not exist and is the same instant as 03:30 CEST: once.
    ("Europe/Paris", date(2026, 3, 29), "30 2,3 * * *", [utc(2026, 3, 29, 1, 30)]),
]


@pytest.mark.parametrize(("zone_name", "day", "cron", "expected"), PINNED_HOURS_ON_FALL_BACK)
def test_pinned_hours_skip_only_the_repeated_wall_times(
    zone_name: str, day: date, cron: str, expected: list[datetime]
) -> None:
    zone = ZoneInfo(zone_name)
    schedule = Schedule(name="pinned", task="tick", cron=cron, timezone=zone_name)
    fires = both_ways(schedule, local_midnight(day, zone), local_midnight(day + timedelta(days=1), zone))
    assert fires == expected


def test_latest_fire_time_across_a_repeated_hour_returns() -> None:
    """``Schedule.last_fire_time`` (the coalesce catch-up at start-up) for an hourly cron in the
    day after a fall-back night. Run in a subprocess: an endless loop must fail, not hang."""
    code = textwrap.dedent(
        """
        from datetime import UTC, datetime
        from pgqueue import Schedule
        s = Schedule(name="hourly", task="tick", cron="0 * * * *", timezone="Europe/Paris",
                     misfire="coalesce")
        print(s.last_fire_time(datetime(2026, 10, 25, 3, 30, tzinfo=UTC)).isoformat())
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=5, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        pytest.fail("Schedule.last_fire_time never returned (endless loop over the repeated hour)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2026-10-25T03:00:00+00:00"


def test_last_fire_time_is_the_latest_fire_at_or_before() -> None:
    daily = Schedule(name="nightly", task="cleanup", cron="30 2 * * *", timezone="Europe/Paris")
    assert daily.last_fire_time(utc(2026, 10, 25, 12)) == utc(2026, 10, 25, 0, 30)
    assert daily.last_fire_time(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 25, 0, 30)
    assert daily.last_fire_time(utc(2026, 3, 29, 1, 29)) == utc(2026, 3, 28, 1, 30)
    every = Schedule(name="often", task="tick", every=timedelta(seconds=2))
    assert every.last_fire_time(utc(2026, 6, 1, 12, 0, 5)) == utc(2026, 6, 1, 12, 0, 4)


# ---------------------------------------------------------------------------- day of week

MON, TUE, WED, THU, FRI, SAT, SUN = range(1, 8)  # ISO weekdays
WEEKDAY_CASES = [
    ("1-5", {MON, TUE, WED, THU, FRI}),
    ("mon-fri", {MON, TUE, WED, THU, FRI}),
    ("0", {SUN}),
    ("7", {SUN}),
    ("*/2", {SUN, TUE, THU, SAT}),
    ("1-5/2", {MON, WED, FRI}),
    ("0,6", {SAT, SUN}),
    ("5-7", {FRI, SAT, SUN}),
    ("1", {MON}),
    ("*", {MON, TUE, WED, THU, FRI, SAT, SUN}),
]


@pytest.mark.parametrize("zone_name", ["UTC", "America/New_York"])
@pytest.mark.parametrize(("weekday_field", "days"), WEEKDAY_CASES)
def test_cron_day_of_week_follows_cron(weekday_field: str, days: set[int], zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    schedule = Schedule(name="weekly", task="report", cron=f"0 8 * * {weekday_field}", timezone=zone_name)
    start = local_midnight(date(2026, 6, 1), zone)  # a Monday
    fires = both_ways(schedule, start, start + timedelta(weeks=3))
    local = [f.astimezone(zone) for f in fires]
    assert {f.isoweekday() for f in local} == days
    assert len(fires) == 3 * len(days)
    assert all((f.hour, f.minute) == (8, 0) for f in local)


def test_day_of_week_is_the_local_day_not_the_utc_day() -> None:
    # Friday 20:00 in New York is already Saturday in UTC.
    schedule = Schedule(name="friday-night", task="report", cron="0 20 * * 5", timezone="America/New_York")
    fires = both_ways(schedule, utc(2026, 6, 1), utc(2026, 6, 22))
    assert fires == [utc(2026, 6, 6, 0), utc(2026, 6, 13, 0), utc(2026, 6, 20, 0)]


def test_interval_fire_times_are_anchored_so_every_process_agrees() -> None:
    schedule = Schedule(name="often", task="tick", every=timedelta(seconds=1))
    fires = both_ways(schedule, utc(2026, 6, 1, 12, 0, 0, 300_000), utc(2026, 6, 1, 12, 0, 5))
    assert fires == [utc(2026, 6, 1, 12, 0, s) for s in range(1, 5)]
    in_paris = Schedule(name="hourly", task="tick", every=HOUR, timezone="Europe/Paris")
    fires = both_ways(in_paris, utc(2026, 10, 24, 22, 30), utc(2026, 10, 25, 4))
    assert [b - a for a, b in itertools.pairwise(fires)] == [HOUR] * (len(fires) - 1)


# ---------------------------------------------------------------------------- validation

BAD_CRONS = [
    "99 * * * *",
    "* * * *",
    "0 8 * * * *",
    "",
    "0 25 * * *",
    "0 8 32 * *",
    "0 8 * 13 *",
    "0 8 * * 8",
    "0 8 * * 5-1",
    "0 8 * * */0",
    "0 8 * * mon-funday",
    "0 8 * * 1-5/x",
    "not a cron at all",
]
BAD_ZONES = ["Mars/Olympus_Mons", "Europe/Pariss", "UTC+2", "", "../../etc/passwd"]


def _assert_names(exc: pytest.ExceptionInfo[ConfigurationError], name: str) -> None:
    assert f"schedule {name!r}" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("cron", BAD_CRONS)
def test_bad_cron_fails_at_declaration_naming_the_schedule(cron: str) -> None:
    queue = Queue("postgresql://nowhere.invalid/never-used", schema="unused")

    with pytest.raises(ConfigurationError) as exc:
        queue.schedule("send_report", {"kind": "daily"}, cron=cron, name="daily-report")
    _assert_names(exc, "daily-report")
    assert cron in str(exc.value)

    with pytest.raises(ConfigurationError) as exc:

        @queue.periodic(cron=cron)
        def cleanup_old_notifications() -> None: ...

    _assert_names(exc, "cleanup_old_notifications")
    assert queue.declared_schedules == []


@pytest.mark.parametrize("zone", BAD_ZONES)
def test_unknown_time_zone_fails_at_declaration_naming_the_schedule(zone: str) -> None:
    queue = Queue("postgresql://nowhere.invalid/never-used", schema="unused")

    with pytest.raises(ConfigurationError) as exc:
        queue.schedule("send_report", cron="0 8 * * *", timezone=zone, name="daily-report")
    _assert_names(exc, "daily-report")
    assert "time zone" in str(exc.value)

    with pytest.raises(ConfigurationError) as exc:

        @queue.periodic(every=timedelta(minutes=5), timezone=zone, name="refresh-stats")
        async def refresh_stats() -> None: ...

    _assert_names(exc, "refresh-stats")
    assert queue.declared_schedules == []


def test_good_declarations_are_kept() -> None:
    queue = Queue("postgresql://nowhere.invalid/never-used", schema="unused")

    @queue.periodic(cron="0 2 * * *", timezone="Europe/Paris")
    def cleanup_old_notifications() -> None: ...

    @queue.periodic(every=timedelta(minutes=5), queue="reports")
    async def refresh_stats() -> None: ...

    queue.schedule("send_report", {"kind": "daily"}, cron="0 8 * * mon-fri", name="daily-report")
    by_name = {s.name: s for s in queue.declared_schedules}
    assert set(by_name) == {"cleanup_old_notifications", "refresh_stats", "daily-report"}
    assert by_name["refresh_stats"].queue == "reports"
    assert by_name["daily-report"].args == {"kind": "daily"}
    with pytest.raises(ConfigurationError, match="daily-report"):
        queue.schedule("send_report", cron="0 9 * * *", name="daily-report")
