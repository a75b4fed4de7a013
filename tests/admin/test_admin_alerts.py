"""Alert rules (pure evaluation), de-duplicated delivery, and a real webhook on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from admin_support import AUTH, admin_app, bury, insert_job
from fastapi.testclient import TestClient

from pgqueue import Queue
from pgqueue.admin import AlertEvent, AlertMonitor, AlertRule, AlertSettings
from pgqueue.admin.alerts import alerts_from_env
from pgqueue.admin.checks import Snapshot, evaluate
from pgqueue.errors import ConfigurationError


def snap(
    queues: dict[str, dict[str, Any]],
    *,
    failures: dict[str, int] | None = None,
    seen: dict[str, float] | None = None,
) -> Snapshot:
    return Snapshot(
        queues=queues,
        failures={300.0: failures or {}},
        worker_seen=seen or {},
        live_workers=len(seen or {}),
    )


# ---------------------------------------------------------------------------- evaluation


def test_backlog_and_failures_thresholds() -> None:
    s = snap(
        {"a": {"queued": 11, "delayed": 0}, "b": {"queued": 3, "delayed": 0}},
        failures={"a": 2, "b": 9},
    )
    rules = (AlertRule(backlog_above=10, failures_above=5),)
    found = {(b.queue, b.kind): b for b in evaluate(s, rules)}
    assert set(found) == {("a", "backlog"), ("b", "failures")}
    backlog = found[("a", "backlog")]
    assert backlog.value == 11 and "11 jobs waiting" in backlog.message


def test_no_worker_for_all_queues_only_concerns_queues_with_work() -> None:
    s = snap(
        {
            "busy": {"queued": 0, "delayed": 2},
            "idle": {"queued": 0, "delayed": 0},
            "served": {"queued": 5, "delayed": 0},
        },
        seen={"served": 3.0},
    )
    found = evaluate(s, (AlertRule(no_worker_seconds=60),))
    assert [(b.queue, b.kind, b.value) for b in found] == [("busy", "no_worker", None)]
    # Naming the queue alerts even while it is idle, and even if it has no row at all.
    named = evaluate(
        s,
        (
            AlertRule(queue="idle", no_worker_seconds=60),
            AlertRule(queue="ghost", no_worker_seconds=60),
        ),
    )
    assert {b.queue for b in named} == {"idle", "ghost"}


def test_a_named_rule_overrides_the_catch_all() -> None:
    s = snap({"email": {"queued": 50, "delayed": 0}, "bulk": {"queued": 50, "delayed": 0}})
    rules = (AlertRule(backlog_above=10), AlertRule(queue="bulk", backlog_above=1000))
    assert [b.queue for b in evaluate(s, rules)] == ["email"]


def test_rule_validation() -> None:
    with pytest.raises(ConfigurationError):
        AlertRule(queue="no spaces")
    with pytest.raises(ConfigurationError):
        AlertRule(backlog_above=-1)
    with pytest.raises(ConfigurationError):
        AlertSettings(webhook_url="file:///etc/passwd")


def test_settings_from_the_environment() -> None:
    settings = alerts_from_env(
        {
            "PGQUEUE_ADMIN_ALERT_BACKLOG": "100",
            "PGQUEUE_ADMIN_ALERT_NO_WORKER": "120",
            "PGQUEUE_ADMIN_ALERT_WEBHOOK": "http://127.0.0.1:9/hook",
            "PGQUEUE_ADMIN_ALERT_WEBHOOK_HEADERS": '{"Authorization": "Bearer x"}',
            "PGQUEUE_ADMIN_ALERT_INTERVAL": "15",
        }
    )
    assert settings.rules == (AlertRule(backlog_above=100, no_worker_seconds=120),)
    assert settings.webhook_headers == {"Authorization": "Bearer x"}
    assert settings.interval_seconds == 15 and settings.delivers
    assert alerts_from_env({}).rules == ()
    with pytest.raises(ConfigurationError):
        alerts_from_env({"PGQUEUE_ADMIN_ALERT_BACKLOG": "lots"})


# ---------------------------------------------------------------------------- delivery


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records JSON bodies (and can be made to fail)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.headers.append(dict(self.headers))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.bodies


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


async def test_events_fire_once_and_resolve(pgqueue_queue: Queue) -> None:
    events: list[AlertEvent] = []
    settings = AlertSettings(rules=(AlertRule(queue="email", backlog_above=2),), callback=events.append)
    monitor = AlertMonitor(pgqueue_queue, settings)
    with pgqueue_queue.connection() as c:
        ids = [insert_job(c, pgqueue_queue.schema) for _ in range(3)]
    await monitor.check()
    await monitor.check()  # still firing: not sent again
    assert [(e.status, e.queue, e.kind, e.value) for e in events] == [("firing", "email", "backlog", 3.0)]
    assert [b.kind for b in monitor.firing] == ["backlog"]
    pgqueue_queue.cancel(ids[0])
    await monitor.check()
    assert [e.status for e in events] == ["firing", "resolved"] and monitor.firing == []


async def test_reminders_after_repeat_interval(pgqueue_queue: Queue) -> None:
    events: list[AlertEvent] = []

    async def callback(event: AlertEvent) -> None:  # coroutine callbacks are awaited
        events.append(event)

    settings = AlertSettings(
        rules=(AlertRule(failures_above=0),), callback=callback, repeat_after_seconds=0.01
    )
    with pgqueue_queue.connection() as c:
        bury(c, pgqueue_queue.schema)
    monitor = AlertMonitor(pgqueue_queue, settings)
    await monitor.check()
    time.sleep(0.02)
    await monitor.check()
    assert [e.kind for e in events] == ["failures", "failures"]


async def test_webhook_receives_json_and_failed_deliveries_are_retried(
    pgqueue_queue: Queue, receiver: Receiver
) -> None:
    settings = AlertSettings(
        rules=(AlertRule(queue="email", no_worker_seconds=30),),
        webhook_url=receiver.url,
        webhook_headers={"X-Team": "ops"},
    )
    monitor = AlertMonitor(pgqueue_queue, settings)
    receiver.status = 500
    assert await monitor.check() == []  # delivery failed: not marked as sent
    receiver.status = 204
    delivered = await monitor.check()
    assert [e.kind for e in delivered] == ["no_worker"]
    body = receiver.bodies[-1]
    assert body["status"] == "firing" and body["queue"] == "email"
    assert body["kind"] == "no_worker" and body["source"] == "pgqueue-admin"
    assert "no worker has served it" in body["message"]
    assert receiver.headers[-1]["X-Team"] == "ops"
    assert receiver.headers[-1]["Content-Type"] == "application/json"


def test_the_app_runs_the_alert_loop(pgqueue_queue: Queue, receiver: Receiver) -> None:
    with pgqueue_queue.connection() as c:
        for _ in range(4):
            insert_job(c, pgqueue_queue.schema, queue="bulk")
    settings = AlertSettings(
        rules=(AlertRule(backlog_above=3),), webhook_url=receiver.url, interval_seconds=0.1
    )
    with TestClient(admin_app(pgqueue_queue, alerts=settings)) as c:
        [event] = receiver.wait_for(1)
        assert (event["queue"], event["kind"], event["value"]) == ("bulk", "backlog", 4)
        firing = c.get("/api/alerts", headers=AUTH).json()["firing"]
        assert [b["queue"] for b in firing] == ["bulk"]
        assert "4 jobs waiting" in c.get("/", headers=AUTH).text  # the dashboard's banner
    time.sleep(0.3)
    assert len(receiver.bodies) == 1  # de-duplicated across rounds, loop stopped with the app
