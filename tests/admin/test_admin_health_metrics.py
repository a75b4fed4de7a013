"""Health endpoints (live, ready, detailed with thresholds) and the Prometheus exposition."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from admin_support import AUTH, TOKEN, admin_app, error, insert_job
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pgqueue import Queue
from pgqueue.admin import AdminAuth, AdminOptions, AlertRule, AlertSettings
from pgqueue.migrate import head_revision, upgrade


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---------------------------------------------------------------------------- live / ready


def test_live_and_ready(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["schema_revision"] == ready.json()["head_revision"] == head_revision()


@pytest.fixture
def old_schema(postgres_dsn: str) -> Iterator[str]:
    name = f"pgq_old_{uuid.uuid4().hex[:8]}"
    upgrade(postgres_dsn, schema=name, revision="0001")
    yield name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def test_not_ready_when_the_schema_is_behind_or_missing(postgres_dsn: str, old_schema: str) -> None:
    for schema, expected in ((old_schema, "is at 0001"), ("pgq_never_migrated", "not migrated")):
        with Queue(postgres_dsn, schema=schema) as q, TestClient(admin_app(q)) as c:
            response = c.get("/health/ready")
            assert response.status_code == 503
            assert response.json()["database"] is True
            assert expected in response.json()["detail"]
            # The API says the same thing in a sentence, not a 500.
            api = c.get("/api/workers", headers=AUTH)
            if schema == "pgq_never_migrated":
                assert api.status_code == 503 and "pgqueue migrate" in api.json()["detail"]


def test_not_ready_when_the_database_is_down() -> None:
    dead = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    with Queue(dead) as q, TestClient(admin_app(q, options=AdminOptions(db_timeout=0.5))) as c:
        response = c.get("/health/ready")
        assert response.status_code == 503 and response.json()["database"] is False
        assert c.get("/health/live").status_code == 200
        assert c.get("/api/queues", headers=AUTH).status_code == 503
        metrics = samples(c.get("/metrics", headers=AUTH).text)
        assert metrics[("pgqueue_up", ())] == 0


# ---------------------------------------------------------------------------- detailed


def test_detailed_is_ok_without_thresholds(client: TestClient, seeded: dict[str, int]) -> None:
    response = client.get("/health/detailed", headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["breaches"] == [] and body["live_workers"] == 1
    email = next(q for q in body["queues"] if q["name"] == "email")
    assert email["backlog"] == 2 and email["failures"] == 4  # 1 retrying + 3 on the dead job
    assert email["worker_seen_seconds"] < 5


def test_detailed_is_503_when_a_threshold_is_crossed(pgqueue_queue: Queue, seeded: dict[str, int]) -> None:
    rules = (AlertRule(queue="email", backlog_above=1), AlertRule(no_worker_seconds=60))
    app = admin_app(
        pgqueue_queue, alerts=AlertSettings(rules=rules), options=AdminOptions(public_health=True)
    )
    with TestClient(app) as c:
        response = c.get("/health/detailed")  # public_health: no credentials needed
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert {(b["queue"], b["kind"]) for b in body["breaches"]} == {("email", "backlog")}
    # "reports" has no waiting job, so its stale worker is not a breach under "*".


# ---------------------------------------------------------------------------- metrics


def test_metrics_gauges(client: TestClient, seeded: dict[str, int]) -> None:
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = samples(response.text)
    assert m[("pgqueue_up", ())] == 1
    assert m[("pgqueue_jobs", (("queue", "email"), ("state", "queued")))] == 2
    assert m[("pgqueue_jobs", (("queue", "email"), ("state", "dead")))] == 1
    assert m[("pgqueue_jobs", (("queue", "reports"), ("state", "completed")))] == 1
    assert m[("pgqueue_queue_paused", (("queue", "email"),))] == 0
    assert m[("pgqueue_oldest_waiting_job_age_seconds", (("queue", "email"),))] >= 0
    assert m[("pgqueue_workers_alive", ())] == 1
    # Totals count from the admin's start: the seeded history is not replayed.
    assert m[("pgqueue_jobs_processed_total", (("outcome", "completed"), ("queue", "email")))] == 0


def test_metrics_counters_and_histogram_add_what_finished_between_scrapes(
    client: TestClient, pgqueue_queue: Queue
) -> None:
    with pgqueue_queue.connection() as c:
        insert_job(c, pgqueue_queue.schema, state="completed", finished_ago=3600)
    client.get("/metrics", headers=AUTH)  # the first scrape sets the starting point
    with pgqueue_queue.connection() as c:
        for ran in (0.02, 0.3, 7.0):
            insert_job(c, pgqueue_queue.schema, state="completed", ran_for=ran, finished_ago=0)
        insert_job(c, pgqueue_queue.schema, state="cancelled", finished_ago=0)
        insert_job(c, pgqueue_queue.schema, attempts=1, errors=[error(1)])
        from admin_support import bury

        bury(c, pgqueue_queue.schema)
    m = samples(client.get("/metrics", headers=AUTH).text)
    q = ("queue", "email")
    assert m[("pgqueue_jobs_processed_total", (("outcome", "completed"), q))] == 3
    assert m[("pgqueue_jobs_processed_total", (("outcome", "cancelled"), q))] == 1
    assert m[("pgqueue_jobs_processed_total", (("outcome", "dead"), q))] == 1
    assert m[("pgqueue_jobs_failed_total", (q,))] == 4  # one retrying + three on the dead job
    assert m[("pgqueue_job_run_seconds_count", (q,))] == 3
    assert m[("pgqueue_job_run_seconds_bucket", (("le", "0.025"), q))] == 1
    assert m[("pgqueue_job_run_seconds_bucket", (("le", "0.5"), q))] == 2
    assert m[("pgqueue_job_run_seconds_bucket", (("le", "+Inf"), q))] == 3
    assert m[("pgqueue_job_run_seconds_sum", (q,))] == pytest.approx(7.32, abs=0.01)
    # A third scrape with nothing new keeps the totals (counters never go down).
    again = samples(client.get("/metrics", headers=AUTH).text)
    assert again[("pgqueue_jobs_processed_total", (("outcome", "completed"), q))] == 3


def test_metrics_sum_abandoned_threads_of_live_workers(client: TestClient, pgqueue_queue: Queue) -> None:
    s = pgqueue_queue.schema
    with pgqueue_queue.connection() as c:
        c.execute(
            f"""INSERT INTO "{s}".workers (id, host, pid, queues, concurrency, heartbeat_at,
                    abandoned_threads)
                VALUES ('a', 'h', 1, '{{email}}', 4, now(), 2),
                       ('b', 'h', 2, '{{email}}', 4, now(), 1),
                       ('gone', 'h', 3, '{{email}}', 4, now() - interval '1 hour', 5)"""
        )
    m = samples(client.get("/metrics", headers=AUTH).text)
    assert m[("pgqueue_worker_abandoned_threads", ())] == 3  # the stale worker's 5 died with it


def test_public_metrics_option(pgqueue_queue: Queue) -> None:
    app = admin_app(pgqueue_queue, auth=AdminAuth(token=TOKEN), options=AdminOptions(public_metrics=True))
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 200
