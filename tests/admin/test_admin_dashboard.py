"""Dashboard pages rendered by the server (the browser test covers the script)."""

from __future__ import annotations

import re

from admin_support import AUTH, insert_job
from fastapi.testclient import TestClient

from pgqueue import Queue


def page(client: TestClient, path: str) -> str:
    response = client.get(path, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.text


def test_overview_shows_counts_workers_and_schedules(client: TestClient, seeded: dict[str, int]) -> None:
    html = page(client, "/")
    row = re.search(r'<tr data-queue="email">(.*?)</tr>', html, re.S)
    assert row is not None
    assert re.search(r'data-count="completed">3<', row.group(1))
    assert re.search(r'data-count="dead">1<', row.group(1))
    assert "<polyline" in row.group(1) and "3/min" in row.group(1)
    assert 'data-action="/api/queues/email/retry-dead"' in row.group(1)
    assert "<code>w1</code>" in html  # live worker with its jobs in hand
    assert "nightly-report" in html and "0 3 * * *" in html


def test_job_list_filters_and_pages(client: TestClient, pgqueue_queue: Queue) -> None:
    with pgqueue_queue.connection() as c:
        ids = [insert_job(c, pgqueue_queue.schema, state="completed") for _ in range(55)]
    first = page(client, "/jobs?state=completed&queue=email")
    assert f'data-job="{ids[-1]}"' in first and f'data-job="{ids[4]}"' not in first
    older = re.search(r'href="(/jobs\?[^"]*before_id=\d+)"', first)
    assert older is not None
    second = page(client, older.group(1).replace("&amp;", "&"))
    assert f'data-job="{ids[0]}"' in second and "Newest" in second
    assert "Older" not in second


def test_bad_filters_are_explained_not_fatal(client: TestClient) -> None:
    html = page(client, "/jobs?state=bogus&queue=not a queue&created_after=yesterday")
    assert "Ignored:" in html and "unknown state" in html and "not a date" in html


def test_dead_letter_page_and_job_pages(client: TestClient, seeded: dict[str, int]) -> None:
    dead = page(client, "/jobs?state=dead")
    assert "<h1>Dead letter</h1>" in dead and f'data-job="{seeded["dead"]}"' in dead
    detail = page(client, f"/jobs/{seeded['dead']}")
    assert "Failed attempts (3)" in detail and "ValueError" in detail
    assert "k-123" not in detail  # api_key redacted
    assert "No job with id 424242" in page(client, "/jobs/424242")


def test_static_files(client: TestClient) -> None:
    js = client.get("/static/admin.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/admin.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/../auth.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404
