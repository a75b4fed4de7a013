"""The worker embedded in an app's own event loop: ``await AsyncWorker(queue, ...).run()``."""

from __future__ import annotations

import asyncio

import pytest
import worker_app
from worker_helpers import Db, wait_for_db

from pgqueue import AsyncQueue, JobSpec, SchemaNotReadyError
from pgqueue.worker import AsyncWorker

pytestmark = pytest.mark.slow


async def test_async_worker_runs_jobs_in_the_apps_loop_and_stops_cleanly(
    wapp: worker_app.App, wdb: Db
) -> None:
    w = AsyncWorker(wapp.queue, install_signal_handlers=False, queues=("default",), concurrency=4)
    task = asyncio.create_task(w.run())
    try:
        await wait_for_db(wdb, f"SELECT count(*) FROM {{workers}} WHERE id = '{w.id}'", 1, 15)
        ids = wapp.queue.enqueue_many([JobSpec("record", {"sleep": 0.05}) for _ in range(8)])
        await wait_for_db(wdb, "SELECT count(*) FROM {finished} WHERE state = 'completed'", len(ids), 10)
        w.stop()
        await asyncio.wait_for(task, 10)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await wapp.aclose()
    assert w.stats.completed == len(ids)
    assert w.stats.claimed == len(ids)
    assert wdb.one("SELECT count(*) FROM {workers}") == 0  # deregistered on the way out


async def test_stop_right_after_starting_run_is_not_lost(wapp: worker_app.App, wdb: Db) -> None:
    """``task = create_task(w.run()); w.stop(); await task`` must return: an app that shuts down
    right after starting its worker (or a stop from another thread while ``run`` is starting)
    must not leave the worker running forever."""
    w = AsyncWorker(wapp.queue, install_signal_handlers=False, queues=("default",))
    task = asyncio.create_task(w.run())
    w.stop()
    try:
        done, _ = await asyncio.wait({task}, timeout=3)
        if not done:
            w.stop()  # now that run() has started, a stop is heard: clean up, then fail
            await asyncio.wait_for(task, 10)
        assert done, "run() ignored the stop() made before it got going and kept running"
        task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await wapp.aclose()


async def test_a_worker_on_an_unmigrated_schema_says_run_migrate(postgres_dsn: str, new_schema: str) -> None:
    """Refused by name (SchemaNotReadyError), not by a failure of its own shutdown."""
    queue = AsyncQueue(postgres_dsn, schema=new_schema)
    w = AsyncWorker(queue, install_signal_handlers=False, queues=("default",))
    with pytest.raises(SchemaNotReadyError, match="run `pgqueue migrate`"):
        await asyncio.wait_for(w.run(), 30)
    await queue.close()


async def test_a_worker_stopped_before_it_reached_the_database_returns_cleanly() -> None:
    """Started while nothing listens (it retries), then stopped: run() returns, nothing raised."""
    queue = AsyncQueue("postgresql://nobody@127.0.0.1:9/none")
    w = AsyncWorker(queue, install_signal_handlers=False, queues=("default",))
    running = asyncio.create_task(w.run())
    await asyncio.sleep(0.5)  # a failed attempt or two
    assert not running.done()
    w.stop()
    await asyncio.wait_for(running, 10)
    await queue.close()
