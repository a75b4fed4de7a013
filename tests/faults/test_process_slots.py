"""Process isolation: handlers in child processes that are killed at their timeout and replaced.

Real child processes and real time throughout: what is tested is exactly what threads cannot
do (stop a looping handler) and what processes make possible (a handler that exits, is killed
from outside, or raises SystemExit must not take the worker with it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pgqueue.worker.processes import ProcessOutcome, ProcessSlots

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).resolve().parent
APP = "slots_app:queue"
# The app's Queue never connects; the DSN is there for apps that resolve it at import.
ENV = {"PYTHONPATH": str(FAULTS), "PGQUEUE_DSN": "postgresql://nobody@127.0.0.1:1/unused"}


def ignore(_: Any) -> None:
    pass


async def run(
    slots: ProcessSlots,
    task: str,
    *,
    timeout: float | None = None,
    cancel: asyncio.Event | None = None,
    context: dict[str, Any] | None = None,
    on_progress: Any = ignore,
    **kwargs: Any,
) -> ProcessOutcome:
    return await slots.run(
        task,
        kwargs,
        timeout=timeout,
        context=context,
        on_progress=on_progress,
        cancel=cancel if cancel is not None else asyncio.Event(),
    )


def result(outcome: ProcessOutcome) -> Any:
    assert outcome.kind == "ok", outcome
    return None if outcome.result_json is None else json.loads(outcome.result_json)


async def child_pid(slots: ProcessSlots) -> int:
    pid = result(await run(slots, "pid"))
    assert isinstance(pid, int)
    return pid


def gone(pid: int) -> bool:
    """The process no longer exists (a zombie left to a non-reaping init counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
async def shared() -> AsyncIterator[ProcessSlots]:
    """One warm pool for the tests that leave their child usable."""
    slots = ProcessSlots(APP, 2, env=ENV)
    await slots.start()
    yield slots
    await slots.close()


@pytest.fixture
async def single() -> AsyncIterator[ProcessSlots]:
    """A pool of one child, for the tests that kill it."""
    slots = ProcessSlots(APP, 1, env=ENV)
    await slots.start()
    yield slots
    await slots.close()


async def test_result_round_trip(shared: ProcessSlots) -> None:
    value = {"a": [1, 2.5, "é", None, True], "b": {"c": -3}}
    assert result(await run(shared, "echo", value=value)) == value


async def test_none_result(shared: ProcessSlots) -> None:
    outcome = await run(shared, "nothing")
    assert outcome == ProcessOutcome("ok", result_json=None)


@pytest.mark.parametrize(("task", "why"), [("give_set", "set"), ("give_nan", "out of range float")])
async def test_unstorable_result_is_an_error(shared: ProcessSlots, task: str, why: str) -> None:
    outcome = await run(shared, task)
    assert outcome.kind == "error"
    assert outcome.error_type == "UnstorableResult"
    assert outcome.error_message is not None
    assert "cannot be stored" in outcome.error_message
    assert why in outcome.error_message.lower()


async def test_exception_type_message_and_traceback(shared: ProcessSlots) -> None:
    outcome = await run(shared, "fail", message="bad input")
    assert (outcome.kind, outcome.error_type, outcome.error_message) == ("error", "ValueError", "bad input")
    assert outcome.traceback is not None
    assert "slots_app.py" in outcome.traceback
    assert "ValueError: bad input" in outcome.traceback


async def test_exception_whose_str_raises(shared: ProcessSlots) -> None:
    outcome = await run(shared, "fail_unprintably")
    assert outcome.kind == "error"
    assert outcome.error_type == "Unprintable"
    assert outcome.error_message == "<unprintable Unprintable: str() raised RuntimeError>"
    assert outcome.traceback is not None


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
async def test_base_exceptions_are_errors_and_the_child_lives_on(single: ProcessSlots, kind: str) -> None:
    before = await child_pid(single)
    outcome = await run(single, "raise_base", kind=kind)
    assert (outcome.kind, outcome.error_type) == ("error", kind)
    assert await child_pid(single) == before
    assert single.alive == 1


async def test_unknown_task_is_an_error(shared: ProcessSlots) -> None:
    outcome = await run(shared, "no_such_task")
    assert (outcome.kind, outcome.error_type) == ("error", "UnknownTaskError")


async def test_loop_past_timeout_is_killed_and_replaced(single: ProcessSlots) -> None:
    first = await child_pid(single)
    began = time.monotonic()
    outcome = await run(single, "spin", timeout=1)
    elapsed = time.monotonic() - began
    assert outcome.kind == "timeout"
    assert outcome.exitcode == -signal.SIGKILL
    assert elapsed >= 1.0 and elapsed < 1.5, elapsed
    assert gone(first)
    assert single.alive == 0
    second = await child_pid(single)
    assert second != first
    assert result(await run(single, "echo", value=1)) == 1


async def test_timeout_counts_from_the_handlers_start() -> None:
    """A cold pool: booting the child (an app that takes 0.8 s to import) takes longer than the
    timeout, which must not count."""
    slots = ProcessSlots(APP, 1, env={**ENV, "SLOTS_APP_IMPORT_SECONDS": "0.8"})
    try:
        began = time.monotonic()
        outcome = await run(slots, "sleep", seconds=0.3, timeout=0.6)
        assert time.monotonic() - began > 1.1  # boot + handler
        assert outcome.kind == "ok", outcome
    finally:
        await slots.close()


async def test_timeout_kills_what_the_handler_started(single: ProcessSlots, tmp_path: Path) -> None:
    note = tmp_path / "grandchild"
    outcome = await run(single, "spawn_and_spin", path=str(note), timeout=0.5)
    assert outcome.kind == "timeout"
    grandchild = int(note.read_text())
    deadline = time.monotonic() + 2
    while not gone(grandchild) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert gone(grandchild)


async def test_child_exiting_by_itself_is_died(single: ProcessSlots) -> None:
    first = await child_pid(single)
    outcome = await run(single, "exit_hard", code=3)
    assert (outcome.kind, outcome.exitcode) == ("died", 3)
    assert outcome.error_message is not None
    assert "exited with code 3" in outcome.error_message
    assert gone(first)
    assert result(await run(single, "echo", value="again")) == "again"


async def test_child_killed_from_outside_is_died(single: ProcessSlots) -> None:
    pid = await child_pid(single)
    job = asyncio.create_task(run(single, "sleep", seconds=30))
    await asyncio.sleep(0.3)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    outcome = await asyncio.wait_for(job, 5)
    assert time.monotonic() - killed_at < 0.5
    assert (outcome.kind, outcome.exitcode) == ("died", -signal.SIGKILL)
    assert result(await run(single, "echo", value=2)) == 2


async def test_cancel_kills_the_child(single: ProcessSlots) -> None:
    pid = await child_pid(single)
    cancel = asyncio.Event()
    job = asyncio.create_task(run(single, "sleep", seconds=30, cancel=cancel))
    await asyncio.sleep(0.3)
    cancelled_at = time.monotonic()
    cancel.set()
    outcome = await asyncio.wait_for(job, 5)
    assert time.monotonic() - cancelled_at < 1.0
    assert outcome.kind == "cancelled"
    assert gone(pid)
    assert single.alive == 0


async def test_sigint_does_not_reach_the_handler(single: ProcessSlots) -> None:
    """Ctrl-C goes to the worker's whole process group; the parent decides, not the child."""
    pid = await child_pid(single)
    job = asyncio.create_task(run(single, "sleep", seconds=0.6))
    await asyncio.sleep(0.2)
    os.kill(pid, signal.SIGINT)
    assert result(await asyncio.wait_for(job, 5)) == pid


PARENT = """
import asyncio, sys
from pgqueue.worker.processes import ProcessSlots

async def main() -> None:
    slots = ProcessSlots("slots_app:queue", 1, env={"PYTHONPATH": sys.argv[1]})
    done = asyncio.Event()
    out = await slots.run("pid", {}, timeout=None, context=None, on_progress=print, cancel=done)
    print(out.result_json, flush=True)
    await slots.run("spin", {}, timeout=None, context=None, on_progress=print, cancel=done)

asyncio.run(main())
"""


async def test_busy_child_dies_with_its_parent() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(FAULTS), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        pid = int(await asyncio.wait_for(parent.stdout.readline(), 10))
        await asyncio.sleep(0.3)  # the child is now spinning
        assert not gone(pid)
    finally:
        parent.kill()
        await parent.wait()
    deadline = time.monotonic() + 3
    while not gone(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert gone(pid)


async def test_cancel_set_before_the_run_runs_nothing(shared: ProcessSlots) -> None:
    cancel = asyncio.Event()
    cancel.set()
    outcome = await run(shared, "exit_hard", code=9, cancel=cancel)
    assert outcome.kind == "cancelled"
    assert shared.alive >= 1


async def test_progress_is_forwarded_in_order_with_the_context(shared: ProcessSlots) -> None:
    seen: list[Any] = []

    def on_progress(value: Any) -> None:
        seen.append(json.loads(value) if isinstance(value, str) else value)

    context = {
        "job_id": 7,
        "queue": "default",
        "task": "report_progress",
        "attempt": 2,
        "max_attempts": 5,
        "scheduled_for": None,
        "worker_id": "w-1",
    }
    steps = list(range(0, 101, 5))
    outcome = await run(shared, "report_progress", steps=steps, context=context, on_progress=on_progress)
    assert result(outcome) == {"job_id": 7, "attempt": 2, "worker_id": "w-1", "task": "report_progress"}
    assert seen == [*steps, {"stage": "done"}]


async def test_invalid_progress_raises_in_the_handler(shared: ProcessSlots) -> None:
    seen: list[Any] = []
    context = {
        "job_id": 1,
        "queue": "default",
        "task": "report_progress",
        "attempt": 1,
        "max_attempts": 1,
        "scheduled_for": None,
        "worker_id": "w",
    }
    outcome = await run(shared, "report_progress", steps=[50, 150], context=context, on_progress=seen.append)
    assert (outcome.kind, outcome.error_type) == ("error", "UnstorableProgress")
    assert len(seen) == 1


async def test_async_handler_runs_in_the_child(shared: ProcessSlots) -> None:
    assert result(await run(shared, "async_double", x=21)) == {"doubled": 42, "in_loop": True}


async def test_size_bounds_the_children(tmp_path: Path) -> None:
    log = tmp_path / "overlap"
    slots = ProcessSlots(APP, 2, env=ENV)
    most_alive = 0

    async def sample() -> None:
        nonlocal most_alive
        while True:
            most_alive = max(most_alive, slots.alive)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        outcomes = await asyncio.gather(
            *(run(slots, "overlap", path=str(log), seconds=0.3) for _ in range(5))
        )
    finally:
        sampler.cancel()
        await slots.close()
    assert [o.kind for o in outcomes] == ["ok"] * 5
    running = peak = 0
    pids = set()
    events = sorted(
        (float(at), kind, int(pid))
        for kind, at, pid in (line.split() for line in log.read_text().splitlines())
    )
    for _, kind, pid in sorted(
        events, key=lambda e: (e[0], e[1] == "start")
    ):  # an end before a start at the same instant
        pids.add(pid)
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    assert len(pids) == 2
    assert most_alive == 2


async def test_app_that_cannot_be_imported_is_an_error() -> None:
    slots = ProcessSlots("slots_app:missing", 1, env=ENV)
    try:
        outcome = await run(slots, "echo", value=1)
        assert (outcome.kind, outcome.error_type) == ("error", "ConfigurationError")
        assert outcome.error_message is not None
        assert "slots_app:missing" in outcome.error_message
        assert slots.alive == 0
    finally:
        await slots.close()


async def test_close_leaves_no_child_processes() -> None:
    slots = ProcessSlots(APP, 3, env=ENV)
    outcomes = await asyncio.gather(*(run(slots, "sleep", seconds=0.3) for _ in range(3)))
    pids = {result(o) for o in outcomes}
    assert len(pids) == 3 and slots.alive == 3
    assert pids <= {p.pid for p in psutil.Process().children()}
    busy = asyncio.create_task(run(slots, "sleep", seconds=30))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(slots.close(), 5)
    assert (await asyncio.wait_for(busy, 5)).kind == "died"
    assert slots.alive == 0
    assert all(gone(pid) for pid in pids)
    assert not pids & {p.pid for p in psutil.Process().children(recursive=True)}
    await slots.close()  # again: nothing left to do
    assert (await run(slots, "echo", value=1)).kind == "died"


async def test_event_loop_stays_responsive(tmp_path: Path) -> None:
    """Booting a child and waiting on it never holds the loop (ticks every 10 ms, no gap > 100 ms)."""
    slots = ProcessSlots(APP, 1, env=ENV)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        assert result(await run(slots, "echo", value=[1] * 200_000)) == [1] * 200_000  # boot + a big message
        assert (await run(slots, "spin", timeout=0.5)).kind == "timeout"
        assert isinstance(result(await run(slots, "sleep", seconds=0.3)), int)
    finally:
        ticker.cancel()
        await slots.close()
    assert len(gaps) > 50
    assert max(gaps) < 0.1, max(gaps)
