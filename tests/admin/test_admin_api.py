"""The admin's JSON API against a real PostgreSQL: every read and every action."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from admin_support import AUTH, TOKEN, bury, insert_job
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pgqueue import Queue
from pgqueue.admin import AdminAuth, create_admin_router, mask_keys


def get(client: TestClient, path: str, **params: Any) -> Any:
    response = client.get(path, headers=AUTH, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def post(client: TestClient, path: str, status: int = 200, **kwargs: Any) -> Any:
    response = client.post(path, headers=AUTH, **kwargs)
    assert response.status_code == status, response.text
    return response.json()


def queue_named(client: TestClient, name: str) -> dict[str, Any]:
    return next(q for q in get(client, "/api/queues")["queues"] if q["name"] == name)


# ---------------------------------------------------------------------------- queues


def test_queue_counts_by_state(client: TestClient, seeded: dict[str, int]) -> None:
    email = queue_named(client, "email")
    assert email["counts"] == {
        "queued": 2,
        "delayed": 2,
        "retrying": 1,
        "running": 1,
        "completed": 3,
        "cancelled": 1,
        "dead": 1,
    }
    reports = queue_named(client, "reports")
    assert reports["counts"]["completed"] == 1 and reports["counts"]["dead"] == 1


def test_queue_timings_and_throughput(client: TestClient, seeded: dict[str, int]) -> None:
    body = get(client, "/api/queues")
    email = next(q for q in body["queues"] if q["name"] == "email")
    assert body["throughput_minutes"] == len(email["throughput"]) == 30
    assert sum(email["throughput"]) == 3 and email["throughput"][-1] == 3
    assert email["completed_recently"] == 3
    assert email["avg_run_seconds"] == pytest.approx(0.2, abs=0.01)
    assert 0.28 <= email["p95_run_seconds"] <= 0.3
    assert email["oldest_waiting_seconds"] >= 0
    assert email["paused"] is False and email["concurrency"] is None


def test_one_queue_and_unknown_queue(client: TestClient, seeded: dict[str, int]) -> None:
    assert get(client, "/api/queues/reports")["name"] == "reports"
    missing = client.get("/api/queues/nope", headers=AUTH)
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert client.get("/api/queues/bad name!", headers=AUTH).status_code == 422


def test_pause_resume_and_limits(client: TestClient, pgqueue_queue: Queue) -> None:
    assert post(client, "/api/queues/email/pause")["paused"] is True
    assert queue_named(client, "email")["paused"] is True
    assert post(client, "/api/queues/email/resume")["paused"] is False

    limits = client.patch(
        "/api/queues/email/limits", headers=AUTH, json={"concurrency": 3, "rate_limit": 2.5}
    )
    assert limits.json() == {"name": "email", "paused": False, "concurrency": 3, "rate_limit": 2.5}
    # Omitted keeps, null removes.
    cleared = client.patch("/api/queues/email/limits", headers=AUTH, json={"concurrency": None})
    assert cleared.json()["concurrency"] is None and cleared.json()["rate_limit"] == 2.5
    for bad in ({"concurrency": 0}, {"rate_limit": -1}, {"colour": "red"}):
        response = client.patch("/api/queues/email/limits", headers=AUTH, json=bad)
        assert response.status_code == 422, bad


# ---------------------------------------------------------------------------- jobs


def test_job_list_filters(client: TestClient, seeded: dict[str, int]) -> None:
    def ids(**params: Any) -> set[int]:
        return {j["id"] for j in get(client, "/api/jobs", **params)["jobs"]}

    assert ids(state="dead") == {seeded["dead"], seeded["reports_dead"]}
    assert ids(state="retrying") == {seeded["retrying"]}
    assert ids(state="delayed") == {seeded["delayed"], seeded["retrying"]}
    assert ids(state="queued", queue="email") == {seeded["queued"], seeded["queued2"]}
    assert ids(task="build_report") == {seeded["reports_completed"], seeded["reports_dead"]}
    assert ids(queue="reports", state="completed") == {seeded["reports_completed"]}
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert ids(created_after=future) == set()
    assert len(ids(created_before=future)) == len(seeded)
    dead = get(client, "/api/jobs", state="dead", queue="email")["jobs"][0]
    assert dead["last_error"] == "smtp down" and dead["finished_at"] is not None


def test_job_list_keyset_pagination(client: TestClient, pgqueue_queue: Queue) -> None:
    with pgqueue_queue.connection() as c:
        made = [insert_job(c, pgqueue_queue.schema, state="completed") for _ in range(23)]
        made += [bury(c, pgqueue_queue.schema) for _ in range(4)]
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 10}
        if cursor is not None:
            params["before_id"] = cursor
        page = get(client, "/api/jobs", **params)
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(made, reverse=True)
    assert get(client, "/api/jobs", limit=27)["next_cursor"] is None


def test_job_detail_with_errors_and_redaction(client: TestClient, seeded: dict[str, int]) -> None:
    queued = get(client, f"/api/jobs/{seeded['queued']}")
    assert queued["args"] == {"to": "a@b.c", "password": "[redacted]"}
    assert queued["state"] == "queued" and queued["errors"] == []

    retrying = get(client, f"/api/jobs/{seeded['retrying']}")
    assert retrying["state"] == "delayed" and retrying["attempts"] == 1
    [attempt] = retrying["errors"]
    assert attempt["type"] == "ValueError" and "smtp down" in attempt["traceback"]

    completed = get(client, f"/api/jobs/{seeded['completed0']}")
    assert completed["result"] == {"ok": True, "token": "[redacted]"}
    assert completed["started_at"] < completed["finished_at"]

    dead = get(client, f"/api/jobs/{seeded['dead']}")
    assert dead["state"] == "dead" and len(dead["errors"]) == 3
    assert dead["args"]["api_key"] == "[redacted]"

    running = get(client, f"/api/jobs/{seeded['running']}")
    assert running["worker_id"] == "w1" and running["lease_expires_at"] is not None
    assert client.get("/api/jobs/999999999", headers=AUTH).status_code == 404
    assert client.get("/api/jobs/0", headers=AUTH).status_code == 422


def test_retry_depends_on_state(client: TestClient, seeded: dict[str, int]) -> None:
    moved = post(client, f"/api/jobs/{seeded['dead']}/retry")
    assert moved == {"job_id": seeded["dead"], "action": "moved_from_dead_letter"}
    back = get(client, f"/api/jobs/{seeded['dead']}")
    assert back["state"] == "queued" and back["attempts"] == 0 and len(back["errors"]) == 3

    now = post(client, f"/api/jobs/{seeded['delayed']}/retry")
    assert now == {"job_id": seeded["delayed"], "action": "run_now"}
    assert get(client, f"/api/jobs/{seeded['delayed']}")["state"] == "queued"

    copy = post(client, f"/api/jobs/{seeded['completed0']}/retry")
    assert copy["action"] == "copied" and copy["job_id"] != seeded["completed0"]
    fresh = get(client, f"/api/jobs/{copy['job_id']}")
    assert (fresh["state"], fresh["task"], fresh["queue"]) == ("queued", "send_email", "email")
    assert get(client, f"/api/jobs/{seeded['completed0']}")["state"] == "completed"

    busy = client.post(f"/api/jobs/{seeded['running']}/retry", headers=AUTH)
    assert busy.status_code == 409 and "running" in busy.json()["detail"]
    assert client.post("/api/jobs/987654321/retry", headers=AUTH).status_code == 404


def test_retry_copy_respects_a_live_unique_key(client: TestClient, pgqueue_queue: Queue) -> None:
    with pgqueue_queue.connection() as c:
        done = insert_job(c, pgqueue_queue.schema, state="completed", unique_key="k1")
        insert_job(c, pgqueue_queue.schema, unique_key="k1")
    response = client.post(f"/api/jobs/{done}/retry", headers=AUTH)
    assert response.status_code == 409 and "unique key" in response.json()["detail"]


def test_cancel(client: TestClient, seeded: dict[str, int]) -> None:
    assert "cancelled" in post(client, f"/api/jobs/{seeded['queued']}/cancel")["message"]
    assert get(client, f"/api/jobs/{seeded['queued']}")["state"] == "cancelled"
    running = post(client, f"/api/jobs/{seeded['running']}/cancel")
    assert "requested" in running["message"]
    assert get(client, f"/api/jobs/{seeded['running']}")["cancel_requested"] is True
    late = client.post(f"/api/jobs/{seeded['completed1']}/cancel", headers=AUTH)
    assert late.status_code == 409


def test_delete(client: TestClient, seeded: dict[str, int]) -> None:
    for key in ("completed1", "dead"):
        response = client.delete(f"/api/jobs/{seeded[key]}", headers=AUTH)
        assert response.status_code == 200, response.text
        assert client.get(f"/api/jobs/{seeded[key]}", headers=AUTH).status_code == 404
    assert client.delete(f"/api/jobs/{seeded['running']}", headers=AUTH).status_code == 409
    assert client.delete("/api/jobs/55555555", headers=AUTH).status_code == 404


def test_clean_finished_older_than(client: TestClient, seeded: dict[str, int]) -> None:
    assert post(client, "/api/jobs/clean", json={"older_than_seconds": 3600})["count"] == 0
    cleaned = post(client, "/api/jobs/clean", json={"older_than_seconds": 0, "queue": "email"})
    assert cleaned["count"] == 4  # three completed, one cancelled
    assert queue_named(client, "reports")["counts"]["completed"] == 1
    dead = post(client, "/api/jobs/clean", json={"older_than_seconds": 0, "states": ["dead"]})
    assert dead["count"] == 2
    bad = client.post("/api/jobs/clean", headers=AUTH, json={"older_than_seconds": -1})
    assert bad.status_code == 422


def test_clean_works_in_batches(pgqueue_queue: Queue) -> None:
    from admin_support import admin_app

    from pgqueue.admin import AdminOptions

    with pgqueue_queue.connection() as c:
        for _ in range(7):
            insert_job(c, pgqueue_queue.schema, state="completed")
    app = admin_app(pgqueue_queue, options=AdminOptions(clean_batch=3))
    with TestClient(app) as c:
        response = c.post("/api/jobs/clean", headers=AUTH, json={"older_than_seconds": 0})
    assert response.json()["count"] == 7


# ---------------------------------------------------------------------------- dead letter


def test_dead_letter_routes(client: TestClient, seeded: dict[str, int]) -> None:
    listed = get(client, "/api/dead", queue="email")["jobs"]
    assert [j["id"] for j in listed] == [seeded["dead"]]
    assert get(client, f"/api/dead/{seeded['dead']}")["state"] == "dead"
    assert client.get(f"/api/dead/{seeded['queued']}", headers=AUTH).status_code == 404

    assert post(client, f"/api/dead/{seeded['dead']}/retry")["action"] == "moved_from_dead_letter"
    assert client.post(f"/api/dead/{seeded['dead']}/retry", headers=AUTH).status_code == 404

    discarded = client.delete(f"/api/dead/{seeded['reports_dead']}", headers=AUTH)
    assert discarded.status_code == 200
    assert client.delete(f"/api/dead/{seeded['reports_dead']}", headers=AUTH).status_code == 404


def test_retry_all_dead_of_a_queue(client: TestClient, pgqueue_queue: Queue) -> None:
    with pgqueue_queue.connection() as c:
        for _ in range(3):
            bury(c, pgqueue_queue.schema, queue="email")
        bury(c, pgqueue_queue.schema, queue="other")
    assert post(client, "/api/queues/email/retry-dead")["count"] == 3
    assert queue_named(client, "email")["counts"]["dead"] == 0
    assert queue_named(client, "other")["counts"]["dead"] == 1


def test_retry_failed_jobs_of_a_queue_now(client: TestClient, seeded: dict[str, int]) -> None:
    assert get(client, f"/api/jobs/{seeded['retrying']}")["state"] == "delayed"
    assert post(client, "/api/queues/email/retry-failed")["count"] == 1
    assert get(client, f"/api/jobs/{seeded['retrying']}")["state"] == "queued"
    assert post(client, "/api/queues/email/retry-failed")["count"] == 0


# ---------------------------------------------------------------------------- fleet


def test_workers_with_jobs_in_hand(client: TestClient, seeded: dict[str, int]) -> None:
    workers = {w["id"]: w for w in get(client, "/api/workers")["workers"]}
    assert workers["w1"]["alive"] and workers["w1"]["running_jobs"] == 1
    assert workers["w1"]["job_ids"] == [seeded["running"]]
    assert not workers["w2"]["alive"] and workers["w2"]["heartbeat_age_seconds"] > 500


def test_schedules_list_and_pause(client: TestClient, seeded: dict[str, int]) -> None:
    schedules = {s["name"]: s for s in get(client, "/api/schedules")["schedules"]}
    nightly = schedules["nightly-report"]
    assert nightly["cron"] == "0 3 * * *" and nightly["args"] == {"secret": "[redacted]"}
    assert schedules["tick"]["every_seconds"] == 60
    assert post(client, "/api/schedules/tick/pause")["paused"] is True
    assert {s["name"]: s for s in get(client, "/api/schedules")["schedules"]}["tick"]["paused"]
    assert post(client, "/api/schedules/tick/resume")["paused"] is False
    assert client.post("/api/schedules/none/pause", headers=AUTH).status_code == 404


# ---------------------------------------------------------------------------- embedding


def test_custom_redaction_hook_covers_api_and_dashboard(pgqueue_queue: Queue) -> None:
    from admin_support import admin_app

    with pgqueue_queue.connection() as c:
        job = insert_job(
            c,
            pgqueue_queue.schema,
            args={"email": "me@x.y", "name": "Ann"},
            state="completed",
            result={"email": "me@x.y"},
        )
    app = admin_app(pgqueue_queue, redact=mask_keys("email"))
    with TestClient(app) as c:
        body = c.get(f"/api/jobs/{job}", headers=AUTH).json()
        page = c.get(f"/jobs/{job}", headers=AUTH).text
    assert body["args"] == {"email": "[redacted]", "name": "Ann"}
    assert body["result"] == {"email": "[redacted]"}
    assert "me@x.y" not in page and "[redacted]" in page


def test_router_mounts_under_a_prefix(pgqueue_queue: Queue, seeded: dict[str, int]) -> None:
    host = FastAPI()
    host.include_router(create_admin_router(pgqueue_queue, auth=AdminAuth(token=TOKEN)), prefix="/admin")
    with TestClient(host) as c:
        assert c.get("/admin/api/queues", headers=AUTH).status_code == 200
        page = c.get("/admin/", headers=AUTH)
        assert page.status_code == 200 and 'href="/admin/static/admin.css"' in page.text
        assert c.get("/admin/", follow_redirects=False).headers["location"] == "/admin/login"
        assert c.get("/admin/health/live").json() == {"status": "ok"}


def test_async_queue_is_accepted(postgres_dsn: str, pgqueue_schema: str) -> None:
    from pgqueue import AsyncQueue

    router = create_admin_router(AsyncQueue(postgres_dsn, schema=pgqueue_schema), auth=AdminAuth(token=TOKEN))
    host = FastAPI()
    host.include_router(router)
    with TestClient(host) as c:
        assert c.get("/api/queues", headers=AUTH).json()["queues"] == []
    assert TOKEN  # the module's token is what the router was given
