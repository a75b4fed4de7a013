"""A ``pgqueue worker`` process freezes its start-up heap and still frees what handlers leave."""

from __future__ import annotations

import pytest
import worker_app
from worker_helpers import Db, Workers, wait_until

from pgqueue import JobSpec

pytestmark = pytest.mark.slow

CYCLES = 400


def test_a_worker_process_freezes_its_start_up_heap_and_still_frees_the_cycles_handlers_leave(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    worker = wprocs.start("--concurrency", "20")
    wprocs.wait_registered(wdb, worker)
    # 40 MB left in reference cycles, then enough ordinary jobs for the collector to run meanwhile.
    jobs = [JobSpec("leave_cycle", {"size": 100_000}) for _ in range(CYCLES)]
    jobs += [JobSpec("noop", {}) for _ in range(3_000)]
    wapp.queue.enqueue_many(jobs)
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == len(jobs),
        60,
        lambda: f"{wdb.states()}\n{worker.log_tail()}",
    )
    heap = wapp.queue.enqueue("heap", {})
    rows = wait_until(
        lambda: wdb.rows("SELECT state, result FROM {finished} WHERE id = %s", (heap,)),
        10,
        lambda: f"{wdb.states()}\n{worker.log_tail()}",
    )
    assert rows[0][0] == "completed", rows
    state = rows[0][1]  # jsonb, decoded
    assert state["frozen"] > 10_000, state  # the app, its libraries and pgqueue, frozen at start
    assert state["left"] == CYCLES
    assert state["alive"] < CYCLES // 10, state  # the rest were collected as the jobs ran
    assert worker.alive()
