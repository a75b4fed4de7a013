"""A ``pgqueue worker`` process freezes its start-up heap and still frees what handlers leave."""

from __future__ import annotations

import pytest
import worker_app
from worker_helpers import Db, WorkerProcess, Workers, wait_until

from pgqueue import JobSpec

pytestmark = pytest.mark.slow

CYCLES = 400
FILLER = 3_000  # ordinary jobs a round
ROUNDS = 20


def test_a_worker_process_freezes_its_start_up_heap_and_still_frees_the_cycles_handlers_leave(
    wapp: worker_app.App, wdb: Db, wprocs: Workers
) -> None:
    worker = wprocs.start("--concurrency", "20")
    wprocs.wait_registered(wdb, worker)
    # 40 MB left in reference cycles, then ordinary jobs, round after round, until the collector
    # has freed them. When it runs is its own heuristic (in some runs 40-160 of the cycles outlived
    # one round, left for an older generation, which is walked far less often), so the test does
    # not count on one number of jobs; a worker that never frees them fails after ROUNDS rounds.
    enqueue_and_wait(wapp, wdb, worker, [JobSpec("leave_cycle", {"size": 100_000})] * CYCLES)
    states = []
    for _ in range(ROUNDS):
        enqueue_and_wait(wapp, wdb, worker, [JobSpec("noop", {})] * FILLER)
        states.append(heap_state(wapp, wdb, worker))
        if states[-1]["alive"] < CYCLES // 10:
            break
    state = states[-1]
    assert state["frozen"] > 10_000, state  # the app, its libraries and pgqueue, frozen at start
    assert state["left"] == CYCLES
    assert state["alive"] < CYCLES // 10, states  # collected as the jobs ran
    assert worker.alive()


def enqueue_and_wait(wapp: worker_app.App, wdb: Db, worker: WorkerProcess, jobs: list[JobSpec]) -> None:
    ids = wapp.queue.enqueue_many(jobs)
    wait_until(
        lambda: (
            wdb.one("SELECT count(*) FROM {finished} WHERE id = ANY(%s) AND state = 'completed'", (ids,))
            == len(ids)
        ),
        60,
        lambda: f"{wdb.states()}\n{worker.log_tail()}",
    )


def heap_state(wapp: worker_app.App, wdb: Db, worker: WorkerProcess) -> dict[str, int]:
    """What the worker's ``heap`` task reports: objects frozen, cycles left, cycles alive."""
    heap = wapp.queue.enqueue("heap", {})
    rows = wait_until(
        lambda: wdb.rows("SELECT state, result FROM {finished} WHERE id = %s", (heap,)),
        10,
        lambda: f"{wdb.states()}\n{worker.log_tail()}",
    )
    assert rows[0][0] == "completed", rows
    state: dict[str, int] = rows[0][1]  # jsonb, decoded
    return state
