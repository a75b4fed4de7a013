"""Thresholds on queue health, and the pure function that says which are crossed.

``/health/detailed`` and the alert loop judge queues by the same rules, so an alert that fires
and a health check that fails always agree. The admin's read model takes the
:class:`Snapshot` (:meth:`pgqueue.admin.readmodel.ReadModel.snapshot`); :func:`evaluate` is
plain Python, tested without a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pgqueue._naming import check_queue_name
from pgqueue.admin.schemas import Breach, QueueHealth
from pgqueue.errors import ConfigurationError, InvalidJobError

DEFAULT_FAILURE_WINDOW = 300.0
ALL_QUEUES = "*"


@dataclass(frozen=True, slots=True)
class AlertRule:
    """Thresholds for one queue, or for every queue (``queue="*"``). Unset thresholds are off.

    ``no_worker_seconds`` fires when no worker serving the queue has sent a heartbeat for that
    long. For ``"*"`` it only concerns queues with jobs waiting (an idle queue nobody serves is
    normal); name the queue to be told even while it is idle.
    """

    queue: str = ALL_QUEUES
    backlog_above: int | None = None
    failures_above: int | None = None
    failures_window_seconds: float = DEFAULT_FAILURE_WINDOW
    no_worker_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.queue != ALL_QUEUES:
            try:
                check_queue_name(self.queue)
            except InvalidJobError as exc:
                raise ConfigurationError(f"alert rule: {exc}") from exc
        for name in ("backlog_above", "failures_above"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ConfigurationError(f"{name} must be a non-negative integer")
        if self.failures_window_seconds <= 0:
            raise ConfigurationError("failures_window_seconds must be positive")
        if self.no_worker_seconds is not None and self.no_worker_seconds <= 0:
            raise ConfigurationError("no_worker_seconds must be positive")

    def applies_to(self, queue: str) -> bool:
        return self.queue in (ALL_QUEUES, queue)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the rules are judged on, read in one go."""

    queues: dict[str, dict[str, Any]]
    failures: dict[float, dict[str, int]]
    worker_seen: dict[str, float]
    live_workers: int


def failure_windows(rules: tuple[AlertRule, ...]) -> list[float]:
    windows = {r.failures_window_seconds for r in rules if r.failures_above is not None}
    return sorted(windows or {DEFAULT_FAILURE_WINDOW})


def _window_for(queue: str, rules: tuple[AlertRule, ...]) -> float:
    for rule in _ordered(rules):
        if rule.failures_above is not None and rule.applies_to(queue):
            return rule.failures_window_seconds
    return failure_windows(rules)[0]


def _ordered(rules: tuple[AlertRule, ...]) -> list[AlertRule]:
    """Rules naming a queue first: they override ``"*"`` for the same kind of threshold."""
    return sorted(rules, key=lambda r: r.queue == ALL_QUEUES)


def _names(snap: Snapshot, rules: tuple[AlertRule, ...]) -> list[str]:
    named = {r.queue for r in rules if r.queue != ALL_QUEUES}
    return sorted(set(snap.queues) | named)


def queue_health(snap: Snapshot, rules: tuple[AlertRule, ...]) -> list[QueueHealth]:
    out = []
    for name in _names(snap, rules):
        row = snap.queues.get(name, {})
        window = _window_for(name, rules)
        out.append(
            QueueHealth(
                name=name,
                backlog=int(row.get("queued", 0)),
                oldest_waiting_seconds=row.get("oldest_waiting"),
                failures=snap.failures.get(window, {}).get(name, 0),
                failures_window_seconds=window,
                worker_seen_seconds=snap.worker_seen.get(name),
                paused=bool(row.get("paused", False)),
            )
        )
    return out


KINDS = {"backlog": "backlog_above", "failures": "failures_above", "no_worker": "no_worker_seconds"}


def _rule_for(rules: tuple[AlertRule, ...], queue: str, threshold: str) -> AlertRule | None:
    """The most specific rule that sets this threshold for this queue."""
    for rule in _ordered(rules):
        if rule.applies_to(queue) and getattr(rule, threshold) is not None:
            return rule
    return None


def evaluate(snap: Snapshot, rules: tuple[AlertRule, ...]) -> list[Breach]:
    """Every (queue, kind) whose threshold is crossed, judged by the most specific rule."""
    found = []
    for name in _names(snap, rules):
        row = snap.queues.get(name, {})
        for kind, threshold in KINDS.items():
            rule = _rule_for(rules, name, threshold)
            breach = None if rule is None else _JUDGES[kind](snap, rule, name, row)
            if breach is not None:
                found.append(breach)
    return found


def _backlog(snap: Snapshot, rule: AlertRule, name: str, row: dict[str, Any]) -> Breach | None:
    backlog, limit = int(row.get("queued", 0)), rule.backlog_above
    if limit is None or backlog <= limit:
        return None
    return Breach(
        queue=name,
        kind="backlog",
        value=backlog,
        threshold=limit,
        message=f"queue {name!r}: {backlog} jobs waiting (threshold {limit})",
    )


def _failures(snap: Snapshot, rule: AlertRule, name: str, row: dict[str, Any]) -> Breach | None:
    window, limit = rule.failures_window_seconds, rule.failures_above
    failures = snap.failures.get(window, {}).get(name, 0)
    if limit is None or failures <= limit:
        return None
    return Breach(
        queue=name,
        kind="failures",
        value=failures,
        threshold=limit,
        message=f"queue {name!r}: {failures} failed attempts in the last {window:g} s (threshold {limit})",
    )


def _no_worker(snap: Snapshot, rule: AlertRule, name: str, row: dict[str, Any]) -> Breach | None:
    limit = rule.no_worker_seconds
    waiting = int(row.get("queued", 0)) + int(row.get("delayed", 0))
    age = snap.worker_seen.get(name)
    if limit is None or (age is not None and age <= limit):
        return None
    if rule.queue == ALL_QUEUES and waiting == 0:
        return None  # nobody serving an idle queue is normal; name the queue to hear of it
    seen = "no worker has served it" if age is None else f"no worker seen for {age:.0f} s"
    return Breach(
        queue=name,
        kind="no_worker",
        value=age,
        threshold=limit,
        message=f"queue {name!r}: {seen} (threshold {limit:g} s)",
    )


_JUDGES = {"backlog": _backlog, "failures": _failures, "no_worker": _no_worker}
