"""A worker started on an empty queue must keep claiming cheaply when a big backlog lands.

A queue table swings from empty to millions of rows and back. A claim plan fixed while the table
was a page or two (a prepared statement's generic plan, chosen after a few executions) found the
claimed rows again with a sequential scan: harmless on ten rows, one full pass over the backlog
per claim on fifty thousand, and a worker at 90 % load fell behind for good.
"""

from __future__ import annotations

import asyncio

import pytest
import worker_app
from psycopg import sql
from worker_helpers import Db, wait_for_db

from pgqueue import JobSpec
from pgqueue.worker import AsyncWorker

pytestmark = pytest.mark.slow

BACKLOG = 20_000


def _jobs_rows_read_by_scans(wdb: Db) -> int:
    """Rows of the jobs table read by sequential scans so far (cumulative statistics)."""
    wdb.conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        wdb.one(
            "SELECT seq_tup_read FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
            [wdb.schema],
        )
    )


async def test_claims_never_rescan_a_backlog_that_arrived_after_the_worker_started(
    wapp: worker_app.App, wdb: Db
) -> None:
    # Autovacuum would re-plan at a random moment; keep the statistics from before the backlog.
    wdb.conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(wdb.t("jobs")))
    w = AsyncWorker(wapp.queue, install_signal_handlers=False, queues=("default",), concurrency=8)
    task = asyncio.create_task(w.run())
    try:
        await wait_for_db(wdb, f"SELECT count(*) FROM {{workers}} WHERE id = '{w.id}'", 1, 15)
        for n in range(1, 9):  # claims on a near-empty table: enough for a cached plan to settle
            wapp.queue.enqueue("noop")
            await wait_for_db(wdb, "SELECT count(*) FROM {finished}", n, 10)
        before = _jobs_rows_read_by_scans(wdb)
        wapp.queue.enqueue_many([JobSpec("noop") for _ in range(BACKLOG)])
        # A few hundred claims' worth; with a rescan per claim this takes minutes, not seconds.
        await wait_for_db(wdb, "SELECT count(*) >= 3008 FROM {finished} WHERE state = 'completed'", True, 60)
        w.stop()
        await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await wapp.aclose()
    # The worker's connections are closed: their backends have reported their statistics.
    await asyncio.sleep(1.0)
    scanned = _jobs_rows_read_by_scans(wdb) - before
    assert scanned < BACKLOG, f"claims read {scanned} job rows by sequential scans (a {BACKLOG} backlog)"
