"""Helpers for the worker tests: worker subprocesses, an in-process worker thread, waiting.

Every wait here has a deadline, and every process or thread started here is stopped (killed if
need be) when its context manager exits, so a failing test leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import worker_app
from psycopg import sql

from pgqueue.worker import AsyncWorker

SUPPORT_DIR = Path(__file__).resolve().parent
REPO_DIR = SUPPORT_DIR.parents[1]
T = TypeVar("T")


# ---------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    message: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s: {text}")
        time.sleep(interval)


async def wait_for_db(db: Db, query: str, expected: object, timeout: float) -> None:
    """Poll ``db.one(query)`` without blocking the event loop until it returns ``expected``."""
    deadline = time.monotonic() + timeout
    while db.one(query) != expected:
        assert time.monotonic() < deadline, f"timed out: {query} != {expected!r}"
        await asyncio.sleep(0.05)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * p / 100
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class PgqueueProcess:
    """One ``python -m pgqueue ...`` process (scheduler, CLI command…), its output in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log_path = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgqueue", *args],
                cwd=REPO_DIR,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + "\n".join(
            self.log().splitlines()[-lines:]
        )

    def wait_for_log(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited before logging {text!r}\n{self.tail()}")
            return text in self.log()

        wait_until(seen, timeout, lambda: f"{self.name} never logged {text!r}\n{self.tail()}")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit code (killed and failed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s of SIGTERM\n{self.tail()}"
            ) from None


# ---------------------------------------------------------------------------- the database


HISTORY_COLUMNS = (
    "id, queue, task, args, priority, state, run_at, attempts, max_attempts, timeout, unique_key,"
    " scheduled_for, worker_id, progress, result, errors, created_at, started_at, finished_at,"
    " unrecorded_losses"
)
"""The columns a job keeps once it has finished (finished_jobs), which jobs has too."""


@dataclass
class Db:
    """The test's own autocommit connection, with shorthands on the test schema."""

    dsn: str
    schema: str
    conn: psycopg.Connection[Any]

    def t(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """``query`` with ``{jobs}`` (live jobs), ``{finished}`` (completed and cancelled ones),
        ``{all_jobs}`` (both, a subquery: give it a name), ``{dead_letter}``, ``{log}``,
        ``{flags}``, ``{queues}``, ``{workers}``, ``{schedules}`` standing for the schema's
        tables."""
        q = sql.SQL(query).format(  # type: ignore[arg-type]
            jobs=self.t("jobs"),
            finished=self.t("finished_jobs"),
            all_jobs=sql.SQL("(SELECT {c} FROM {j} UNION ALL SELECT {c} FROM {f})").format(
                c=sql.SQL(HISTORY_COLUMNS), j=self.t("jobs"), f=self.t("finished_jobs")
            ),
            dead_letter=self.t("dead_letter"),
            log=self.t("test_log"),
            flags=self.t("test_flags"),
            queues=self.t("queues"),
            workers=self.t("workers"),
            schedules=self.t("schedules"),
        )
        return self.conn.execute(q, params).fetchall()

    def one(self, query: str, params: Any = None) -> Any:
        rows = self.rows(query, params)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    def set_flag(self, name: str) -> None:
        self.rows("INSERT INTO {flags} VALUES (%s) ON CONFLICT DO NOTHING RETURNING name", [name])

    def states(self) -> dict[str, int]:
        return dict(self.rows("SELECT state::text, count(*) FROM {all_jobs} AS j GROUP BY 1"))

    def run_counts(self) -> dict[int, int]:
        """How many runs each job's handler logged (job id -> runs; jobs never run are absent)."""
        return dict(self.rows("SELECT job_id, count(*) FROM {log} GROUP BY job_id"))

    def runs(self, job_id: int) -> int:
        """How many runs one job's handler logged."""
        return int(self.one("SELECT count(*) FROM {log} WHERE job_id = %s", [job_id]))


@pytest.fixture
def wapp(postgres_dsn: str, pgqueue_schema: str) -> Iterator[worker_app.App]:
    """The test app on a fresh schema, with its result tables."""
    worker_app.create_tables(postgres_dsn, pgqueue_schema)
    built = worker_app.App(postgres_dsn, pgqueue_schema)
    yield built
    built.queue.close()


@pytest.fixture
def wdb(wapp: worker_app.App, postgres_dsn: str) -> Iterator[Db]:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield Db(postgres_dsn, wapp.schema, conn)


# ---------------------------------------------------------------------------- worker processes


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    appname: str
    args: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"worker {self.pid} did not exit within {timeout}s\n{self.log_tail()}"
            ) from exc

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return f"--- worker {self.pid} log ({self.log_path}) ---\n" + "\n".join(text[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Workers:
    """Starts ``pgqueue worker worker_app:queue`` (or another app) subprocesses; kills leftovers on exit."""

    dsn: str
    schema: str
    log_dir: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        log_level: str = "INFO",
        app: str = "worker_app:queue",
        pythonpath: Sequence[str | Path] = (),
    ) -> WorkerProcess:
        """``pgqueue worker APP *args``; ``pythonpath`` entries go before ``tests/`` (for APP)."""
        appname = f"pgq-test-worker-{uuid.uuid4().hex[:8]}"
        paths = [*map(str, pythonpath), str(SUPPORT_DIR), os.environ.get("PYTHONPATH")]
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, paths)),
            "PGQUEUE_DSN": self.dsn,
            "PGQUEUE_SCHEMA": self.schema,
            "PGAPPNAME": appname,  # every connection of the process carries it: tests find them
            "PGQUEUE_LOG_LEVEL": log_level,
            **(env or {}),
        }
        full_env.pop("NOTIFY_SOCKET", None)
        cmd = [sys.executable, "-m", "pgqueue", "worker", app, *args]
        log_path = self.log_dir / f"{appname}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_DIR,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        worker = WorkerProcess(proc, log_path, appname, cmd)
        self.started.append(worker)
        return worker

    def wait_registered(self, db: Db, *workers: WorkerProcess, timeout: float = 20) -> None:
        """Until each worker has opened its pool and written its row in the workers table."""
        pids = {w.pid for w in workers}

        def ready() -> bool:
            for w in workers:
                if not w.alive():
                    raise AssertionError(f"worker {w.pid} exited with {w.proc.returncode}\n{w.log_tail()}")
            found = {r[0] for r in db.rows("SELECT pid FROM {workers}")}
            return pids <= found

        wait_until(
            ready,
            timeout,
            lambda: "workers did not register\n" + "\n".join(w.log_tail() for w in workers),
        )

    def stop_all(self) -> None:
        for w in self.started:
            if w.alive():
                w.proc.kill()
        for w in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(w.log_tail() for w in self.started)


@pytest.fixture
def wprocs(postgres_dsn: str, wapp: worker_app.App, tmp_path: Path) -> Iterator[Workers]:
    ws = Workers(postgres_dsn, wapp.schema, tmp_path)
    try:
        yield ws
    finally:
        ws.stop_all()


def terminate_backends(db: Db, appname: str) -> int:
    """``pg_terminate_backend`` every connection a worker process holds; how many were ended."""
    rows = db.rows(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        [appname],
    )
    return sum(1 for (ok,) in rows if ok)


# ---------------------------------------------------------------------------- in-process worker


class ThreadWorker:
    """An :class:`AsyncWorker` on its own event loop in a thread, for tests that need no process.

    The test thread stays free to enqueue and poll with plain blocking calls.
    """

    def __init__(self, app: worker_app.App, db: Db, **settings: Any) -> None:
        self.app = app
        self.db = db
        self.worker = AsyncWorker(app.queue, install_signal_handlers=False, **settings)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-worker", daemon=True)

    @property
    def id(self) -> str:
        return self.worker.id

    def _main(self) -> None:
        async def run() -> None:
            try:
                await self.worker.run()
            finally:
                await self.app.aclose()

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self, timeout: float = 15) -> ThreadWorker:
        self._thread.start()
        wait_until(
            lambda: (
                self.error is not None or self.db.rows("SELECT 1 FROM {workers} WHERE id = %s", [self.id])
            ),
            timeout,
            "in-process worker did not register",
        )
        if self.error is not None:
            raise AssertionError(f"worker failed to start: {self.error!r}")
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 20) -> None:
        self.worker.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"in-process worker did not stop within {timeout}s")
        if self.error is not None:
            raise AssertionError(f"worker crashed: {self.error!r}") from self.error


@contextlib.contextmanager
def thread_worker(app: worker_app.App, db: Db, **settings: Any) -> Iterator[ThreadWorker]:
    w = ThreadWorker(app, db, **settings).start()
    try:
        yield w
    finally:
        w.stop()
