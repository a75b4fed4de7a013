"""``PGQUEUE_ADMIN_*`` variables as the admin reads them (a pydantic-settings model).

Pure parsing: no database. The environment is the process's own, set with monkeypatch.
(Named apart from tests/worker/test_settings_env.py: test files share one module namespace.)
"""

from __future__ import annotations

import os
import time

import pytest

from pgqueue.admin.settings import DEFAULT_MAX_BODY_BYTES, AdminEnv, AdminOptions
from pgqueue.errors import ConfigurationError

TOKEN = "t" * 24


@pytest.fixture(autouse=True)
def no_pgqueue_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets may configure what it reads."""
    for name in list(os.environ):
        if name.startswith("PGQUEUE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("PGQUEUE_ADMIN_TOKEN", TOKEN, "token", TOKEN),
        ("PGQUEUE_ADMIN_USER", "ops", "user", "ops"),
        ("PGQUEUE_ADMIN_PASSWORD", " correct horse ", "password", " correct horse "),  # secrets kept as-is
        (
            "PGQUEUE_ADMIN_TRUSTED_ORIGINS",
            "https://a.b, ,https://c",
            "trusted_origins",
            ("https://a.b", "https://c"),
        ),
        (
            "PGQUEUE_ADMIN_ALLOWED_HOSTS",
            "a.example, *.b.example:8443,",
            "allowed_hosts",
            ("a.example", "*.b.example:8443"),
        ),
        ("PGQUEUE_ADMIN_PUBLIC_METRICS", "yes", "public_metrics", True),
        ("PGQUEUE_ADMIN_PUBLIC_HEALTH", " ON ", "public_health", True),
        ("PGQUEUE_ADMIN_MAX_BODY_BYTES", "4096", "max_body_bytes", 4096),
        ("PGQUEUE_ADMIN_ALERT_BACKLOG", "100", "alert_backlog", 100.0),
        ("PGQUEUE_ADMIN_ALERT_FAILURES", "5", "alert_failures", 5.0),
        ("PGQUEUE_ADMIN_ALERT_FAILURES_WINDOW", "60", "alert_failures_window", 60.0),
        ("PGQUEUE_ADMIN_ALERT_NO_WORKER", "120", "alert_no_worker", 120.0),
        ("PGQUEUE_ADMIN_ALERT_INTERVAL", "15", "alert_interval", 15.0),
        (
            "PGQUEUE_ADMIN_ALERT_WEBHOOK",
            "http://127.0.0.1:9/hook",
            "alert_webhook",
            "http://127.0.0.1:9/hook",
        ),
        ("PGQUEUE_ADMIN_ALERT_WEBHOOK_HEADERS", '{"X-Id": 7}', "alert_webhook_headers", {"X-Id": "7"}),
    ],
)
def test_each_admin_variable_is_parsed(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, field: str, expected: object
) -> None:
    assert AdminEnv.variable(field) == variable
    monkeypatch.setenv(variable, raw)
    assert getattr(AdminEnv.load(), field) == expected
    assert getattr(AdminEnv.load({variable: raw}), field) == expected


def test_unset_empty_or_blank_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    unset = AdminEnv.load()
    assert (unset.token, unset.allowed_hosts, unset.public_metrics) == (None, (), False)
    assert unset.max_body_bytes is None
    for name in ("TOKEN", "ALLOWED_HOSTS", "PUBLIC_METRICS"):
        monkeypatch.setenv(f"PGQUEUE_ADMIN_{name}", "")
    for name in ("MAX_BODY_BYTES", "ALERT_BACKLOG", "ALERT_WEBHOOK_HEADERS"):
        monkeypatch.setenv(f"PGQUEUE_ADMIN_{name}", "  ")
    assert AdminEnv.load() == unset


def test_an_unrecognised_flag_keeps_the_endpoint_private(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_ADMIN_PUBLIC_METRICS", "enabled")
    monkeypatch.setenv("PGQUEUE_ADMIN_PUBLIC_HEALTH", "off")
    assert (AdminEnv.load().public_metrics, AdminEnv.load().public_health) == (False, False)


@pytest.mark.parametrize(
    ("variable", "raw", "reason"),
    [
        ("PGQUEUE_ADMIN_MAX_BODY_BYTES", "1MB", "integer"),
        ("PGQUEUE_ADMIN_ALERT_BACKLOG", "lots", "number"),
        ("PGQUEUE_ADMIN_ALERT_INTERVAL", "often", "number"),
        ("PGQUEUE_ADMIN_ALERT_WEBHOOK_HEADERS", "[1, 2]", "JSON object"),
        ("PGQUEUE_ADMIN_ALERT_WEBHOOK_HEADERS", "{nope", "property name"),
    ],
)
def test_a_malformed_admin_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, reason: str
) -> None:
    monkeypatch.setenv(variable, raw)
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as caught:
        AdminEnv.load()
    assert time.monotonic() - started < 1.0
    message = str(caught.value)
    assert f"{variable}={raw!r}" in message and reason in message and "\n" not in message, message


def test_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AdminOptions.from_env() == AdminOptions()
    monkeypatch.setenv("PGQUEUE_ADMIN_PUBLIC_METRICS", "1")
    monkeypatch.setenv("PGQUEUE_ADMIN_PUBLIC_HEALTH", "true")
    monkeypatch.setenv("PGQUEUE_ADMIN_MAX_BODY_BYTES", "4096")
    options = AdminOptions.from_env()
    assert (options.public_metrics, options.public_health, options.max_body_bytes) == (True, True, 4096)
    # A mapping given replaces os.environ.
    assert AdminOptions.from_env({}).max_body_bytes == DEFAULT_MAX_BODY_BYTES


def test_explicit_options_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_ADMIN_PUBLIC_METRICS", "1")
    monkeypatch.setenv("PGQUEUE_ADMIN_MAX_BODY_BYTES", "4096")
    options = AdminOptions.from_env(public_metrics=False, max_body_bytes=2048, page_size=20, db_timeout=None)
    assert (options.public_metrics, options.max_body_bytes, options.page_size) == (False, 2048, 20)
    assert options.db_timeout == AdminOptions().db_timeout
    assert AdminEnv.load(token=TOKEN, user=None).token == TOKEN


def test_out_of_range_options_are_refused_as_arguments_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_ADMIN_MAX_BODY_BYTES", "10")
    with pytest.raises(ConfigurationError, match="max_body_bytes must be within"):
        AdminOptions.from_env()
    monkeypatch.setenv("PGQUEUE_ADMIN_MAX_BODY_BYTES", "1MB")
    with pytest.raises(ConfigurationError, match="PGQUEUE_ADMIN_MAX_BODY_BYTES='1MB'"):
        AdminOptions.from_env()


def test_a_malformed_alert_variable_does_not_stop_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each reader needs its own variables only, as when each read them by hand."""
    monkeypatch.setenv("PGQUEUE_ADMIN_ALERT_BACKLOG", "lots")
    monkeypatch.setenv("PGQUEUE_ADMIN_PUBLIC_HEALTH", "1")
    assert AdminOptions.from_env().public_health
    assert AdminEnv.load(only=("token",)).alert_backlog is None
    with pytest.raises(ConfigurationError, match="PGQUEUE_ADMIN_ALERT_BACKLOG"):
        AdminEnv.load(only=("alert_backlog",))
