"""Worker processes against a PostgreSQL of their own that is down, crashes, outlasts the lease,
kills their backends or runs out of connection slots.

Each test runs ``pgqueue worker worker_app:queue`` subprocesses on a server of its own
(``pgserver.py``) and judges by the database alone: ``test_log`` holds one row per handler run
(its attempt, the database's clock at the start and, for jobs that sleep, at the end), the jobs
table says what is left. A *run* is one attempt of a job; a run whose ``finished_at`` is set ended
its handler, and such a job must never run again: at-least-once allows a second run only for a
job whose run was cut short (its worker's outcome never reached the database).

Run with ``-s`` to see the measured figures (recovery times, runs cut short, connections held).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import worker_app
from pgserver import PgServer, temporary_server
from worker_helpers import REPO_DIR, SUPPORT_DIR, Db, WorkerProcess, Workers, terminate_backends, wait_until

from pgqueue import JobSpec
from pgqueue.errors import DatabaseUnavailableError
from pgqueue.migrate import upgrade

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_worker_environment")]

SCHEMA = "wout"
APP_ROLE = "app"  # a role without superuser rights: it cannot take the reserved slots

# ---------------------------------------------------------------------------- the rig


class ServerDb(Db):
    """The test's connection, replaced when a restart or an outage has cut it."""

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        for attempt in (1, 2, 3):
            if self.conn.closed or self.conn.broken:
                with contextlib.suppress(psycopg.Error):
                    self.conn.close()
                self.conn = psycopg.connect(self.dsn, autocommit=True)
            try:
                return super().rows(query, params)
            except psycopg.OperationalError:
                if attempt == 3 or not (self.conn.closed or self.conn.broken):
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")


@dataclass
class Rig:
    """A migrated server, the test's connection to it, the app to enqueue with, its workers."""

    server: PgServer
    db: ServerDb
    app: worker_app.App
    workers: Workers

    def ids(self, specs: list[JobSpec]) -> list[int]:
        return self.app.queue.enqueue_many(specs)


@contextlib.contextmanager
def rig(server: PgServer, log_dir: Path, *, user: str = "postgres") -> Iterator[Rig]:
    """Migrate ``server`` (as ``user``, who then owns everything), and start nothing yet."""
    dsn = server.dsn(user=user)
    upgrade(dsn, schema=SCHEMA)
    worker_app.create_tables(dsn, SCHEMA)
    app = worker_app.App(dsn, SCHEMA)
    db = ServerDb(server.dsn(), SCHEMA, psycopg.connect(server.dsn(), autocommit=True))
    workers = Workers(dsn, SCHEMA, log_dir)
    try:
        yield Rig(server, db, app, workers)
    finally:
        workers.stop_all()
        app.queue.close()
        db.conn.close()


# ---------------------------------------------------------------------------- judging runs


@dataclass(frozen=True)
class Run:
    """One attempt of a job as ``test_log`` saw it (rows of the same attempt merged: a handler
    whose connection died after its INSERT committed logs the start twice)."""

    attempt: int
    started: float  # epoch seconds, the database's clock
    finished: bool


def runs_by_job(db: Db) -> dict[int, list[Run]]:
    rows = db.rows(
        "SELECT job_id, attempt, min(extract(epoch FROM started_at))::float8,"
        " bool_or(finished_at IS NOT NULL) FROM {log} GROUP BY job_id, attempt ORDER BY job_id, attempt"
    )
    found: dict[int, list[Run]] = {}
    for job_id, attempt, started, finished in rows:
        found.setdefault(job_id, []).append(Run(attempt, started, finished))
    return found


@dataclass(frozen=True)
class Verdict:
    """What the runs of a set of jobs add up to."""

    never_ran: list[int]
    reran: dict[int, list[Run]]  # jobs with more than one run
    finished_then_reran: dict[int, list[Run]]  # a run that ended its handler, then another run

    def describe(self) -> str:
        return (
            f"never ran: {self.never_ran[:20]}, reran: {len(self.reran)}, "
            f"finished then reran: {dict(list(self.finished_then_reran.items())[:10])}"
        )


def judge(db: Db, ids: list[int]) -> Verdict:
    runs = runs_by_job(db)
    reran = {i: runs[i] for i in ids if len(runs.get(i, [])) > 1}
    return Verdict(
        never_ran=[i for i in ids if i not in runs],
        reran=reran,
        finished_then_reran={i: r for i, r in reran.items() if any(run.finished for run in r[:-1])},
    )


def wait_all_completed(r: Rig, ids: list[int], timeout: float, *alive: WorkerProcess) -> float:
    """Until every job of ``ids`` is completed (a worker of ``alive`` dying fails at once);
    returns the seconds it took."""
    started = time.monotonic()

    def done() -> bool:
        for w in alive:
            if not w.alive():
                raise AssertionError(f"worker {w.pid} died ({w.proc.returncode})\n{w.log_tail()}")
        query = "SELECT count(*) FROM {finished} WHERE id = ANY(%s) AND state = 'completed'"
        return bool(r.db.one(query, [ids]) == len(ids))

    wait_until(done, timeout, lambda: f"not all completed: {r.db.states()}\n{r.workers.logs()}", interval=0.2)
    return time.monotonic() - started


def completed(r: Rig) -> int:
    return int(r.db.one("SELECT count(*) FROM {finished} WHERE state = 'completed'"))


def db_now(r: Rig) -> float:
    return float(r.db.one("SELECT extract(epoch FROM clock_timestamp())::float8"))


def warnings_in(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log_text().splitlines() if " WARNING " in line]


# ---------------------------------------------------------------------------- (a) down at start


def test_worker_started_while_the_database_is_down_claims_within_seconds_of_it_coming_up(
    stopped_pg_server: PgServer, tmp_path: Path
) -> None:
    """Workers are often started before the database (boot order, a restart of both): they must
    keep trying, say why, and claim within seconds once it is up."""
    server = stopped_pg_server
    server.start()
    with rig(server, tmp_path) as r:
        ids = r.ids([JobSpec("record", {"note": f"waiting {i}"}) for i in range(20)])
        r.db.conn.close()
        server.stop()

        worker = r.workers.start("--concurrency", "5")
        time.sleep(10)  # down for ten seconds under a live worker
        assert worker.alive(), worker.log_tail()
        down_warnings = [w for w in warnings_in(worker) if "cannot reach the database" in w]
        assert down_warnings, f"the worker said nothing about the missing database\n{worker.log_tail()}"

        server.start()
        up = time.time()  # same clock as the database's: one machine
        wait_all_completed(r, ids, 15, worker)
        first_claim = float(
            r.db.one("SELECT extract(epoch FROM min(started_at))::float8 FROM {all_jobs} AS j")
        )
        latency = first_claim - up
        print(
            f"\n[down at start] {len(down_warnings)} warnings in 10 s down; first claim "
            f"{latency:.2f} s after the server accepted connections"
        )
        assert latency < 3.0, worker.log_tail()
        verdict = judge(r.db, ids)
        assert not verdict.never_ran and not verdict.reran, verdict.describe()
        assert "database reachable after" in worker.log_text()


# ---------------------------------------------------------------------------- (b) crash mid-drain


def test_crash_restart_mid_drain_reruns_at_most_the_jobs_running_at_the_crash(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """A crash loses the connections, not the outcomes the workers hold: those are written after
    the restart, so only jobs that were running can run again."""
    env = {"PGQUEUE_LEASE_SECONDS": "5", "PGQUEUE_RESCUE_INTERVAL": "1"}
    with rig(pg_server, tmp_path) as r:
        workers = [r.workers.start(env=env), r.workers.start(env=env)]
        r.workers.wait_registered(r.db, *workers)
        ids = r.ids([JobSpec("record", {"sleep": 0.01}) for _ in range(2000)])
        wait_until(lambda: completed(r) >= 600, 20, lambda: f"drain too slow: {r.db.states()}")

        running = {row[0] for row in r.db.rows("SELECT id FROM {jobs} WHERE state = 'running'")}
        crash = db_now(r)
        pg_server.restart("immediate")

        took = wait_all_completed(r, ids, 30, *workers)
        verdict = judge(r.db, ids)
        states = r.db.states()
        print(
            f"\n[crash mid-drain] {len(running)} jobs running at the crash, {len(verdict.reran)} ran "
            f"again, all 2000 completed {took:.1f} s after the restart; states {states}"
        )
        assert states == {"completed": 2000}, "jobs stuck or lost"
        assert not verdict.never_ran, verdict.describe()
        assert not verdict.finished_then_reran, verdict.describe()
        assert len(verdict.reran) <= len(running), verdict.describe()
        late = {i: runs for i, runs in verdict.reran.items() if runs[0].started > crash + 1}
        assert not late, f"jobs first run after the crash ran twice: {late}"


# ---------------------------------------------------------------------------- (c) outage > lease


def test_an_outage_longer_than_the_lease_reruns_no_finished_job(pg_server: PgServer, tmp_path: Path) -> None:
    """Every lease runs out during the outage while every owner is alive: a rescuer that went
    first would re-run jobs whose handlers had finished."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "1"}
    with rig(pg_server, tmp_path) as r:
        workers = [r.workers.start("--concurrency", "25", env=env) for _ in range(2)]
        r.workers.wait_registered(r.db, *workers)
        total = 800
        ids = r.ids([JobSpec("record", {"sleep": 0.5}) for _ in range(total)])
        wait_until(lambda: completed(r) >= 200, 20, lambda: f"drain too slow: {r.db.states()}")

        before = completed(r)
        pg_server.stop("fast")
        time.sleep(6)  # twice the lease: every lease held at the stop has run out
        pg_server.start()

        took = wait_all_completed(r, ids, 30, *workers)
        verdict = judge(r.db, ids)
        cut_short = len(verdict.reran)
        print(
            f"\n[outage 6 s, lease 3 s] {before} of {total} completed at the stop; after it "
            f"{cut_short} jobs whose run was cut short ran again, "
            f"{len(verdict.finished_then_reran)} finished jobs ran again; drained {took:.1f} s after"
        )
        assert r.db.states() == {"completed": total}
        assert not verdict.never_ran, verdict.describe()
        assert not verdict.finished_then_reran, verdict.describe()
        for w in workers:
            assert "heartbeat failed" in w.log_text(), "the lapse of the leases went unreported"


def test_an_idle_worker_rides_out_an_outage_that_pauses_its_claiming(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """An idle worker sits on the waiting list; an outage longer than a renewal interval pauses
    its claiming (its leases are not renewed). Leaving the waiting list then fails too: that
    must be said and lived with, not end the worker; once the server is back, claiming resumes
    and a job enqueued then runs within a few seconds."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "1"}
    with rig(pg_server, tmp_path) as r:
        worker = r.workers.start("--concurrency", "4", env=env)
        r.workers.wait_registered(r.db, worker)
        warm = r.ids([JobSpec("record", {"note": "warm"})])
        wait_all_completed(r, warm, 10, worker)
        wait_until(
            lambda: r.db.one("SELECT count(*) FROM {workers} WHERE waiting_until IS NOT NULL") == 1,
            10,
            worker.log_tail,
        )
        pg_server.stop("fast")
        wait_until(lambda: "claiming paused" in worker.log_text() or not worker.alive(), 15, worker.log_tail)
        time.sleep(1)  # the claimer goes round its loop while paused and the server is down
        pg_server.start()

        wait_until(lambda: "claiming resumes" in worker.log_text() or not worker.alive(), 20, worker.log_tail)
        assert worker.alive(), worker.log_tail()
        after = r.ids([JobSpec("record", {"note": "after"})])
        took = wait_all_completed(r, after, 10, worker)
        print(f"\n[idle worker, outage] claiming resumed; a job enqueued after it ran in {took:.2f} s")
        assert "leaving the waiting list failed" in worker.log_text(), worker.log_tail()


def test_a_database_turned_read_only_loses_no_outcome_and_reruns_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """A server that refuses writes for a while (a managed database locked read-only when its
    storage fills, ``default_transaction_read_only`` for maintenance, a standby behind a moved
    address) is an outage: outcomes of jobs that finish meanwhile wait and are written once it
    takes writes again, none dropped to be run a second time after its lease runs out."""
    with rig(pg_server, tmp_path) as r:
        worker = r.workers.start("--concurrency", "10")
        r.workers.wait_registered(r.db, worker)
        total = 200
        ids = r.ids([JobSpec("nap", {"seconds": 0.3}) for _ in range(total)])
        wait_until(lambda: completed(r) >= 20, 20, lambda: f"drain too slow: {r.db.states()}")
        pg_server.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        pg_server.reload()
        time.sleep(5)
        pg_server.execute("ALTER SYSTEM RESET default_transaction_read_only")
        pg_server.reload()

        took = wait_all_completed(r, ids, 20, worker)  # well inside the 30 s lease
        print(f"\n[read-only 5 s] all {total} jobs completed {took:.1f} s after writes came back")
        attempts = r.db.one("SELECT sum(attempts) FROM {finished} WHERE id = ANY(%s)", [ids])
        assert attempts == total, f"{attempts} attempts for {total} jobs: some ran twice"
        log_text = worker.log_text()
        assert "read-only" in log_text, worker.log_tail()  # the cause is said
        for dropped in ("left to lease rescue", "recorded as failed"):
            assert dropped not in log_text, worker.log_tail()


@contextlib.contextmanager
def small_disk(megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes``, owned by the server's system user: a disk that fills. It is
    mounted outside pytest's temporary directories, which that user cannot enter."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs for a tablespace: run the suite as root", pytrace=False)
    path = Path(tempfile.mkdtemp(prefix="pgqueue-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], check=True)
    try:
        subprocess.run(["chown", "postgres:postgres", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def fill(server: PgServer, tablespace: str) -> int:
    """Write incompressible rows into ``tablespace`` until the server says its disk is full;
    returns the megabytes written."""
    server.execute(f"CREATE TABLE public.filler (b text) TABLESPACE {tablespace}")
    server.execute("ALTER TABLE public.filler ALTER COLUMN b SET STORAGE EXTERNAL")
    written = 0
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        while True:
            try:
                conn.execute(
                    "INSERT INTO public.filler"
                    " SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 32768)"
                )
            except psycopg.errors.DiskFull:
                return written
            written += 1


def test_a_database_out_of_disk_space_loses_no_outcome_and_reruns_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """The disk under pgqueue's tables fills (a tablespace on a 32 MB tmpfs, topped up): every
    write that needs a new page fails with SQLSTATE 53100. That is an outage: the worker keeps
    the outcomes of jobs that finish meanwhile and writes them once space is freed, a bulk
    enqueue is refused whole with the server's words, and nothing runs twice."""
    with small_disk(32) as location, rig(pg_server, tmp_path) as r:
        pg_server.execute(f"CREATE TABLESPACE small LOCATION '{location}'")
        tables = ("jobs", "finished_jobs", "dead_letter")
        for table in tables:
            pg_server.execute(f"ALTER TABLE {SCHEMA}.{table} SET TABLESPACE small")
        indexes = "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = ANY(%s)"
        for (index,) in pg_server.execute(indexes, [SCHEMA, list(tables)]):
            pg_server.execute(f"ALTER INDEX {SCHEMA}.{index} SET TABLESPACE small")
        worker = r.workers.start("--concurrency", "10")
        r.workers.wait_registered(r.db, worker)
        ids = r.ids([JobSpec("record", {"sleep": 0.1}) for _ in range(1000)])
        wait_until(lambda: completed(r) >= 20, 20, lambda: f"drain too slow: {r.db.states()}")
        megabytes = fill(pg_server, "small")
        bulk = [JobSpec("record", {"note": "x" * 1000}) for _ in range(2000)]  # ~2 MB: new pages
        with pytest.raises(DatabaseUnavailableError, match="No space left on device"):
            r.ids(bulk)
        assert r.db.one("SELECT count(*) FROM {jobs} WHERE args ? 'note'") == 0  # nothing of it
        time.sleep(5)
        pg_server.execute("DROP TABLE public.filler")
        ids += r.ids(bulk)

        took = wait_all_completed(r, ids, 60, worker)
        print(f"\n[disk full 5 s, {megabytes} MB filled] all {len(ids)} jobs completed {took:.1f} s after")
        verdict = judge(r.db, ids)
        assert not verdict.never_ran and not verdict.reran, verdict.describe()
        attempts = r.db.one("SELECT sum(attempts) FROM {finished} WHERE id = ANY(%s)", [ids])
        assert attempts == len(ids), f"{attempts} attempts for {len(ids)} jobs: some ran twice"
        log_text = worker.log_text()
        assert "No space left on device" in log_text, worker.log_tail()  # the cause is said
        for dropped in ("left to lease rescue", "recorded as failed"):
            assert dropped not in log_text, worker.log_tail()


def drain_through_a_stall(
    pg_server: PgServer, tmp_path: Path, label: str, stall: Callable[[], None]
) -> list[str]:
    """Two workers (lease 3 s, rescue rounds every 0.2 s: five per renewal, so one runs in the
    second after the stall ends) drain 4 jobs of 8 s and 400 of 0.1 s; ``stall`` runs mid-drain.
    Asserts every job ran exactly once; returns the workers' logs."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "0.2"}
    with rig(pg_server, tmp_path) as r:
        workers = [r.workers.start("--concurrency", "10", env=env) for _ in range(2)]
        for worker in workers:
            r.workers.wait_registered(r.db, worker)
        ids = r.ids([JobSpec("record", {"sleep": 8.0}) for _ in range(4)])
        ids += r.ids([JobSpec("record", {"sleep": 0.1}) for _ in range(400)])
        wait_until(lambda: completed(r) >= 20, 20, lambda: f"drain too slow: {r.db.states()}")
        stall()
        took = wait_all_completed(r, ids, 60, *workers)
        verdict = judge(r.db, ids)
        print(f"\n[{label}, lease 3 s] {len(ids)} done {took:.1f} s after; reran {len(verdict.reran)}")
        assert not verdict.never_ran and not verdict.reran, verdict.describe()
        attempts = r.db.one("SELECT sum(attempts) FROM {finished} WHERE id = ANY(%s)", [ids])
        assert attempts == len(ids), f"{attempts} attempts for {len(ids)} jobs"
        return [worker.log_text() for worker in workers]


def test_a_lock_on_the_jobs_table_longer_than_the_lease_reruns_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """An exclusive lock on ``jobs`` held past the lease (a VACUUM FULL, a table rewrite, an
    admin's LOCK TABLE in an open transaction) holds up every claim, renewal and rescue; when it
    ends they all run at once. A lease computed from the time a statement was sent (``now()``)
    is already over by then, and a rescue that waited behind the lock judges leases by the
    moment it began waiting: the jobs still running, and those just claimed, ran a second time."""

    def lock() -> None:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin, admin.transaction():
            admin.execute(f"LOCK TABLE {SCHEMA}.jobs IN ACCESS EXCLUSIVE MODE")
            time.sleep(7)  # more than twice the lease

    drain_through_a_stall(pg_server, tmp_path, "locked 7 s", lock)


def server_processes(server: PgServer) -> list[int]:
    """The postmaster and every process it started (read from /proc: no procps needed)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


def test_a_server_frozen_longer_than_the_lease_reruns_nothing(pg_server: PgServer, tmp_path: Path) -> None:
    """Every server process stopped (SIGSTOP) for more than twice the lease, as a VM pause does,
    then resumed: connections stay up, every statement sent meanwhile begins at the thaw (unlike
    behind a lock, where it began before the wait), renewals and rescues land together, and each
    worker pauses claiming until its leases are renewed. No job runs twice, none is lost."""

    def freeze() -> None:
        frozen = server_processes(pg_server)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(7)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)

    for log_text in drain_through_a_stall(pg_server, tmp_path, "frozen 7 s", freeze):
        assert "heartbeat: no answer from the database" in log_text, log_text[-3000:]  # felt, and said


# ---------------------------------------------------------------------------- (d) backend kills


def test_terminating_a_workers_backends_every_half_second_loses_and_repeats_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """Connections cut at any point (idle, mid-claim, mid-ack) are replaced by the service that
    meets them; no outcome is dropped, none is written twice."""
    env = {"PGQUEUE_LEASE_SECONDS": "5", "PGQUEUE_RESCUE_INTERVAL": "1"}
    with rig(pg_server, tmp_path) as r:
        worker = r.workers.start(env=env)
        r.workers.wait_registered(r.db, worker)
        ids: list[int] = []
        kills: list[int] = []
        started = time.monotonic()
        while time.monotonic() - started < 8:
            ids += r.ids([JobSpec("record", {"sleep": 0.02}) for _ in range(60)])
            time.sleep(0.5)
            kills.append(terminate_backends(r.db, worker.appname))
        assert worker.alive(), worker.log_tail()

        took = wait_all_completed(r, ids, 25, worker)
        verdict = judge(r.db, ids)
        print(
            f"\n[kill storm] {len(kills)} rounds, {sum(kills)} backends ended, {len(ids)} jobs: "
            f"{len(verdict.reran)} ran again after a cut-short run, all completed {took:.1f} s "
            "after the storm"
        )
        assert sum(1 for k in kills if k > 0) >= len(kills) - 1, f"backends not found to end: {kills}"
        assert not verdict.never_ran, verdict.describe()
        assert not verdict.finished_then_reran, verdict.describe()
        assert r.db.one("SELECT count(*) FROM {dead_letter}") == 0


# ---------------------------------------------------------------------------- (e) slots exhausted


def hog(server: PgServer, role: str) -> list[psycopg.Connection[Any]]:
    """Superuser connections, taken one at a time until a connection as ``role`` is refused
    (``APP_ROLE``: one slot is left, the reserved one; ``postgres``: none is left)."""
    hogs: list[psycopg.Connection[Any]] = []
    for _ in range(100):
        try:
            psycopg.connect(server.dsn(user=role)).close()
        except psycopg.OperationalError:
            return hogs
        hogs.append(psycopg.connect(server.dsn(), autocommit=True))
    raise AssertionError("the server never ran out of slots")


def release(hogs: list[psycopg.Connection[Any]]) -> None:
    for conn in hogs:
        conn.close()
    hogs.clear()


def test_a_worker_out_of_connection_slots_says_so_and_recovers_when_they_free(tmp_path: Path) -> None:
    """Out of slots the server refuses the login: the worker must keep trying and say why at each
    try, at start and later, and go on once slots free."""
    settings = {"max_connections": 10, "superuser_reserved_connections": 1}
    with temporary_server(settings=settings) as server:
        server.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
        server.execute(f"GRANT CREATE ON DATABASE postgres TO {APP_ROLE}")
        with rig(server, tmp_path, user=APP_ROLE) as r:
            ids = r.ids([JobSpec("record", {"note": "before"}) for _ in range(20)])
            r.app.queue.close()  # its pooled connection would hold a slot

            # 1. No slot for the worker's role at start.
            hogs = hog(server, APP_ROLE)
            worker = r.workers.start("--concurrency", "2")
            time.sleep(4)
            assert worker.alive(), worker.log_tail()
            refused = [w for w in warnings_in(worker) if "connection slots are reserved" in w]
            assert len(refused) >= 2, f"no clear, repeated warning\n{worker.log_tail()}"
            assert not r.db.rows("SELECT 1 FROM {workers}"), "registered without a connection?"
            release(hogs)
            freed = time.monotonic()
            r.workers.wait_registered(r.db, worker, timeout=10)
            first = time.monotonic() - freed
            wait_all_completed(r, ids, 15, worker)

            # 2. Running, its connections cut, and every slot taken: it must keep saying so.
            r.db.conn.execute(f"ALTER ROLE {APP_ROLE} CONNECTION LIMIT 0")  # no reconnect in the gap
            r.db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [APP_ROLE])
            hogs = hog(server, "postgres")
            r.db.conn.execute(f"ALTER ROLE {APP_ROLE} CONNECTION LIMIT -1")
            later = r.app.queue.enqueue_many(
                [JobSpec("record", {"note": "while full"}) for _ in range(20)], conn=r.db.conn
            )
            seen = len(warnings_in(worker))
            time.sleep(4)
            assert worker.alive(), worker.log_tail()
            new = warnings_in(worker)[seen:]
            full = [w for w in new if "too many clients" in w or "too many connections" in w]
            assert len(full) >= 2, f"silent while out of slots\n{worker.log_tail()}"
            ran = r.db.one("SELECT count(*) FROM {log} WHERE job_id = ANY(%s)", [later])
            assert ran == 0
            release(hogs)
            freed = time.monotonic()
            wait_all_completed(r, later, 15, worker)
            second = time.monotonic() - freed
            verdict = judge(r.db, ids + later)
            print(
                f"\n[slots] refused at start: {len(refused)} warnings in 4 s, registered "
                f"{first:.1f} s after slots freed; cut off while running: {len(full)} warnings in "
                f"4 s, jobs done {second:.1f} s after slots freed\n  {refused[0]}\n  {full[0]}"
            )
            assert not verdict.never_ran and not verdict.reran, verdict.describe()


# ---------------------------------------------------------------------------- (f) names and count


def start_unnamed_worker(server: PgServer, log_dir: Path, env: dict[str, str]) -> WorkerProcess:
    """``pgqueue worker worker_app:queue`` without ``PGAPPNAME``, so pgqueue names its connections."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PGAPPNAME", "NOTIFY_SOCKET")}
    full_env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(SUPPORT_DIR), os.environ.get("PYTHONPATH")])),
        PGQUEUE_DSN=server.dsn(),
        PGQUEUE_SCHEMA=SCHEMA,
        PGQUEUE_LOG_LEVEL="INFO",
        **env,
    )
    cmd = [sys.executable, "-m", "pgqueue", "worker", "worker_app:queue"]
    log_path = log_dir / "unnamed-worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_DIR, env=full_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return WorkerProcess(proc, log_path, "", cmd)


EXPECTED_ROLES = {"worker", "worker-ack", "worker-upkeep", "worker-lease", "worker-listen"}


def test_worker_connections_are_named_after_host_pid_and_service(pg_server: PgServer, tmp_path: Path) -> None:
    """``pg_stat_activity`` must tell which worker, on which host, holds each backend, and the
    connection budget in docs/operations.md must match what a worker holds."""
    with rig(pg_server, tmp_path) as r:
        worker = start_unnamed_worker(
            pg_server, tmp_path, {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
        )
        r.workers.started.append(worker)  # stopped with the rest
        r.workers.wait_registered(r.db, worker)
        ids = r.ids([JobSpec("record", {"sleep": 0.05}) for _ in range(30)])
        wait_all_completed(r, ids, 15, worker)
        host = re.escape(socket.gethostname())
        pattern = re.compile(rf"^pgqueue-(worker(?:-[a-z-]+)?) {host}:{worker.pid}$")

        def roles() -> dict[str, int]:
            held: dict[str, int] = {}
            for (name,) in r.db.rows(
                "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'pgqueue-worker%%'"
            ):
                match = pattern.match(name)
                assert match, f"connection named {name!r}, not pgqueue-worker… host:{worker.pid}"
                held[match.group(1)] = held.get(match.group(1), 0) + 1
            return held

        # Steady state: the listener's self-test connection (worker-listen-test) comes and goes.
        def steady() -> dict[str, int]:
            held = roles()
            return held if set(held) == EXPECTED_ROLES else {}

        held = wait_until(steady, 10, lambda: str(roles()))
        handlers = r.db.one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND application_name = '' AND pid <> pg_backend_pid()"
        )
        print(
            f"\n[connections] worker pid {worker.pid}: {sum(held.values())} of pgqueue's own "
            f"{dict(sorted(held.items()))}, plus {handlers} opened by the app's handlers"
        )
        assert held == dict.fromkeys(EXPECTED_ROLES, 1)
