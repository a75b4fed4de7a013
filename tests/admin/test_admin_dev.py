"""``pgqueue dev`` end to end: embedded PostgreSQL, demo jobs, dashboard, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue._dev import bind, demo_queue, enqueue_demo_jobs
from pgqueue.errors import ConfigurationError

TOKEN = "dev-test-token-0123456789"


def get(url: str, token: str | None = TOKEN) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def read_banner(process: subprocess.Popen[str], deadline: float) -> dict[str, str]:
    """The dashboard URL and database line from the banner (stdout), waiting for it."""
    assert process.stdout is not None
    found: dict[str, str] = {}
    for line in process.stdout:
        if match := re.match(r"\s+(dashboard|token|database)\s+(\S.*)$", line):
            found[match.group(1)] = match.group(2).strip()
        elif match := re.match(r"\s+\(embedded, in (\S+);", line):
            found["data_dir"] = match.group(1)
        if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
            break
    return found


@pytest.mark.slow
def test_dev_serves_demo_jobs_and_stops_cleanly_on_ctrl_c() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PGQUEUE_ADMIN_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "pgqueue._dev", "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # Ctrl-C goes to the whole foreground group: so do we
    )
    try:
        banner = read_banner(process, time.monotonic() + 60)
        url = banner["dashboard"]
        assert banner["token"] == TOKEN
        data_dir = Path(banner["data_dir"])
        assert data_dir.is_dir()
        # The printed DSN is the one to give the CLI from another shell.
        with psycopg.connect(banner["database"]) as conn:
            assert conn.execute("SELECT to_regclass('pgqueue.jobs')::text").fetchone() == ("pgqueue.jobs",)
        assert get(url + "health/ready")["status"] == "ok"

        deadline = time.monotonic() + 30
        while True:  # the worker completes, retries and dead-letters demo jobs
            queues = {q["name"]: q["counts"] for q in get(url + "api/queues")["queues"]}
            completed = sum(c["completed"] for c in queues.values())
            dead = sum(c["dead"] for c in queues.values())
            if (completed and dead) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert completed > 0 and dead > 0, queues
        schedules = {s["name"] for s in get(url + "api/schedules")["schedules"]}
        assert {"demo-cleanup", "nightly-report"} <= schedules
        workers = get(url + "api/workers")["workers"]
        assert len(workers) == 1 and workers[0]["alive"]

        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=45)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output
    assert "stopped" in output
    assert not data_dir.exists()


def test_demo_traffic_is_valid_for_the_demo_tasks(pgqueue_dsn: str, pgqueue_schema: str) -> None:
    with demo_queue(pgqueue_dsn, pgqueue_schema) as queue:
        assert sum(enqueue_demo_jobs(queue, n) for n in range(1, 36)) > 100
        names = {s.name for s in queue.declared_schedules}
    assert names == {"demo-cleanup", "nightly-report"}


def test_a_busy_port_is_a_clear_error() -> None:
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigurationError, match="another --port"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
