"""Fixtures of the fault suite: servers and poolers of a test's own, and a clean environment
for the worker processes those tests start."""

from __future__ import annotations

import os

import pytest
from pgbouncer import pg_bouncer, pgbouncer_factory
from pgserver import pg_server, stopped_pg_server

__all__ = ["clean_worker_environment", "pg_bouncer", "pg_server", "pgbouncer_factory", "stopped_pg_server"]

# Variables of the test's own environment that tell the tests where things are, not how a
# worker behaves: they may reach the workers.
KEPT = ("PGQUEUE_PG_BIN", "PGQUEUE_PGBOUNCER", "PGQUEUE_TEST_DSN")


@pytest.fixture
def clean_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers inherit the test's environment: only what a test passes may configure them."""
    for name in list(os.environ):
        if name.startswith("PGQUEUE_") and name not in KEPT:
            monkeypatch.delenv(name)
    for name in ("PGAPPNAME", "PGCONNECT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
