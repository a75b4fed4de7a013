"""Hostile handlers against real worker processes: every job settles, no innocent job pays.

Each test starts ``pgqueue worker fault_app:queue`` subprocesses on the test's schema and feeds
them handlers that return what cannot be stored, raise what cannot be printed or should not be
caught, block the event loop, outlive their timeout, kill their own process, or freeze. The
contract checked after each: the hostile job settles within a bounded time (completed with a
stored value, or retried/dead-lettered with its error recorded), ordinary jobs around it run
exactly once, and the same worker process goes on serving.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fault_app
import pytest
import worker_app
from fault_app import BAD_PROGRESS, BAD_RESULTS, BASE_EXCEPTIONS, FAST_FLAG
from worker_helpers import Db, WorkerProcess, Workers, wait_until

from pgqueue import JobSpec

pytestmark = pytest.mark.slow

FAULTS_DIR = Path(__file__).resolve().parent
APP = "fault_app:queue"
SETTLE_SECONDS = 15.0  # the bound within which every hostile job must be settled

NUL_WORDS = ("nul", "\\x00", "\\u0000")
SURROGATE_WORDS = ("surrogate", "\\ud800")
# Words of which the error message of an unstorable result must hold one: it names the reason.
UNSTORABLE_REASONS: dict[str, tuple[str, ...]] = {
    "nul": NUL_WORDS,
    "dict_nul": NUL_WORDS,
    "dict_key_nul": NUL_WORDS,
    "surrogate": SURROGATE_WORDS,
    "dict_surrogate": SURROGATE_WORDS,
    "set": ("set",),
    "datetime": ("datetime",),
    "nan": ("nan", "out of range float", "finite"),
    "huge": ("300.0 mb as json, more than the 16 mb",),
}
assert UNSTORABLE_REASONS.keys() == BAD_RESULTS.keys()


# ---------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture
def fapp(wapp: worker_app.App, postgres_dsn: str) -> Iterator[fault_app.FaultApp]:
    """The fault app on the test's schema (tables made by ``wapp``), to enqueue its tasks."""
    built = fault_app.FaultApp(postgres_dsn, wapp.schema)
    yield built
    built.queue.close()


def start_worker(
    wprocs: Workers, db: Db, *args: str, env: dict[str, str] | None = None, wait: bool = True
) -> WorkerProcess:
    """``pgqueue worker fault_app:queue *args``, registered (unless ``wait`` is false)."""
    worker = wprocs.start(*args, env=env, app=APP, pythonpath=[FAULTS_DIR])
    if wait:
        wprocs.wait_registered(db, worker)
    return worker


@dataclass(frozen=True)
class JobRow:
    """A job as stored, live (``jobs``) or dead-lettered (state ``dead``)."""

    id: int
    task: str
    state: str
    attempts: int
    result: Any
    errors: list[dict[str, Any]]

    @property
    def types(self) -> list[str]:
        return [e.get("type") for e in self.errors]

    def describe(self) -> str:
        return f"#{self.id} {self.task} {self.state} attempts={self.attempts} errors={self.errors!r}"


def job_rows(db: Db, ids: Sequence[int]) -> dict[int, JobRow]:
    rows = db.rows(
        "SELECT id, task, state::text, attempts, result, errors FROM {all_jobs} AS j WHERE id = ANY(%s)"
        " UNION ALL"
        " SELECT id, task, 'dead', attempts, NULL, errors FROM {dead_letter} WHERE id = ANY(%s)",
        [list(ids), list(ids)],
    )
    return {r[0]: JobRow(*r) for r in rows}


def job_row(db: Db, job_id: int) -> JobRow:
    found = job_rows(db, [job_id])
    assert job_id in found, f"job {job_id} is neither in jobs nor in dead_letter: lost"
    return found[job_id]


def describe_all(db: Db, ids: Sequence[int]) -> str:
    found = job_rows(db, ids)
    return "\n".join(found[i].describe() if i in found else f"#{i} LOST" for i in ids)


def wait_settled(
    db: Db,
    wprocs: Workers,
    ids: Sequence[int],
    *,
    timeout: float = SETTLE_SECONDS,
    alive: Sequence[WorkerProcess] = (),
) -> dict[int, JobRow]:
    """Until every job is completed or dead-lettered; fails at once if a worker of ``alive`` dies."""

    def settled() -> dict[int, JobRow] | None:
        for w in alive:
            if not w.alive():
                raise AssertionError(
                    f"worker {w.pid} died (exit code {w.proc.returncode}) before its jobs settled\n"
                    f"{describe_all(db, ids)}\n{wprocs.logs()}"
                )
        found = job_rows(db, ids)
        done = len(found) == len(ids) and all(r.state in ("completed", "dead") for r in found.values())
        return found if done else None

    return wait_until(
        settled,
        timeout,
        lambda: f"jobs not settled (lost or stuck):\n{describe_all(db, ids)}\n{wprocs.logs()}",
    )


@dataclass(frozen=True)
class Run:
    """One row of ``test_log``: one execution of a handler."""

    job_id: int
    attempt: int
    pid: int
    started: float  # epoch seconds, database clock
    finished: float | None
    cancelled: float | None  # for handlers that record being cancelled

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.cancelled is not None


def runs_of(db: Db, job_id: int) -> list[Run]:
    rows = db.rows(
        "SELECT job_id, attempt, pid, extract(epoch FROM started_at)::float8,"
        " extract(epoch FROM finished_at)::float8, extract(epoch FROM cancelled_at)::float8"
        " FROM {log} WHERE job_id = %s ORDER BY seq",
        [job_id],
    )
    return [Run(*r) for r in rows]


def assert_each_ran_once(db: Db, ids: Sequence[int], what: str = "ordinary jobs") -> None:
    counts = db.run_counts()
    wrong = {i: counts.get(i, 0) for i in ids if counts.get(i, 0) != 1}
    assert not wrong, f"{what} not run exactly once (job id: runs): {wrong}"


def assert_completed(rows: dict[int, JobRow], ids: Sequence[int], what: str = "ordinary jobs") -> None:
    bad = [rows[i].describe() for i in ids if rows[i].state != "completed" or rows[i].errors]
    assert not bad, f"{what} did not complete cleanly:\n" + "\n".join(bad)


def assert_runs_match_attempts(db: Db) -> None:
    """No job ran more often than its attempts say (a finished job run twice shows up here)."""
    attempts = dict(
        db.rows("SELECT id, attempts FROM {all_jobs} AS j UNION ALL SELECT id, attempts FROM {dead_letter}")
    )
    counts = db.run_counts()
    wrong = {i: (n, attempts.get(i)) for i, n in counts.items() if n != attempts.get(i)}
    assert not wrong, f"jobs run more (or less) often than their attempts (id: runs, attempts): {wrong}"


def assert_serves(
    fapp: fault_app.FaultApp, db: Db, wprocs: Workers, worker: WorkerProcess, *, same_pid: bool = True
) -> None:
    """The same worker process, still alive, runs ordinary jobs (async and sync)."""
    assert worker.alive(), f"worker {worker.pid} is gone\n{worker.log_tail()}"
    ids = fapp.queue.enqueue_many([JobSpec("record", {"note": "after"}), JobSpec("record_sync", {})])
    rows = wait_settled(db, wprocs, ids, timeout=10, alive=[worker])
    assert_completed(rows, ids, "ordinary jobs after the hostile ones")
    assert_each_ran_once(db, ids, "ordinary jobs after the hostile ones")
    if same_pid:
        pids = {r.pid for i in ids for r in runs_of(db, i)}
        assert pids == {worker.pid}, f"ran in {pids}, not in worker {worker.pid}"


def interleave(ordinary: list[JobSpec], hostile: list[JobSpec]) -> list[JobSpec]:
    """Hostile jobs spread among the first ordinary ones, so claimed batches mix both."""
    out: list[JobSpec] = []
    for i in range(max(len(ordinary), len(hostile))):
        out += ordinary[i : i + 1] + hostile[i : i + 1]
    return out


def seconds_since_start(db: Db, job_id: int) -> float:
    return float(
        db.one(
            "SELECT extract(epoch FROM clock_timestamp() - min(started_at))::float8 FROM {log}"
            " WHERE job_id = %s",
            [job_id],
        )
    )


# ---------------------------------------------------------------------------- 1. results


def test_unstorable_results_fail_their_attempt_and_spare_the_batch(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "10")
    hostile_kinds = [(kind, 1) for kind in BAD_RESULTS] + [("nul", 2)]  # the last one is retried once
    hostile = [
        JobSpec("bad_result" if i % 2 == 0 else "bad_result_sync", {"kind": kind}, max_attempts=attempts)
        for i, (kind, attempts) in enumerate(hostile_kinds)
    ]
    ordinary = [JobSpec("record", {"note": f"n{i}"}) for i in range(20)]
    specs = interleave(ordinary, hostile)
    ids = fapp.queue.enqueue_many(specs)
    good = [i for i, s in zip(ids, specs, strict=True) if s.task == "record"]
    bad = {i: s for i, s in zip(ids, specs, strict=True) if s.task != "record"}

    rows = wait_settled(wdb, wprocs, ids, alive=[worker])
    assert_completed(rows, good)
    assert all(rows[i].result == i for i in good)
    counts = wdb.run_counts()
    for job_id, spec in bad.items():
        r = rows[job_id]
        max_attempts = spec.options.get("max_attempts")
        assert spec.args is not None and max_attempts is not None
        kind = spec.args["kind"]
        assert r.state == "dead", f"{kind}: {r.describe()}"
        assert r.attempts == max_attempts, f"{kind}: {r.describe()}"
        assert r.types == ["UnstorableResult"] * max_attempts, f"{kind}: {r.describe()}"
        for e in r.errors:
            message = e.get("message")
            assert isinstance(message, str), f"{kind}: {r.describe()}"
            reasons = UNSTORABLE_REASONS[kind]
            assert any(w in message.lower() for w in reasons), f"{kind}: message names none of {reasons}"
        assert counts.get(job_id) == max_attempts, f"{kind}: {counts.get(job_id)} runs"
    assert_each_ran_once(wdb, good)
    assert_serves(fapp, wdb, wprocs, worker)

    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.log_tail()
    assert "could not write" not in worker.log_text(), worker.log_tail()
    assert_runs_match_attempts(wdb)


# ---------------------------------------------------------------------------- 2. messages


def test_exception_messages_holding_nul_or_a_lone_surrogate_are_recorded(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "10")
    hostile = [
        JobSpec(task, {"kind": kind}, max_attempts=1)
        for kind in ("nul", "surrogate")
        for task in ("raise_bad_message", "raise_bad_message_sync")
    ]
    ordinary = [JobSpec("record", {"note": f"n{i}"}) for i in range(12)]
    specs = interleave(ordinary, hostile)
    ids = fapp.queue.enqueue_many(specs)
    good = [i for i, s in zip(ids, specs, strict=True) if s.task == "record"]
    bad = [i for i, s in zip(ids, specs, strict=True) if s.task != "record"]

    rows = wait_settled(wdb, wprocs, ids, alive=[worker])
    for job_id in bad:
        r = rows[job_id]
        assert r.state == "dead" and r.types == ["ValueError"], r.describe()
        message, tb = r.errors[0].get("message"), r.errors[0].get("traceback")
        assert isinstance(message, str) and "\x00" not in message, r.describe()
        assert "bad" in message and "value" in message, f"the message lost its text: {message!r}"
        assert isinstance(tb, str) and r.task in tb and "ValueError" in tb, f"no traceback: {r.describe()}"
    assert_completed(rows, good)
    assert_each_ran_once(wdb, ids, "jobs")
    assert_serves(fapp, wdb, wprocs, worker)


# ---------------------------------------------------------------------------- 3. unprintable


def test_an_exception_whose_str_raises_is_recorded_and_frees_its_slot(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "1")  # one slot: a lost slot stops everything
    bad = fapp.queue.enqueue_many(
        [JobSpec("raise_unprintable_sync", max_attempts=1), JobSpec("raise_unprintable", max_attempts=1)]
    )
    good = fapp.queue.enqueue_many([JobSpec("record", {"note": f"later {i}"}) for i in range(3)])

    rows = wait_settled(wdb, wprocs, [*bad, *good], alive=[worker])
    for job_id in bad:
        r = rows[job_id]
        assert r.state == "dead" and r.types == ["UnprintableError"], r.describe()
        message = r.errors[0].get("message")
        assert isinstance(message, str) and message.strip(), f"no fallback message: {r.describe()}"
    assert_completed(rows, good)
    assert_each_ran_once(wdb, [*bad, *good], "jobs")
    assert_serves(fapp, wdb, wprocs, worker)


def test_arguments_python_cannot_decode_dead_letter_their_job_alone(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    """Another client writes jobs whose arguments PostgreSQL stores and Python's JSON decoder
    refuses (nested 3,000 deep; a 5,000-digit number). Raised in the driver's row loading, each
    failed the whole claim, whose rows (its batch's other jobs too) stayed claimed, were rescued
    and claimed again for ever; now each is dead-lettered by name at its first attempt, and the
    batch runs."""
    good = fapp.queue.enqueue_many([JobSpec("record", {"note": f"good {i}"}) for i in range(10)])
    poisons = {  # nested past the decoder's depth; an integer past Python's 4,300 digits
        "RecursionError": '{"deep": ' + "[" * 3000 + "]" * 3000 + "}",
        "ValueError": '{"n": ' + "7" * 5000 + "}",
    }
    poison = {
        why: wdb.one(
            "INSERT INTO {jobs} (queue, task, args, max_attempts)"
            " VALUES ('default', 'record', %s::jsonb, 5) RETURNING id",
            [text],
        )
        for why, text in poisons.items()
    }
    more = fapp.queue.enqueue_many([JobSpec("record", {"note": f"more {i}"}) for i in range(10)])
    worker = start_worker(wprocs, wdb, "--concurrency", "4")  # one claim holds a poison and others
    rows = wait_settled(wdb, wprocs, [*good, *poison.values(), *more], alive=[worker])
    for why, job_id in poison.items():
        r = rows[job_id]
        assert r.state == "dead" and r.attempts == 1 and r.types == ["UndecodableArguments"], r.describe()
        assert why in str(r.errors[0].get("message")), r.describe()
        assert runs_of(wdb, job_id) == [], "the handler ran without its arguments"
    assert_completed(rows, [*good, *more])
    assert_each_ran_once(wdb, [*good, *more], "jobs claimed with the poison")
    assert "claim failed" not in worker.log_text(), worker.log_tail()
    assert_serves(fapp, wdb, wprocs, worker)


# ---------------------------------------------------------------------------- 4. progress


def test_unstorable_progress_is_refused_at_the_call(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "4")
    refused = fapp.queue.enqueue_many(
        [JobSpec("progress_refused", {"kind": kind}, max_attempts=1) for kind in BAD_PROGRESS]
    )
    uncaught = fapp.queue.enqueue_many(
        [JobSpec("progress_uncaught", {"kind": kind}, max_attempts=1) for kind in BAD_PROGRESS]
    )
    rows = wait_settled(wdb, wprocs, [*refused, *uncaught], alive=[worker])
    for job_id in refused:
        r = rows[job_id]
        assert r.state == "completed" and r.result == "refused", (
            f"set_progress did not raise UnstorableProgress into the handler: {r.describe()}"
            f" result={r.result!r}"
        )
    for job_id in uncaught:
        r = rows[job_id]
        assert r.state == "dead" and r.types == ["UnstorableProgress"], r.describe()

    # Valid progress of another job on the same worker is still written while it runs.
    job_id = fapp.queue.enqueue("progress_40", {"seconds": 1.5})

    def progress_40_while_running() -> bool:
        found = wdb.rows(
            "SELECT j.progress, l.finished_at FROM {all_jobs} AS j LEFT JOIN {log} AS l ON l.job_id = j.id"
            " WHERE j.id = %s",
            [job_id],
        )
        assert found, f"progress job left the jobs table: {job_row(wdb, job_id).describe()}"
        progress, finished = found[0]
        if finished is not None and progress != 40:
            raise AssertionError(f"the job ended with progress {progress!r}: 40 was never written")
        return progress == 40 and finished is None

    wait_until(progress_40_while_running, 10, lambda: f"progress 40 never seen\n{wprocs.logs()}")
    rows = wait_settled(wdb, wprocs, [job_id], alive=[worker])
    assert_completed(rows, [job_id], "the progress job")
    assert_each_ran_once(wdb, [*refused, *uncaught, job_id], "jobs")
    assert_serves(fapp, wdb, wprocs, worker)


# ---------------------------------------------------------------------------- 5. base exceptions


@pytest.mark.parametrize("kind", list(BASE_EXCEPTIONS))
def test_base_exceptions_from_handlers_are_recorded_and_retried(
    kind: str, fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "4")
    ids = fapp.queue.enqueue_many(
        [JobSpec(task, {"kind": kind}, max_attempts=2) for task in ("raise_base", "raise_base_sync")]
    )
    rows = wait_settled(wdb, wprocs, ids, alive=[worker])
    for job_id in ids:
        r = rows[job_id]
        assert r.state == "dead" and r.attempts == 2 and r.types == [kind, kind], r.describe()
        assert [run.attempt for run in runs_of(wdb, job_id)] == [1, 2], r.describe()
    assert_serves(fapp, wdb, wprocs, worker)


def test_a_handler_that_cancels_itself_fails_its_attempt_and_is_not_requeued_for_ever(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    """Only the worker's shutdown hands a cancelled job back uncharged: a handler cancelling its
    own task (or raising CancelledError, above) would otherwise run again and again, uncounted."""
    worker = start_worker(wprocs, wdb, "--concurrency", "4")
    [job_id] = fapp.queue.enqueue_many([JobSpec("cancel_itself", {}, max_attempts=2)])
    rows = wait_settled(wdb, wprocs, [job_id], alive=[worker])
    r = rows[job_id]
    assert r.state == "dead" and r.attempts == 2 and r.types == ["CancelledError"] * 2, r.describe()
    assert [run.attempt for run in runs_of(wdb, job_id)] == [1, 2], r.describe()
    assert_serves(fapp, wdb, wprocs, worker)


def test_a_handler_that_stops_the_event_loop_does_not_stop_the_worker(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "4")
    [job_id] = fapp.queue.enqueue_many([JobSpec("stop_loop", {})])
    rows = wait_settled(wdb, wprocs, [job_id], alive=[worker])
    r = rows[job_id]
    assert r.state == "completed" and r.result == "stopped the loop", r.describe()
    assert_serves(fapp, wdb, wprocs, worker)
    assert "event loop was stopped" in worker.log_text(), worker.log_tail()


def test_shutdown_ends_with_a_handler_that_swallows_every_cancel(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    """A coroutine that catches each CancelledError cannot be stopped: the worker hands its job
    back at the end of the grace period and exits anyway (the process ends the coroutine)."""
    worker = start_worker(wprocs, wdb, "--concurrency", "2", "--grace-period", "0.5")
    job_id = fapp.queue.enqueue("ignore_cancel", {"seconds": 120})
    wait_until(lambda: runs_of(wdb, job_id), 10, lambda: f"job never started\n{worker.log_tail()}")
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(20)
    took = time.monotonic() - signalled
    assert code == 0, worker.log_tail()
    assert took < 8.0, f"exit took {took:.1f}s with a 0.5 s grace period\n{worker.log_tail()}"
    r = job_row(wdb, job_id)
    assert r.state == "queued" and r.attempts == 0, r.describe()


@pytest.mark.parametrize("replacement", sorted(fault_app.STOP_REPLACEMENTS))
def test_a_handler_that_replaces_the_sigterm_handler_does_not_take_the_graceful_stop_away(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers, replacement: str
) -> None:
    """SIG_IGN left the worker deaf to systemd's stop (SIGKILL at the unit's timeout), SIG_DFL
    killed it mid-job, a handler of its own swallowed the stop: after the job, the worker's own
    handler is back and says who replaced it."""
    worker = start_worker(wprocs, wdb, "--concurrency", "2")
    job_id = fapp.queue.enqueue("replace_stop_signal", {"replacement": replacement})
    rows = wait_settled(wdb, wprocs, [job_id], alive=[worker])
    assert rows[job_id].state == "completed", rows[job_id].describe()
    worker.signal(signal.SIGTERM)
    code = worker.wait(15)
    assert code == 0, f"exit code {code}\n{worker.log_tail()}"
    log_text = worker.log_text()
    replaced = f"SIGTERM handler was replaced (noticed after job {job_id} (replace_stop_signal) ended)"
    assert replaced in log_text, worker.log_tail()
    assert "SIGTERM: stop claiming" in log_text, worker.log_tail()


def test_a_running_job_that_replaced_the_sigterm_handler_is_stopped_gracefully(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    """A job that replaces the handler and runs on: the periodic check restores it, and the stop
    hands the job back at the end of the grace period, uncharged."""
    worker = start_worker(wprocs, wdb, "--concurrency", "2", "--grace-period", "0.5")
    job_id = fapp.queue.enqueue("replace_stop_signal", {"replacement": "ignore", "seconds": 120})
    wait_until(
        lambda: "SIGTERM handler was replaced" in worker.log_text(),
        10,
        lambda: f"the replaced handler was never noticed\n{worker.log_tail()}",
    )
    noticed = f"SIGTERM handler was replaced (noticed while running job {job_id} (replace_stop_signal))"
    assert noticed in worker.log_text(), worker.log_tail()
    worker.signal(signal.SIGTERM)
    code = worker.wait(15)
    assert code == 0, f"exit code {code}\n{worker.log_tail()}"
    r = job_row(wdb, job_id)
    assert r.state == "queued" and r.attempts == 0, r.describe()
    assert len(runs_of(wdb, job_id)) == 1


# ---------------------------------------------------------------------------- 6. runaway threads


def abandoned_threads(db: Db, worker: WorkerProcess) -> int | None:
    """The worker row's ``abandoned_threads``; None when the column does not exist."""
    has_column = db.rows(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'workers' AND column_name = 'abandoned_threads'",
        [db.schema],
    )
    if not has_column:
        return None
    return int(db.one("SELECT abandoned_threads FROM {workers} WHERE pid = %s", [worker.pid]))


def max_running_handlers(db: Db) -> int:
    """The most handler executions started and not yet finished at any start in ``test_log``."""
    return int(
        db.one(
            "SELECT coalesce(max(n), 0) FROM ("
            "  SELECT (SELECT count(*) FROM {log} AS b WHERE b.started_at <= a.started_at"
            "          AND coalesce(b.finished_at, 'infinity') > a.started_at) AS n"
            "  FROM {log} AS a) AS s"
        )
    )


def test_runaway_threads_keep_their_slots_until_they_end(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "2", env={"PGQUEUE_LEASE_SECONDS": "3"})
    runaways = fapp.queue.enqueue_many([JobSpec("runaway", {"seconds": 8}, timeout=2, max_attempts=1)] * 2)
    wait_until(
        lambda: len({r[0] for r in wdb.rows("SELECT job_id FROM {log}")}) == 2,
        10,
        lambda: f"the runaways did not start\n{wprocs.logs()}",
    )
    rows = wait_settled(wdb, wprocs, runaways, timeout=6, alive=[worker])
    for job_id in runaways:
        assert rows[job_id].state == "dead" and rows[job_id].types == ["JobTimeout"], rows[job_id].describe()

    # Both threads still run: these must wait for them, and their own timeout must not run meanwhile.
    ordinary = fapp.queue.enqueue_many(
        [JobSpec("record_sync", {"sleep": 0.3}, timeout=3, max_attempts=1)] * 4
        + [JobSpec("record", {"sleep": 0.3}, timeout=3, max_attempts=1)] * 2
    )
    reported: int | None = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        reported = abandoned_threads(wdb, worker)
        if reported is None or reported > 0:
            break
        time.sleep(0.1)
    still_running = [r for i in runaways for r in runs_of(wdb, i) if r.finished is None]

    rows = wait_settled(wdb, wprocs, ordinary, alive=[worker])
    ends: list[float] = []
    for job_id in runaways:
        (run,) = runs_of(wdb, job_id)
        assert run.finished is not None and run.finished - run.started >= 7.5, (
            f"runaway {job_id} did not run to its end in its thread: {run}"
        )
        ends.append(run.finished)
    assert_completed(rows, ordinary, "jobs queued behind the runaway threads")
    assert all(rows[i].attempts == 1 for i in ordinary), describe_all(wdb, ordinary)
    assert_each_ran_once(wdb, ordinary, "jobs queued behind the runaway threads")
    early = [r for i in ordinary for r in runs_of(wdb, i) if r.started < min(ends)]
    assert not early, f"jobs started while both slots were held by runaway threads: {early}"
    assert max_running_handlers(wdb) <= 2, "more handlers ran at once than --concurrency 2"

    assert reported is not None, "the workers table has no abandoned_threads column"
    assert reported > 0 and still_running, (
        f"abandoned_threads was {reported} while runaway threads ran ({len(still_running)} running)"
    )
    wait_until(
        lambda: abandoned_threads(wdb, worker) == 0,
        5,
        lambda: f"abandoned_threads stayed {abandoned_threads(wdb, worker)} after the threads ended",
    )
    assert worker.alive(), worker.log_tail()


# ---------------------------------------------------------------------------- 7. process isolation


def assert_runaway_killed(db: Db, wprocs: Workers, worker: WorkerProcess, job_id: int) -> None:
    """The runaway (timeout 2, loops 6 s) failed with JobTimeout soon after its start, and its
    process was killed: the end marker it would write at 6 s never appears."""
    wait_until(lambda: runs_of(db, job_id), 10, lambda: f"the runaway never started\n{wprocs.logs()}")
    rows = wait_settled(db, wprocs, [job_id], timeout=6, alive=[worker])
    r = rows[job_id]
    assert r.state == "dead" and r.types == ["JobTimeout"], r.describe()
    failed_after = float(
        db.one(
            "SELECT extract(epoch FROM d.failed_at - l.started_at)::float8"
            " FROM {dead_letter} AS d JOIN {log} AS l ON l.job_id = d.id WHERE d.id = %s",
            [job_id],
        )
    )
    assert failed_after < 3.5, f"the timeout-2 job failed {failed_after:.1f}s after its start"
    time.sleep(max(0.0, 7.0 - seconds_since_start(db, job_id)))  # past the end marker's time
    (run,) = runs_of(db, job_id)
    assert run.finished is None, "the runaway wrote its end marker: its process was not killed"
    assert run.pid != worker.pid, "the handler ran in the worker's own process"


def test_process_isolation_kills_a_runaway_handler(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--isolation", "process", "--concurrency", "2")
    job_id = fapp.queue.enqueue("runaway", {"seconds": 6}, timeout=2, max_attempts=1)
    assert_runaway_killed(wdb, wprocs, worker, job_id)
    ordinary = fapp.queue.enqueue_many(
        [JobSpec("record_sync", {"sleep": 0.2})] * 2 + [JobSpec("record", {"sleep": 0.2})] * 2
    )
    rows = wait_settled(wdb, wprocs, ordinary, alive=[worker])
    assert_completed(rows, ordinary)
    assert_each_ran_once(wdb, ordinary)
    assert_serves(fapp, wdb, wprocs, worker, same_pid=False)


def test_process_isolation_from_env_survives_a_handler_that_exits(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    worker = start_worker(wprocs, wdb, "--concurrency", "2", env={"PGQUEUE_ISOLATION": "process"})
    ids = fapp.queue.enqueue_many(
        [
            JobSpec("exit_process", {"code": 3}, max_attempts=1),
            JobSpec("exit_process", {"code": 3}, max_attempts=2),
        ]
    )
    rows = wait_settled(wdb, wprocs, ids, alive=[worker])
    for job_id, attempts in zip(ids, (1, 2), strict=True):
        r = rows[job_id]
        assert r.state == "dead" and r.types == ["HandlerProcessDied"] * attempts, r.describe()
        assert len(runs_of(wdb, job_id)) == attempts, r.describe()
    assert_serves(fapp, wdb, wprocs, worker, same_pid=False)


def test_per_task_process_isolation_in_a_thread_mode_worker(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    assert fapp.per_task_isolation, "queue.task() does not take isolation='process'"
    worker = start_worker(wprocs, wdb, "--concurrency", "2")  # thread mode, the default
    job_id = fapp.queue.enqueue("runaway_isolated", {"seconds": 6}, timeout=2, max_attempts=1)
    in_thread = fapp.queue.enqueue("record_sync", {"sleep": 0.2})
    assert_runaway_killed(wdb, wprocs, worker, job_id)
    rows = wait_settled(wdb, wprocs, [in_thread], alive=[worker])
    assert_completed(rows, [in_thread])
    assert [r.pid for r in runs_of(wdb, in_thread)] == [worker.pid], "other tasks left thread mode"
    assert_serves(fapp, wdb, wprocs, worker)


def test_retry_from_an_isolated_handler_keeps_the_wait_it_asked_for(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    """``Retry(in_=0.6)`` raised in a child process retries in 0.6 s, not after the task's 5 s
    backoff: the wait crosses the pipe with the error."""
    worker = start_worker(wprocs, wdb, "--concurrency", "2")
    job_id = fapp.queue.enqueue("retry_soon_isolated", {"seconds": 0.6})
    rows = wait_settled(wdb, wprocs, [job_id], alive=[worker])
    assert rows[job_id].state == "completed", rows[job_id].describe()
    runs = runs_of(wdb, job_id)
    assert [r.attempt for r in runs] == [1, 2], runs
    assert all(r.pid != worker.pid for r in runs), "the handler ran in the worker, not a child"
    gap = runs[1].started - runs[0].started
    assert 0.6 <= gap < 2.5, gap  # the backoff would be 5 s
    job = fapp.queue.get_job(job_id)
    assert [e["type"] for e in job.errors] == ["Retry"], job.errors


# ---------------------------------------------------------------------------- 8. blocked event loop


def bump_job_ids(db: Db, to: int = 7_000_000) -> None:
    """Job ids far from any other number a log line may hold, so a search for one is exact."""
    table = f'"{db.schema}".jobs'
    db.rows("SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)", [table, to])


@pytest.mark.parametrize(
    "rename_task",
    # As the worker names it; then names the worker's own scheme cannot read: the watch that names
    # the blocking job must not fail, nor take the lease keeper's thread (and every lease) with it.
    [None, "pgqueue-job-mine", "pgqueue-job-\u00b2", "pgqueue-job-" + "9" * 5000, "pgqueue-job-99999999"],
    ids=["own-name", "renamed", "superscript-digit", "past-int-digits", "another-job-id"],
)
def test_a_handler_blocking_the_event_loop_costs_no_innocent_rerun(
    rename_task: str | None, fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    bump_job_ids(wdb)
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    blocked = start_worker(wprocs, wdb, "--concurrency", "10", env=env)
    innocents = fapp.queue.enqueue_many([JobSpec("record", {"sleep": 1.0, "note": "innocent"})] * 4)
    wait_until(
        lambda: len({r[0] for r in wdb.rows("SELECT job_id FROM {log}")}) == 4,
        10,
        lambda: f"the innocent jobs did not start\n{wprocs.logs()}",
    )
    blocker = fapp.queue.enqueue(
        "block_loop", {"seconds": 12, "rename_task": rename_task}, timeout=5, max_attempts=1
    )
    wait_until(lambda: runs_of(wdb, blocker), 10, lambda: f"the blocker did not start\n{wprocs.logs()}")
    # Another worker on the same queue, rescuing expired leases every 0.5 s.
    rescuer = start_worker(wprocs, wdb, "--concurrency", "10", env=env)

    rows = wait_settled(wdb, wprocs, [*innocents, blocker], timeout=20, alive=[blocked, rescuer])
    counts = wdb.run_counts()
    reruns = {i: counts.get(i, 0) for i in innocents if counts.get(i, 0) != 1}
    assert not reruns, (
        f"innocent jobs ran again while the event loop was blocked (id: runs): {reruns}\n"
        f"{describe_all(wdb, innocents)}"
    )
    assert_completed(rows, innocents, "innocent jobs")
    assert all(rows[i].attempts == 1 for i in innocents), describe_all(wdb, innocents)
    blocker_runs = runs_of(wdb, blocker)
    assert len(blocker_runs) == 1, f"the blocker ran {len(blocker_runs)} times: {blocker_runs}"
    r = rows[blocker]
    assert r.state == "dead" and r.types == ["JobTimeout"], r.describe()
    lines = [line for line in blocked.log_text().splitlines() if "event loop blocked" in line]
    assert lines, f"no 'event loop blocked' in the blocked worker's log\n{blocked.log_tail()}"
    if rename_task is None:
        assert any(str(blocker) in line for line in lines), f"blocker {blocker} not named in {lines}"
    else:  # not a job's task as far as the worker can tell: not blamed on another job either
        assert all("by worker code" in line for line in lines), lines
    assert "Traceback" not in blocked.log_text(), blocked.log_tail()


# ---------------------------------------------------------------------------- 9. frozen worker


def test_a_frozen_workers_late_ack_leaves_the_new_run_alone(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    frozen = start_worker(wprocs, wdb, "--concurrency", "2", env={"PGQUEUE_LEASE_SECONDS": "2"})
    job_id = fapp.queue.enqueue("sleep_return_pid", {"first_seconds": 4, "later_seconds": 8}, max_attempts=1)

    def run_by(worker: WorkerProcess) -> Callable[[], list[Run]]:
        return lambda: [r for r in runs_of(wdb, job_id) if r.pid == worker.pid]

    wait_until(run_by(frozen), 10, lambda: f"the job did not start\n{wprocs.logs()}")
    frozen.signal(signal.SIGSTOP)
    try:
        rescuer = start_worker(
            wprocs,
            wdb,
            "--concurrency",
            "2",
            env={"PGQUEUE_LEASE_SECONDS": "2", "PGQUEUE_RESCUE_INTERVAL": "0.5"},
        )
        wait_until(
            lambda: job_row(wdb, job_id).state == "dead",
            10,
            lambda: (
                f"the frozen worker's job was not rescued: {job_row(wdb, job_id).describe()}\n"
                + wprocs.logs()
            ),
        )
        assert job_row(wdb, job_id).types == ["LeaseExpired"], job_row(wdb, job_id).describe()
        assert fapp.queue.retry_dead(job_id)
        wait_until(run_by(rescuer), 10, lambda: f"the retried job did not start\n{wprocs.logs()}")
    finally:
        frozen.signal(signal.SIGCONT)

    def untouched() -> None:
        r = job_row(wdb, job_id)
        assert r.state == "running" and r.result is None, (
            f"the frozen worker's late ack changed the new run: {r.describe()} result={r.result!r}"
            f" (frozen pid {frozen.pid}, new run's pid {rescuer.pid})"
        )

    # Thawed, the frozen worker ends its handler (finished or cancelled) and sends its late outcome
    # at once: all the while, and for a moment after, the new run must stay untouched.
    deadline = time.monotonic() + 5
    while not all(r.ended for r in run_by(frozen)()):
        untouched()
        assert time.monotonic() < deadline, f"the frozen worker's handler never ended\n{wprocs.logs()}"
        time.sleep(0.1)
    watch_until = time.monotonic() + 1.5
    while time.monotonic() < watch_until:
        untouched()
        time.sleep(0.1)
    assert not any(r.ended for r in run_by(rescuer)()), "the new run ended before the check: too short"

    rows = wait_settled(wdb, wprocs, [job_id], timeout=12, alive=[rescuer])
    r = rows[job_id]
    assert r.state == "completed" and r.result == rescuer.pid and r.attempts == 1, (
        f"{r.describe()} result={r.result!r} (frozen pid {frozen.pid}, new run's pid {rescuer.pid})"
    )


# ---------------------------------------------------------------------------- 10. kill -9


def test_kill_9_charges_an_attempt_only_to_the_jobs_that_had_started(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    env = {"PGQUEUE_LEASE_SECONDS": "2", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    killed = start_worker(wprocs, wdb, "--concurrency", "2", "--prefetch", "8", env=env)
    ids = fapp.queue.enqueue_many([JobSpec("sleep_unless_fast", {"seconds": 10}, max_attempts=3)] * 10)
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {log}") == 2,
        10,
        lambda: f"two jobs did not start\n{wprocs.logs()}",
    )
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {jobs} WHERE state::text <> 'queued'") == 10,
        5,
        lambda: f"the worker did not claim all 10 jobs (2 running, 8 in its buffer): {wdb.states()}",
    )
    started = {r[0] for r in wdb.rows("SELECT job_id FROM {log}")}
    killed.proc.kill()
    killed.wait(5)
    wdb.set_flag(FAST_FLAG)  # from now on every run takes 0.2 s
    survivor = start_worker(wprocs, wdb, "--concurrency", "10", env=env)

    rows = wait_settled(wdb, wprocs, ids, alive=[survivor])
    assert all(rows[i].state == "completed" for i in ids), describe_all(wdb, ids)
    for job_id in ids:
        attempts = [r.attempt for r in runs_of(wdb, job_id)]
        expected = [1, 2] if job_id in started else [1]
        assert attempts == expected, (
            f"job {job_id} ({'started' if job_id in started else 'never started'} before the kill)"
            f" ran with attempts {attempts}, expected {expected}: {rows[job_id].describe()}"
        )
        assert rows[job_id].attempts == len(expected) and rows[job_id].result == len(expected)


def test_a_job_started_from_the_prefetch_buffer_pays_when_its_worker_dies(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    """A prefetched job starts without waiting for the database; its start is written with the
    next flush, so a worker killed while it runs still charges its attempt (a poison job that
    kills its worker pays), while the job still in the buffer pays nothing."""
    env = {"PGQUEUE_LEASE_SECONDS": "2", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    killed = start_worker(wprocs, wdb, "--concurrency", "1", "--prefetch", "2", env=env)
    first, second, third = fapp.queue.enqueue_many(
        [JobSpec("sleep_unless_fast", {"seconds": 1.0}, max_attempts=3, priority=p) for p in (1, 2, 3)]
    )
    wait_until(
        lambda: wdb.one("SELECT count(*) FROM {log} WHERE job_id = %s", [second]) == 1,
        10,
        lambda: f"the second job did not start from the buffer\n{wprocs.logs()}",
    )
    time.sleep(0.5)  # more than a flush: its start is on record
    assert wdb.one("SELECT attempts FROM {all_jobs} AS j WHERE id = %s", [second]) == 1
    assert wdb.one("SELECT attempts FROM {all_jobs} AS j WHERE id = %s", [third]) == 0
    killed.proc.kill()
    killed.wait(5)
    wdb.set_flag(FAST_FLAG)
    survivor = start_worker(wprocs, wdb, "--concurrency", "2", env=env)
    ids = [first, second, third]
    rows = wait_settled(wdb, wprocs, ids, alive=[survivor])
    assert all(rows[i].state == "completed" for i in ids), describe_all(wdb, ids)
    assert [r.attempt for r in runs_of(wdb, first)] == [1]
    assert [r.attempt for r in runs_of(wdb, second)] == [1, 2], rows[second].describe()
    assert [r.attempt for r in runs_of(wdb, third)] == [1], rows[third].describe()
    assert rows[second].attempts == 2 and rows[third].attempts == 1


def wait_died_or_settled(db: Db, wprocs: Workers, worker: WorkerProcess, ids: Sequence[int]) -> bool:
    """True once every job is settled, False once the worker has died."""

    def outcome() -> str | None:
        found = job_rows(db, ids)
        if len(found) == len(ids) and all(r.state in ("completed", "dead") for r in found.values()):
            return "settled"
        return None if worker.alive() else "died"

    return (
        wait_until(
            outcome, 12, lambda: f"neither settled nor died:\n{describe_all(db, ids)}\n{wprocs.logs()}"
        )
        == "settled"
    )


def test_a_poison_job_that_kills_its_worker_is_dead_lettered_alone(
    fapp: fault_app.FaultApp, wdb: Db, wprocs: Workers
) -> None:
    env = {"PGQUEUE_LEASE_SECONDS": "2", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    poison_id, *ordinary = fapp.queue.enqueue_many(
        [JobSpec("poison", priority=1, max_attempts=1)]
        + [JobSpec("record", {"note": f"n{i}"}, priority=5, max_attempts=1) for i in range(9)]
    )
    ids = [poison_id, *ordinary]
    deaths = 0
    for _ in range(4):  # the first worker, and a restart after each death (up to 3)
        # Not waited for: a worker may register and die at once on the poison job.
        worker = start_worker(wprocs, wdb, "--concurrency", "1", "--prefetch", "4", env=env, wait=False)
        if wait_died_or_settled(wdb, wprocs, worker, ids):
            break
        deaths += 1
    else:
        raise AssertionError(f"not settled after {deaths} worker deaths\n{describe_all(wdb, ids)}")

    rows = job_rows(wdb, ids)
    dead_ordinary = [rows[i].describe() for i in ordinary if rows[i].state == "dead"]
    assert not dead_ordinary, "ordinary jobs were dead-lettered for the poison job's crash:\n" + "\n".join(
        dead_ordinary
    )
    assert_completed(rows, ordinary)
    assert_each_ran_once(wdb, ordinary)
    poison = rows[poison_id]
    assert poison.state == "dead" and poison.errors, poison.describe()
    assert len(runs_of(wdb, poison_id)) == 1 and deaths == 1, (
        f"the poison job ran {len(runs_of(wdb, poison_id))} times and killed {deaths} workers"
    )
