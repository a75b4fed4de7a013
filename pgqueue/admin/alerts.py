"""Tell someone when a queue is in trouble: a callback and/or a JSON webhook, once per incident.

An :class:`AlertMonitor` runs in the admin app's lifespan. Every ``interval_seconds`` it reads a
:class:`~pgqueue.admin.checks.Snapshot` through the admin's read model, judges it by the rules,
and sends an event only when a (queue, kind) starts firing or is resolved — not on every round,
so a stuck queue does not page someone every 30 seconds (unless ``repeat_after_seconds`` asks
for reminders). A delivery that fails is tried again next round; nothing here ever raises into
the app.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pgqueue._queue import Queue
from pgqueue.admin.checks import AlertRule, evaluate
from pgqueue.admin.readmodel import ReadModel
from pgqueue.admin.schemas import AlertEvent, Breach
from pgqueue.admin.settings import AdminEnv
from pgqueue.errors import ConfigurationError

log = logging.getLogger("pgqueue.admin.alerts")

AlertCallback = Callable[[AlertEvent], Any]
"""Called with each event; may be a plain function or a coroutine function."""


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Rules plus where to send events. Rules alone still drive ``/health/detailed``."""

    rules: tuple[AlertRule, ...] = ()
    callback: AlertCallback | None = None
    webhook_url: str | None = None
    webhook_headers: Mapping[str, str] = field(default_factory=dict)
    interval_seconds: float = 30.0
    repeat_after_seconds: float | None = None
    webhook_timeout_seconds: float = 5.0
    notify_resolved: bool = True

    def __post_init__(self) -> None:
        if self.webhook_url is not None and urlsplit(self.webhook_url).scheme not in (
            "http",
            "https",
        ):
            raise ConfigurationError("the alert webhook must be an http:// or https:// URL")
        if self.interval_seconds <= 0 or self.webhook_timeout_seconds <= 0:
            raise ConfigurationError("alert interval and webhook timeout must be positive")
        if self.repeat_after_seconds is not None and self.repeat_after_seconds <= 0:
            raise ConfigurationError("repeat_after_seconds must be positive")

    @property
    def delivers(self) -> bool:
        return bool(self.rules) and (self.callback is not None or self.webhook_url is not None)


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> None:
    """POST a JSON body; raises on a transport error or a non-2xx answer."""
    request = urllib.request.Request(  # the scheme is checked in AlertSettings
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "pgqueue-admin", **headers},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if not 200 <= response.status < 300:
            raise OSError(f"webhook answered HTTP {response.status}")


@dataclass(slots=True)
class _Firing:
    breach: Breach
    notified_at: float | None = None


class AlertMonitor:
    """Evaluates the rules on a timer and delivers state changes, de-duplicated."""

    def __init__(
        self,
        queue: Queue,
        settings: AlertSettings,
        *,
        stale_seconds: float = 60.0,
        db_timeout: float = 5.0,
    ) -> None:
        self.queue = queue
        self.reads = ReadModel(queue.queries)
        self.settings = settings
        self.stale_seconds = stale_seconds
        self.db_timeout = db_timeout
        self._firing: dict[tuple[str, str], _Firing] = {}  # (queue, kind)

    @property
    def firing(self) -> list[Breach]:
        """What is firing now, as of the last round."""
        return [f.breach for f in self._firing.values()]

    def _breaches(self) -> list[Breach]:
        with self.queue.connection(wait=self.db_timeout) as conn:
            snap = self.reads.snapshot(conn, self.settings.rules, self.stale_seconds)
        return evaluate(snap, self.settings.rules)

    async def check(self) -> list[AlertEvent]:
        """One round: read, judge, deliver what changed. Returns the events delivered."""
        breaches = await asyncio.to_thread(self._breaches)
        now = time.monotonic()
        current: dict[tuple[str, str], Breach] = {(b.queue, b.kind): b for b in breaches}
        delivered: list[AlertEvent] = []
        for key, breach in current.items():
            state = self._firing.setdefault(key, _Firing(breach))
            state.breach = breach
            repeat = self.settings.repeat_after_seconds
            due = state.notified_at is None or (repeat is not None and now - state.notified_at >= repeat)
            if due and await self._deliver(_event("firing", breach)):
                state.notified_at = now
                delivered.append(_event("firing", breach))
        for key in [k for k in self._firing if k not in current]:
            state = self._firing.pop(key)
            if self.settings.notify_resolved and state.notified_at is not None:
                event = _event("resolved", state.breach)
                if await self._deliver(event):
                    delivered.append(event)
        return delivered

    async def _deliver(self, event: AlertEvent) -> bool:
        ok = True
        s = self.settings
        if s.callback is not None:
            try:
                outcome = s.callback(event)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("alert callback failed for %s", event.message)
                ok = False
        if s.webhook_url is not None:
            body = event.model_dump_json().encode("utf-8")
            try:
                await asyncio.to_thread(
                    post_json, s.webhook_url, body, s.webhook_headers, s.webhook_timeout_seconds
                )
            except Exception as exc:
                log.warning("alert webhook failed (%s) for %s; will retry", exc, event.message)
                ok = False
        return ok

    async def run(self) -> None:
        """Check every ``interval_seconds`` until cancelled; a failed round is logged, not fatal."""
        while True:
            try:
                for event in await self.check():
                    log.info("alert %s: %s", event.status, event.message)
            except Exception as exc:
                log.warning("alert round failed: %s", exc)
            await asyncio.sleep(self.settings.interval_seconds)


def _event(status: str, breach: Breach) -> AlertEvent:
    return AlertEvent.model_validate({"status": status, **breach.model_dump(), "at": datetime.now(UTC)})


def rules_from_env(environ: Mapping[str, str] | None = None) -> tuple[AlertRule, ...]:
    """One rule for every queue from ``PGQUEUE_ADMIN_ALERT_*`` (BACKLOG, FAILURES,
    FAILURES_WINDOW, NO_WORKER); none when none is set."""
    env = AdminEnv.load(
        environ, only=("alert_backlog", "alert_failures", "alert_failures_window", "alert_no_worker")
    )
    backlog, failures, no_worker = env.alert_backlog, env.alert_failures, env.alert_no_worker
    if backlog is None and failures is None and no_worker is None:
        return ()
    return (
        AlertRule(
            backlog_above=None if backlog is None else int(backlog),
            failures_above=None if failures is None else int(failures),
            failures_window_seconds=env.alert_failures_window or 300.0,
            no_worker_seconds=no_worker,
        ),
    )


def alerts_from_env(environ: Mapping[str, str] | None = None) -> AlertSettings:
    """Rules from :func:`rules_from_env`, the webhook from ``PGQUEUE_ADMIN_ALERT_WEBHOOK`` (and
    ``_HEADERS``, a JSON object) and the round interval from ``PGQUEUE_ADMIN_ALERT_INTERVAL``."""
    env = AdminEnv.load(environ, only=("alert_webhook", "alert_webhook_headers", "alert_interval"))
    return AlertSettings(
        rules=rules_from_env(environ),
        webhook_url=env.alert_webhook,
        webhook_headers=env.alert_webhook_headers or {},
        interval_seconds=30.0 if env.alert_interval is None else env.alert_interval,
    )
