"""The admin started while PostgreSQL is down, and the admin across a restart.

Both go through the queue's checked-out connections: a stale pooled connection is replaced
before anything is sent on it, and a pool that could not connect is rebuilt, so the admin
answers 503 within seconds while the database is away and 200 within seconds of its return.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from admin_support import TOKEN, admin_app
from fastapi.testclient import TestClient
from pgserver import PgServer, temporary_server

from pgqueue import Queue
from pgqueue.migrate import upgrade

SCHEMA = "pgq_admin_outage"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[PgServer]:
    with temporary_server() as s:
        upgrade(s.dsn(), schema=SCHEMA)
        yield s


def timed_get(client: TestClient, path: str) -> tuple[int, float]:
    began = time.monotonic()
    status = client.get(path, headers=HEADERS).status_code
    return status, time.monotonic() - began


def test_admin_started_while_the_database_is_down_serves_within_seconds_of_its_return(
    server: PgServer,
) -> None:
    server.stop()
    queue = Queue(server.dsn(), schema=SCHEMA, connect_wait=2)
    with TestClient(admin_app(queue), base_url="http://admin.test") as client:
        for path in ("/health/ready", "/api/jobs", "/api/queues"):
            status, took = timed_get(client, path)
            assert status == 503, path
            assert took < 5, f"{path} took {took:.1f}s to say the database is down"
        down_for = time.monotonic()
        time.sleep(6)  # longer than the queue's connect wait: its pool gave up and was retired
        server.start()
        up = time.monotonic()
        while True:
            status, _ = timed_get(client, "/api/jobs")
            if status == 200:
                break
            assert time.monotonic() - up < 5, f"still {status} 5 s after the database came back"
            time.sleep(0.1)
        recovered = time.monotonic() - up
        assert client.get("/health/ready").status_code == 200
    queue.close()
    print(f"\n[admin] down {up - down_for:.1f}s; answering 200 {recovered:.2f}s after the server was up")


def test_admin_across_an_immediate_restart_never_answers_500(server: PgServer) -> None:
    queue = Queue(server.dsn(), schema=SCHEMA)
    with TestClient(admin_app(queue), base_url="http://admin.test") as client:
        assert timed_get(client, "/api/jobs")[0] == 200
        server.restart("immediate")
        statuses = [timed_get(client, "/api/jobs")[0] for _ in range(5)]
    queue.close()
    assert statuses == [200] * 5, statuses
