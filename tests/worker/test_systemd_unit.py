"""The worker's systemd template unit says what the worker's shutdown and notify code expect."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parents[2] / "workers"
UNIT = WORKERS / "pgqueue-worker@.service"
ENV_EXAMPLE = WORKERS / "worker.env.example"

# The worker's default PGQUEUE_GRACE_PERIOD, in seconds.
DEFAULT_GRACE_PERIOD = 30


def _seconds(value: str) -> float:
    """systemd time spans as this unit writes them: a bare number of seconds, or with 's'/'min'."""
    text = value.strip()
    if text.endswith("min"):
        return float(text[:-3]) * 60
    if text.endswith("s"):
        return float(text[:-1])
    return float(text)


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_is_a_notify_service_with_a_watchdog(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert _seconds(service["WatchdogSec"]) > 0


def test_stop_timeout_exceeds_the_grace_period(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert _seconds(service["TimeoutStopSec"]) > DEFAULT_GRACE_PERIOD


def test_failures_restart_the_worker(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert _seconds(service["RestartSec"]) > 0


def test_exec_start_runs_the_worker_with_the_app_from_the_env_file(
    unit: configparser.ConfigParser,
) -> None:
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == "pgqueue"
    assert command[1] == "worker"
    assert "$PGQUEUE_APP" in command[2:]
    assert service["EnvironmentFile"] == "/etc/pgqueue/worker-%i.env"


def test_runs_unprivileged_and_hardened(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["User"] not in ("", "root")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"


def test_env_example_sets_what_the_unit_needs() -> None:
    names = {
        line.split("=", 1)[0].lstrip("#").strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and line.lstrip("#").strip().startswith("PGQUEUE_")
    }
    assert {
        "PGQUEUE_DSN",
        "PGQUEUE_SCHEMA",
        "PGQUEUE_APP",
        "PGQUEUE_QUEUES",
        "PGQUEUE_CONCURRENCY",
        "PGQUEUE_QUEUE_CONCURRENCY",
        "PGQUEUE_GRACE_PERIOD",
        "PGQUEUE_POLL_INTERVAL",
        "PGQUEUE_LEASE_SECONDS",
        "PGQUEUE_LOG_LEVEL",
    } <= names
