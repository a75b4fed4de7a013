"""The dashboard in a real headless Chromium: sign in, read the counts, retry a dead job, watch
it complete under a real worker. Screenshots land in $PGQUEUE_SCREENSHOTS if set (to refresh the
docs: PGQUEUE_SCREENSHOTS=docs/screenshots python -m pytest tests/test_admin_browser.py), else in
the test's temporary directory.

Needs Debian's chromium (``apt-get install -y chromium``) and the ``playwright`` package; the
browser Playwright would download is not used. Without chromium this test fails, on purpose:
a dashboard nobody has seen work is not tested.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from admin_support import TOKEN, admin_app, bury, error, insert_job

from pgqueue import Queue
from pgqueue.admin import AdminOptions
from pgqueue.worker import AsyncWorker, WorkerSettings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Chromium is not installed: run `apt-get install -y chromium` (Debian's "
            "package; the dashboard test drives it through Playwright)",
            pytrace=False,
        )
    return path


class Served:
    """The admin app under uvicorn on 127.0.0.1 (a random free port), in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class BackgroundWorker:
    """A real AsyncWorker on its own event loop, in a thread."""

    def __init__(self, queue: Queue, queues: tuple[str, ...]) -> None:
        self.worker = AsyncWorker(
            queue,
            WorkerSettings(queues=queues, poll_interval=0.2, concurrency=2),
            install_signal_handlers=False,
        )
        self.thread = threading.Thread(target=asyncio.run, args=(self.worker.run(),), daemon=True)

    def __enter__(self) -> BackgroundWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        while self.thread.is_alive():
            self.worker.stop()
            self.thread.join(0.2)


@pytest.fixture
def dashboard(pgqueue_queue: Queue) -> Iterator[tuple[str, dict[str, int]]]:
    @pgqueue_queue.task(name="billing.charge", queue="billing")
    def charge(order: int, card_number: str) -> dict[str, Any]:
        return {"charged": order}

    s = pgqueue_queue.schema
    with pgqueue_queue.connection() as c:
        for n in range(3):
            insert_job(
                c,
                s,
                queue="billing",
                task="billing.charge",
                state="completed",
                args={"order": n, "card_number": "4111"},
                result={"charged": n},
                finished_ago=30 * n,
            )
        insert_job(
            c,
            s,
            queue="billing",
            task="billing.charge",
            run_in=3600,
            args={"order": 9, "card_number": "4111"},
        )
        dead = bury(
            c,
            s,
            queue="billing",
            task="billing.charge",
            args={"order": 7, "card_number": "4111 1111 1111 1111"},
        )
        # Scenery for the screenshots: a queue no worker here serves, with some history.
        for n in range(40):
            insert_job(
                c,
                s,
                queue="email",
                task="email.send",
                state="completed",
                args={"to": f"user{n}@example.com"},
                ran_for=0.05 + (n % 7) / 20,
                finished_ago=60 * (n % 23) + n,
            )
        insert_job(
            c,
            s,
            queue="email",
            task="email.send",
            run_in=120,
            attempts=1,
            errors=[error(1, "SMTP 451: try again later")],
        )
        insert_job(c, s, queue="email", task="email.send")
        bury(c, s, queue="email", task="email.send", args={"to": "bounce@example.com"})
        c.execute(f"""INSERT INTO "{s}".schedules (name, task, queue, cron, next_fire_at,
                          last_fire_at)
                      VALUES ('nightly-invoices', 'billing.invoice', 'billing', '0 2 * * *',
                              now() + interval '8 hours', now() - interval '16 hours')""")
    app = admin_app(pgqueue_queue, options=AdminOptions(refresh_seconds=1))
    with Served(app) as served, BackgroundWorker(pgqueue_queue, ("billing",)):
        yield served.url, {"dead": dead}


def test_retry_a_dead_job_from_the_dashboard(dashboard: tuple[str, dict[str, int]], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, ids = dashboard
    shots = Path(os.environ.get("PGQUEUE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 820})
        page.on("dialog", lambda dialog: dialog.accept())
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        page.goto(url + "/")
        expect(page).to_have_url(url + "/login")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")

        row = page.locator('tr[data-queue="billing"]')
        expect(row.locator('[data-count="completed"]')).to_have_text("3")
        expect(row.locator('[data-count="delayed"]')).to_have_text("1")
        expect(row.locator('[data-count="dead"]')).to_have_text("1")
        expect(row.locator(".spark polyline")).to_have_count(1)
        page.screenshot(path=str(shots / "overview.png"), full_page=True)

        page.click("text=Dead letter")
        expect(page.locator(f'tr[data-job="{ids["dead"]}"]')).to_be_visible()
        page.screenshot(path=str(shots / "dead-letter.png"), full_page=True)

        page.click(f'tr[data-job="{ids["dead"]}"] >> text={ids["dead"]}')
        expect(page.locator("#job-state")).to_have_text("dead")
        expect(page.locator("#job-args")).to_contain_text("[redacted]")  # card_number
        expect(page.locator("#job-args")).not_to_contain_text("4111")
        page.screenshot(path=str(shots / "job-dead.png"), full_page=True)

        page.click("button:has-text('Retry')")  # confirmation accepted by the dialog handler
        expect(page.locator("#flash")).to_contain_text("moved from dead letter")
        expect(page.locator("#job-state")).to_have_text("completed", timeout=20_000)
        expect(page.locator("#job-result")).to_contain_text('"charged": 7')
        page.screenshot(path=str(shots / "job-completed.png"), full_page=True)

        page.click("text=Queues")
        expect(page.locator('tr[data-queue="billing"] [data-count="dead"]')).to_have_text("0")
        expect(page.locator('tr[data-queue="billing"] [data-count="completed"]')).to_have_text("4")
        browser.close()
    assert errors == []
