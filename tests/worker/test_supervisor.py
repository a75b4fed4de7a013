"""The supervisor that ``pgqueue worker --with-scheduler`` and ``pgqueue dev`` share: a worker,
the scheduler and services in one process, started and stopped in order (real worker, real
scheduler, real database)."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
import worker_app
from worker_helpers import Db, wait_for_db

from pgqueue import JobSpec
from pgqueue.scheduler import Scheduler
from pgqueue.worker import AsyncWorker
from pgqueue.worker.supervisor import Service, Supervisor

pytestmark = pytest.mark.slow


async def test_stop_drains_the_worker_then_stops_services_and_the_scheduler(
    wapp: worker_app.App, wdb: Db
) -> None:
    events: list[str] = []
    stopped = asyncio.Event()

    async def beside() -> None:
        events.append("service started")
        await stopped.wait()
        events.append("service ended")

    wapp.queue.declared_schedules.clear()
    wapp.queue.schedule("record", {"note": "tick"}, every=timedelta(hours=1), name="hourly")
    scheduler = Scheduler(wapp.queue)
    worker = AsyncWorker(wapp.queue, install_signal_handlers=False, queues=("default",), concurrency=4)
    supervisor = Supervisor(worker, scheduler=scheduler, services=[Service("beside", beside, stopped.set)])
    task = asyncio.create_task(supervisor.run())
    try:
        await wait_for_db(wdb, f"SELECT count(*) FROM {{workers}} WHERE id = '{worker.id}'", 1, 15)
        await wait_for_db(wdb, "SELECT count(*) FROM {schedules} WHERE name = 'hourly'", 1, 10)
        ids = wapp.queue.enqueue_many([JobSpec("record", {"sleep": 0.2}) for _ in range(4)])
        await wait_for_db(wdb, "SELECT count(*) FROM {jobs} WHERE state = 'running'", 4, 10)
        supervisor.stop()
        await asyncio.wait_for(task, 15)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await wapp.aclose()
    # The jobs in hand were finished before the rest stopped; the worker deregistered.
    assert wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed' AND id = ANY(%s)", [ids]) == 4
    assert wdb.one("SELECT count(*) FROM {workers}") == 0
    assert events == ["service started", "service ended"]
    assert not [t for t in threading.enumerate() if t.name == "APScheduler"]  # its thread ended


async def test_a_failing_service_stops_the_worker_and_is_raised(wapp: worker_app.App, wdb: Db) -> None:
    async def broken() -> None:
        await asyncio.sleep(0.5)
        raise OSError("address already in use")

    worker = AsyncWorker(wapp.queue, install_signal_handlers=False, queues=("default",))
    supervisor = Supervisor(worker, services=[Service("dashboard", broken, lambda: None)])
    try:
        with pytest.raises(OSError, match="address already in use"):
            await asyncio.wait_for(supervisor.run(), 15)
    finally:
        await wapp.aclose()
    assert wdb.one("SELECT count(*) FROM {workers}") == 0  # the worker stopped and deregistered
