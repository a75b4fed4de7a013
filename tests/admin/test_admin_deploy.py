"""The standalone admin's deployment files (api/) agree with the code that reads them."""

from __future__ import annotations

import configparser
import runpy
import shlex
from pathlib import Path

import pytest
from fastapi import FastAPI

from pgqueue.errors import ConfigurationError

API = Path(__file__).resolve().parents[2] / "api"


def example_env(*, uncomment: bool) -> dict[str, str]:
    """admin.env.example as systemd reads it; ``uncomment`` also enables the optional lines."""
    env = {}
    for raw in (API / "admin.env.example").read_text().splitlines():
        line = raw.lstrip("#").strip() if uncomment else raw.strip()
        if line.startswith("PGQUEUE_") and "=" in line:
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_every_example_setting_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for uncomment in (False, True):
        env = example_env(uncomment=uncomment)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        namespace = runpy.run_path(str(API / "asgi.py"))
        assert isinstance(namespace["app"], FastAPI)
    assert "PGQUEUE_ADMIN_ALERT_WEBHOOK" in example_env(uncomment=True)


def test_the_entry_refuses_to_start_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PGQUEUE_ADMIN_TOKEN", "PGQUEUE_ADMIN_USER", "PGQUEUE_ADMIN_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PGQUEUE_DSN", "postgresql://localhost/app")
    with pytest.raises(ConfigurationError, match="credentials"):
        runpy.run_path(str(API / "asgi.py"))


def test_the_unit_runs_the_entry_on_loopback_with_the_env_file() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((API / "pgqueue-admin.service").read_text().replace("\\\n", " "))
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/uvicorn") and "asgi:app" in command
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert service["EnvironmentFile"] == "/etc/pgqueue/admin.env"
    assert service["User"] == "pgqueue" and service["NoNewPrivileges"] == "yes"
