"""``PGQUEUE_*`` variables as the worker and the client read them (pydantic-settings models).

Pure parsing: no database. The environment is the process's own, set with monkeypatch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pytest

from pgqueue._connections import DEFAULT_CONNECT_WAIT, connect_wait, prepared_statements_enabled, resolve_dsn
from pgqueue._naming import DEFAULT_SCHEMA
from pgqueue._settings import ClientEnv, resolve_schema
from pgqueue.errors import ConfigurationError
from pgqueue.worker.settings import WorkerEnv, WorkerSettings


@pytest.fixture(autouse=True)
def no_pgqueue_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets may configure what it reads."""
    for name in list(os.environ):
        if name.startswith("PGQUEUE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


def refused(variable: str, value: str, call: Any) -> str:
    """The ConfigurationError ``call`` raises: one line naming the variable and its value, at once."""
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as caught:
        call()
    assert time.monotonic() - started < 1.0
    message = str(caught.value)
    assert f"{variable}={value!r}" in message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- worker


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("PGQUEUE_QUEUES", " email, reports ,", "queues", ("email", "reports")),
        ("PGQUEUE_CONCURRENCY", "4", "concurrency", 4),
        ("PGQUEUE_PREFETCH", "0", "prefetch", 0),
        ("PGQUEUE_QUEUE_CONCURRENCY", "default=2", "queue_concurrency", {"default": 2}),
        ("PGQUEUE_QUEUE_WEIGHTS", "default=3", "queue_weights", {"default": 3}),
        ("PGQUEUE_POLL_INTERVAL", "0.5", "poll_interval", 0.5),
        ("PGQUEUE_LEASE_SECONDS", "3", "lease_seconds", 3.0),
        ("PGQUEUE_GRACE_PERIOD", "0", "grace_period", 0.0),
        ("PGQUEUE_RESCUE_INTERVAL", "0.1", "rescue_interval", 0.1),
        ("PGQUEUE_KEEP_COMPLETED_SECONDS", "1e3", "keep_completed_seconds", 1000.0),
        ("PGQUEUE_PRUNE_INTERVAL", "0.2", "prune_interval", 0.2),
        ("PGQUEUE_PRUNE_BATCH", " 50 ", "prune_batch", 50),
        ("PGQUEUE_RATE_BURST_SECONDS", "0.25", "rate_burst_seconds", 0.25),
        ("PGQUEUE_ISOLATION", " process ", "isolation", "process"),
        ("PGQUEUE_APP", "myapp.jobs:queue", "app", "myapp.jobs:queue"),
        ("PGQUEUE_BLOCK_WARNING", "2", "block_warning", 2.0),
        ("PGQUEUE_LISTEN_DSN", "postgresql://direct/db", "listen_dsn", "postgresql://direct/db"),
    ],
)
def test_each_worker_variable_is_parsed(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, raw)
    assert WorkerEnv.variable(field) == variable
    assert getattr(WorkerSettings.from_env(), field) == expected


def test_every_worker_setting_has_a_variable() -> None:
    names = [f.name for f in dataclasses.fields(WorkerSettings)]
    assert sorted(WorkerEnv.model_fields) == sorted(names)
    assert all(WorkerEnv.variable(name) == f"PGQUEUE_{name.upper()}" for name in names)


def test_unset_or_empty_variables_leave_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings.from_env() == WorkerSettings()
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "")
    monkeypatch.setenv("PGQUEUE_QUEUES", "")
    assert WorkerSettings.from_env() == WorkerSettings()


def test_the_environment_is_read_when_settings_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set after import, as the CLI and tests do: nothing is cached."""
    assert WorkerSettings.from_env().concurrency == 10
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "3")
    assert WorkerSettings.from_env().concurrency == 3
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "5")
    assert WorkerSettings.from_env().concurrency == 5


def test_explicit_values_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "3")
    monkeypatch.setenv("PGQUEUE_QUEUES", "a,b")
    monkeypatch.setenv("PGQUEUE_LEASE_SECONDS", "7")
    settings = WorkerSettings.from_env(concurrency=8, queues=("c",), lease_seconds=None)
    assert (settings.concurrency, settings.queues, settings.lease_seconds) == (8, ("c",), 7.0)


def test_a_mapping_given_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "3")
    assert WorkerSettings.from_env({"PGQUEUE_POLL_INTERVAL": "0.5"}).concurrency == 10
    assert WorkerSettings.from_env({"PGQUEUE_POLL_INTERVAL": "0.5"}).poll_interval == 0.5


@pytest.mark.parametrize(
    ("variable", "raw", "reason"),
    [
        ("PGQUEUE_CONCURRENCY", "ten", "integer"),
        ("PGQUEUE_PREFETCH", "1.5", "integer"),
        ("PGQUEUE_POLL_INTERVAL", "soon", "number"),
        ("PGQUEUE_QUEUES", "bad name!", "invalid queue name"),
        ("PGQUEUE_QUEUE_CONCURRENCY", "email", "NAME=N"),
        ("PGQUEUE_QUEUE_WEIGHTS", "email=0", "NAME=N"),
    ],
)
def test_a_malformed_worker_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, reason: str
) -> None:
    monkeypatch.setenv(variable, raw)
    assert reason in refused(variable, raw, WorkerSettings.from_env)


def test_values_out_of_range_are_refused_as_arguments_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "0")
    with pytest.raises(ConfigurationError, match="concurrency must be at least 1"):
        WorkerSettings.from_env()
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "2")
    monkeypatch.setenv("PGQUEUE_ISOLATION", "fork")
    with pytest.raises(ConfigurationError, match="isolation must be one of"):
        WorkerSettings.from_env()
    assert WorkerSettings.from_env(isolation="process").isolation == "process"


# ---------------------------------------------------------------------------- client


def test_dsn_from_the_argument_then_pgqueue_dsn_then_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="PGQUEUE_DSN or DATABASE_URL"):
        resolve_dsn(None)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://platform/db")
    assert resolve_dsn(None) == "postgresql://platform/db"
    monkeypatch.setenv("PGQUEUE_DSN", "postgresql://mine/db")
    assert resolve_dsn(None) == "postgresql://mine/db"
    assert resolve_dsn("postgres://given/db") == "postgresql://given/db"
    monkeypatch.setenv("PGQUEUE_DSN", "")
    assert resolve_dsn("") == "postgresql://platform/db"


def test_connect_wait_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert connect_wait() == DEFAULT_CONNECT_WAIT
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", " 12 ")
    assert connect_wait() == 12.0
    assert connect_wait(0.5) == 0.5
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", "soon")
    refused("PGQUEUE_CONNECT_WAIT", "soon", connect_wait)
    assert connect_wait(1) == 1.0  # an explicit value does not need the environment
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", "-1")
    refused("PGQUEUE_CONNECT_WAIT", "-1", connect_wait)
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", "inf")
    refused("PGQUEUE_CONNECT_WAIT", "inf", connect_wait)


@pytest.mark.parametrize(
    ("raw", "enabled"),
    [
        *[("", True), ("on", True), ("TRUE", True), ("1", True), ("yes", True)],
        *[("off", False), (" Off ", False), ("false", False), ("0", False), ("no", False)],
    ],
)
def test_prepared_statements_switch(monkeypatch: pytest.MonkeyPatch, raw: str, enabled: bool) -> None:
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", raw)
    assert prepared_statements_enabled() is enabled


def test_a_malformed_prepared_statements_switch_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "sometimes")
    refused("PGQUEUE_PREPARED_STATEMENTS", "sometimes", prepared_statements_enabled)


def test_schema_from_the_argument_then_pgqueue_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_schema() == DEFAULT_SCHEMA
    monkeypatch.setenv("PGQUEUE_SCHEMA", "jobs_eu")
    assert resolve_schema() == "jobs_eu"
    assert resolve_schema(None) == "jobs_eu"
    assert resolve_schema("given") == "given"
    assert resolve_schema("") == ""  # given, so the name check refuses it instead of replacing it


def test_the_cli_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (ClientEnv.load().app, ClientEnv.load().log_level) == (None, "INFO")
    monkeypatch.setenv("PGQUEUE_APP", "myapp.jobs:queue")
    monkeypatch.setenv("PGQUEUE_LOG_LEVEL", "DEBUG")
    assert (ClientEnv.load().app, ClientEnv.load().log_level) == ("myapp.jobs:queue", "DEBUG")
    assert ClientEnv.load(app="other:queue", log_level=None).app == "other:queue"


def test_a_malformed_client_variable_fails_only_the_reads_that_need_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGQUEUE_DSN", "postgresql://mine/db")
    monkeypatch.setenv("PGQUEUE_CONNECT_WAIT", "soon")
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "off")
    assert resolve_dsn(None) == "postgresql://mine/db"
    assert prepared_statements_enabled() is False
    refused("PGQUEUE_CONNECT_WAIT", "soon", connect_wait)
    # Read whole, the model names every bad variable in its one line.
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "sometimes")
    message = refused("PGQUEUE_CONNECT_WAIT", "soon", ClientEnv.load)
    assert "PGQUEUE_PREPARED_STATEMENTS='sometimes'" in message
