"""Jobs claimed ahead into the worker's buffer: cancelled there, handed back on shutdown."""

from __future__ import annotations

import asyncio
import time

from pgqueue import JobState, Queue
from pgqueue.worker import AsyncWorker


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_buffered_jobs_can_be_cancelled_and_are_handed_back_on_stop(queue: Queue) -> None:
    started: list[int] = []

    @queue.task(queue="slow")
    async def slow(n: int) -> None:
        started.append(n)
        await asyncio.sleep(0.6)

    ids = [slow.enqueue(n=n) for n in range(4)]
    worker = AsyncWorker(
        queue,
        queues=("slow",),
        concurrency=1,
        prefetch=3,
        install_signal_handlers=False,
        grace_period=5,
    )
    run = asyncio.create_task(worker.run())
    try:
        # One running (its handler has begun), three waiting in memory: the claim of all four
        # comes first, the handler's start a moment later.
        await _until(lambda: worker.stats.claimed == 4 and started == [0])
        assert await asyncio.to_thread(queue.cancel, ids[2])
        await _until(lambda: queue.get_job(ids[2]).state is JobState.CANCELLED, timeout=2)
        await _until(lambda: started == [0, 1])
        worker.stop()
        await asyncio.wait_for(run, 10)
    finally:
        worker.stop()
        await asyncio.gather(run, return_exceptions=True)

    jobs = [queue.get_job(i) for i in ids]
    assert [j.state for j in jobs] == [
        JobState.COMPLETED,
        JobState.COMPLETED,
        JobState.CANCELLED,
        JobState.QUEUED,
    ]
    assert 2 not in started and 3 not in started  # the cancelled one never ran
    assert jobs[3].attempts == 0  # handed back without spending an attempt
    assert jobs[3].worker_id is None
