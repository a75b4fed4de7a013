"""pgqueue behind a real PgBouncer: transaction pooling with prepared statements off, LISTEN that
a pooler swallows, and session pooling with fewer server connections than the workers want.

The transaction-mode tests share one server and one bouncer (``auth_type = md5``, so every
connection also proves the password reaches PgBouncer); each test has a schema of its own,
migrated straight on the server (migrations take an advisory lock that transaction pooling
would not keep). Worker processes run ``pgbouncer:queue`` (``pgbouncer.py``): ``worker_app``'s
handlers, whose own logging connections never prepare statements, as any connection through a
transaction pooler must not.

Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import worker_app
from pgbouncer import PgBouncer, running_pgbouncer
from pgserver import PgServer, temporary_server
from psycopg import sql
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from worker_helpers import REPO_DIR, Db, WorkerProcess, Workers, percentile, wait_until

from pgqueue import AsyncQueue, JobSpec, Queue
from pgqueue.errors import AuthenticationError
from pgqueue.migrate import upgrade

pytestmark = pytest.mark.slow

FAULTS_DIR = Path(__file__).resolve().parent
APP = "pgbouncer:queue"
OFF = {"PGQUEUE_PREPARED_STATEMENTS": "off"}
DEAF_WARNING = "LISTEN does not deliver notifications"


@pytest.fixture(autouse=True)
def _prepared_statements_off(clean_worker_environment: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets configures pgqueue; prepared statements are off, as behind any
    transaction pooler."""
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "off")


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    with temporary_server() as started:
        yield started


@pytest.fixture(scope="module")
def bouncer(server: PgServer) -> Iterator[PgBouncer]:
    """Transaction pooling, md5 passwords from an auth_file, 20 server connections."""
    with running_pgbouncer(server, pool_mode="transaction", auth_type="md5", default_pool_size=20) as b:
        yield b


@pytest.fixture
def schema(server: PgServer) -> Iterator[str]:
    """A migrated schema of the test's own, with worker_app's tables."""
    name = f"pgb_{uuid.uuid4().hex[:8]}"
    upgrade(server.dsn(), schema=name)
    worker_app.create_tables(server.dsn(), name)
    yield name
    server.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)).as_string())


@pytest.fixture
def db(server: PgServer, schema: str) -> Iterator[Db]:
    """The test's own connection, straight to the server."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        yield Db(server.dsn(), schema, conn)


@pytest.fixture
def app(server: PgServer, schema: str) -> Iterator[worker_app.App]:
    """The app's queue straight on the server, to set up jobs for the workers."""
    built = worker_app.App(server.dsn(), schema)
    yield built
    built.queue.close()


def job_count(db: Db, ids: list[int]) -> int:
    return int(db.one("SELECT count(*) FROM {all_jobs} AS j WHERE id = ANY(%s)", [ids]))


def completed_count(db: Db, ids: list[int]) -> int:
    return int(db.one("SELECT count(*) FROM {finished} WHERE id = ANY(%s) AND state = 'completed'", [ids]))


def logged_count(db: Db, ids: list[int]) -> int:
    """How many of the jobs' handlers have started (rows in test_log)."""
    return int(db.one("SELECT count(DISTINCT job_id) FROM {log} WHERE job_id = ANY(%s)", [ids]))


# ---------------------------------------------------------------------------- enqueueing


def test_sync_enqueue_from_eight_threads(bouncer: PgBouncer, schema: str, db: Db) -> None:
    """The queue's pool shares server connections with other clients: every enqueue must land
    whole, whichever server connection its transaction gets."""
    ids: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with Queue(bouncer.dsn(), schema=schema) as queue:
        assert not queue.prepared_statements

        def produce(thread: int) -> None:
            for i in range(25):
                try:
                    job_id = queue.enqueue("t", {"thread": thread, "i": i})
                except Exception as exc:  # collected: the test names every failure
                    errors.append(exc)
                    continue
                with lock:
                    ids.append(job_id)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        took = time.monotonic() - started
    pool = bouncer.pool()
    print(
        f"\n[pgbouncer tx] 200 enqueues from 8 threads in {took:.2f} s over "
        f"{pool['sv_active'] + pool['sv_idle']} server connections"
    )
    assert not errors, errors[:5]
    assert len(ids) == len(set(ids)) == 200
    assert job_count(db, ids) == 200


async def test_async_enqueue(bouncer: PgBouncer, schema: str, db: Db) -> None:
    """The async pool through the pooler, with enqueues in flight at once."""
    async with AsyncQueue(bouncer.dsn(), schema=schema) as queue:
        ids = await asyncio.gather(*(queue.enqueue("t", {"i": i}) for i in range(200)))
        job = await queue.get_job(ids[0])
    assert job is not None and job.args == {"i": 0}
    assert len(set(ids)) == 200
    assert job_count(db, list(ids)) == 200


def test_bulk_enqueue(bouncer: PgBouncer, schema: str, db: Db) -> None:
    """COPY and the unique-key path each run in one transaction: the pooler keeps it whole."""
    with Queue(bouncer.dsn(), schema=schema) as queue:
        ids = queue.enqueue_many([JobSpec("t", {"i": i}) for i in range(1000)])
        # Unique keys take the other path (INSERT … ON CONFLICT, then a look-up of the holders).
        keyed = queue.enqueue_many([JobSpec("t", {"i": i}, unique_key=f"k{i % 25}") for i in range(50)])
    assert len(set(ids)) == 1000 and job_count(db, ids) == 1000
    assert len(set(keyed)) == 25 and keyed[:25] == keyed[25:]


def test_enqueue_in_the_callers_psycopg_transaction(bouncer: PgBouncer, schema: str, db: Db) -> None:
    """A job enqueued on the caller's connection commits or rolls back with the caller's
    transaction; and why that connection needs ``prepare_threshold=None`` (shown failing)."""
    with Queue(bouncer.dsn(), schema=schema) as queue:
        # The caller's own connection: psycopg would prepare at the fifth run of a statement.
        with psycopg.connect(bouncer.dsn(), prepare_threshold=None) as conn:
            kept = []
            for i in range(10):
                with conn.transaction():
                    kept.append(queue.enqueue("t", {"i": i}, conn=conn))
            with conn.transaction():
                job_id = queue.enqueue("t", {"gone": True}, conn=conn)
                assert job_count(db, [job_id]) == 0, "visible before the caller's commit"
                raise psycopg.Rollback()  # the caller's transaction ends without a commit
        assert job_count(db, kept) == 10
        assert job_count(db, [job_id]) == 0, "the rolled-back job was kept"

        # Without prepare_threshold=None the caller's connection breaks as soon as a prepared
        # statement meets a server connection that never saw it.
        with psycopg.connect(bouncer.dsn()) as conn, psycopg.connect(bouncer.dsn()) as other:
            for i in range(6):
                with conn.transaction():
                    queue.enqueue("t", {"prepared": i}, conn=conn)
            with other.transaction():
                other.execute("SELECT 1")  # holds the server connection conn prepared on
                with pytest.raises(psycopg.errors.InvalidSqlStatementName), conn.transaction():
                    queue.enqueue("t", {"elsewhere": True}, conn=conn)


def test_enqueue_in_a_sqlalchemy_session(bouncer: PgBouncer, schema: str, db: Db) -> None:
    """The same through a SQLAlchemy Session on psycopg, its engine told not to prepare."""
    url = bouncer.dsn().replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, connect_args={"prepare_threshold": None}, pool_size=2)
    try:
        with Queue(bouncer.dsn(), schema=schema) as queue:
            kept = []
            for i in range(8):
                with Session(engine) as session:
                    session.execute(text("SELECT 1"))
                    kept.append(queue.enqueue("t", {"i": i}, conn=session))
                    session.commit()
            with Session(engine) as session:
                dropped = queue.enqueue("t", {"gone": True}, conn=session)
                session.rollback()
    finally:
        engine.dispose()
    assert job_count(db, kept) == 8
    assert job_count(db, [dropped]) == 0


def test_migrate_through_the_pooler(bouncer: PgBouncer, server: PgServer) -> None:
    """Migrations run in one transaction (their advisory lock is transaction-scoped): transaction
    pooling keeps them whole."""
    name = f"pgb_migrate_{uuid.uuid4().hex[:8]}"
    try:
        upgrade(bouncer.dsn(), schema=name)
        with Queue(bouncer.dsn(), schema=name) as queue:
            assert queue.get_job(queue.enqueue("t")) is not None
    finally:
        server.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)).as_string())


def test_a_wrong_password_is_named_at_once(bouncer: PgBouncer, schema: str) -> None:
    """PgBouncer refuses the password itself: retrying cannot help, so no wait before saying so."""
    started = time.monotonic()
    with Queue(bouncer.dsn(password="wrong"), schema=schema) as queue, pytest.raises(AuthenticationError):
        queue.enqueue("t")
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------------------- workers


def start_workers(
    dsn: str, schema: str, log_dir: Path, count: int, *args: str, env: dict[str, str] | None = None
) -> tuple[Workers, list[WorkerProcess]]:
    workers = Workers(dsn, schema, log_dir)
    full_env = {**OFF, **(env or {})}
    started = [workers.start(*args, env=full_env, app=APP, pythonpath=[FAULTS_DIR]) for _ in range(count)]
    return workers, started


def start_latencies(app: worker_app.App, db: Db, count: int) -> list[float]:
    """Seconds from each job's enqueue to its handler's start, one job at a time (database clock)."""
    latencies = []
    for i in range(count):
        job_id = app.queue.enqueue("record", {"note": f"latency {i}"})
        wait_until(functools.partial(logged_count, db, [job_id]), 10, "job never ran")
        latencies.append(
            float(
                db.one(
                    "SELECT extract(epoch FROM l.started_at - j.created_at)::float8"
                    " FROM {log} AS l JOIN {all_jobs} AS j ON j.id = l.job_id WHERE l.job_id = %s",
                    [job_id],
                )
            )
        )
        time.sleep(0.3)
    return latencies


def test_two_workers_drain_2000_jobs_each_exactly_once(
    bouncer: PgBouncer, app: worker_app.App, db: Db, tmp_path: Path
) -> None:
    """Claims, starts, acks and heartbeats of two workers interleave on shared server
    connections: each job must still run once and none stay running."""
    workers, procs = start_workers(bouncer.dsn(), app.schema, tmp_path, 2)
    try:
        workers.wait_registered(db, *procs)
        ids = app.queue.enqueue_many([JobSpec("record", {"note": f"n{i}"}) for i in range(2000)])
        started = time.monotonic()
        wait_until(
            lambda: db.one("SELECT count(*) FROM {finished} WHERE state = 'completed'") == 2000,
            30,
            lambda: f"states {db.states()}\n{workers.logs()}",
            interval=0.1,
        )
        took = time.monotonic() - started
        pool = bouncer.pool()
    finally:
        workers.stop_all()
    runs = dict(db.rows("SELECT job_id, count(*) FROM {log} GROUP BY job_id"))
    print(
        f"\n[pgbouncer tx] 2 workers drained 2000 jobs in {took:.1f} s over "
        f"{pool['sv_active'] + pool['sv_idle']} server connections for "
        f"{pool['cl_active'] + pool['cl_waiting']} clients"
    )
    assert {i: runs.get(i, 0) for i in ids if runs.get(i, 0) != 1} == {}
    assert db.states() == {"completed": 2000}
    assert "prepared statement" not in workers.logs()


def test_a_worker_behind_transaction_pooling_says_listen_is_deaf_once_and_polls(
    bouncer: PgBouncer, app: worker_app.App, db: Db, tmp_path: Path
) -> None:
    """LISTEN through a transaction pooler never delivers: the worker must notice, say so once,
    and poll often enough that a job waits no more than ~0.5 s."""
    workers, (worker,) = start_workers(bouncer.dsn(), app.schema, tmp_path, 1)
    try:
        workers.wait_registered(db, worker)
        # the self-test waits 2 s for its NOTIFY, then the worker says so and polls
        wait_until(lambda: DEAF_WARNING in worker.log_text(), 10, worker.log_tail)
        latencies = start_latencies(app, db, 8)
        time.sleep(1)  # a second warning, if any, would come with the polls
        text_ = worker.log_text()
    finally:
        workers.stop_all()
    warned = text_.count(DEAF_WARNING)
    print(
        f"\n[pgbouncer tx, LISTEN through the pooler] deaf warnings: {warned}; start latency "
        f"max {max(latencies):.2f} s, median {percentile(latencies, 50):.2f} s"
    )
    assert warned == 1, f"the deaf LISTEN was reported {warned} times, not once\n{worker.log_tail()}"
    assert max(latencies) < 0.6, f"not polling often: {latencies}"


def test_listen_dsn_straight_to_the_server_keeps_wake_ups_instant(
    bouncer: PgBouncer, server: PgServer, app: worker_app.App, db: Db, tmp_path: Path
) -> None:
    """With LISTEN sent straight to the server, wake-ups stay instant and nothing is reported."""
    # Named in the DSN (which wins over PGAPPNAME), so the test finds the direct connection.
    env = {"PGQUEUE_LISTEN_DSN": server.dsn(tcp=True) + "?application_name=direct-listen"}
    workers, (worker,) = start_workers(bouncer.dsn(), app.schema, tmp_path, 1, env=env)
    try:
        workers.wait_registered(db, worker)
        time.sleep(3)
        latencies = start_latencies(app, db, 8)
        text_ = worker.log_text()
        listening = db.one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'direct-listen'")
    finally:
        workers.stop_all()
    print(
        f"\n[pgbouncer tx, PGQUEUE_LISTEN_DSN direct] start latency max {max(latencies):.3f} s, "
        f"median {percentile(latencies, 50):.3f} s"
    )
    assert DEAF_WARNING not in text_
    assert listening == 1
    assert percentile(latencies, 50) < 0.15 and max(latencies) < 0.5, latencies


def test_a_scheduler_through_the_pooler_enqueues_its_fires(
    bouncer: PgBouncer, schema: str, db: Db, tmp_path: Path
) -> None:
    """The scheduler's claim of each fire time and its enqueue run in one transaction each."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env.update(PGQUEUE_DSN=bouncer.dsn(), PGQUEUE_SCHEMA=schema, PGQUEUE_LOG_LEVEL="INFO", **OFF)
    log_path = tmp_path / "scheduler.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgqueue", "scheduler", "tests.support.scheduler_app:queue"],
            cwd=REPO_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:

        def fires() -> int:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            return int(
                db.one("SELECT count(DISTINCT scheduled_for) FROM {all_jobs} AS j WHERE task = 'tick'")
            )

        wait_until(lambda: fires() >= 4, 15, lambda: log_path.read_text(errors="replace"))
        clients = [
            c for c in bouncer.admin("SHOW CLIENTS") if c["application_name"].startswith("pgqueue-scheduler")
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    output = log_path.read_text(errors="replace")
    print(
        f"\n[pgbouncer tx] scheduler: {fires_seen(db)} fires enqueued through the pooler, "
        f"{len(clients)} client connections held"
    )
    assert code == 0, output
    assert "prepared statement" not in output and "Traceback" not in output, output


def fires_seen(db: Db) -> int:
    return int(db.one("SELECT count(*) FROM {all_jobs} AS j WHERE task = 'tick'"))


# ---------------------------------------------------------------------------- session pooling


def test_session_pooling_short_of_server_connections_waits_says_so_and_proceeds(
    server: PgServer,
    app: worker_app.App,
    db: Db,
    tmp_path: Path,
    pgbouncer_factory: Callable[..., PgBouncer],
) -> None:
    """A session pool with nothing left for a worker holds its first statement: the worker must
    not crash, must say it is waiting, and must proceed once a server connection frees."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    bouncer = pgbouncer_factory(server, pool_mode="session", default_pool_size=20)
    workers = Workers(bouncer.dsn(), app.schema, tmp_path)
    try:
        # One worker (one job at a time: its handlers' pool keeps one connection) settles.
        first = workers.start("--concurrency", "1", env={**OFF, **env}, app=APP, pythonpath=[FAULTS_DIR])
        workers.wait_registered(db, first)
        warm = app.queue.enqueue_many([JobSpec("record", {"note": "warm"}) for _ in range(5)])
        wait_until(lambda: logged_count(db, warm) == 5, 10, first.log_tail)
        time.sleep(2)  # lease keeper and rescuer have connected by now
        held = bouncer.pool()["sv_active"]
        # Exactly the first worker's connections: nothing left for another.
        bouncer.reconfigure(default_pool_size=held)
        wait_until(lambda: bouncer.pool()["sv_idle"] == 0, 5, lambda: str(bouncer.pool()))
        assert bouncer.pool()["cl_waiting"] == 0, bouncer.pool()

        second = workers.start("--concurrency", "1", env={**OFF, **env}, app=APP, pythonpath=[FAULTS_DIR])
        time.sleep(8)
        assert second.alive(), second.log_tail()
        waiting = bouncer.pool()["cl_waiting"]
        assert waiting > 0, "the second worker is not waiting for a server connection"
        lines = second.log_text().splitlines()
        said = [line for line in lines if " WARNING " in line and "wait" in line.lower()]

        # A slot frees: the second worker proceeds.
        jobs = app.queue.enqueue_many([JobSpec("record", {"note": "after"}) for _ in range(10)])
        first.signal(signal.SIGTERM)
        first.wait(20)
        freed = time.monotonic()
        workers.wait_registered(db, second, timeout=15)
        wait_until(
            lambda: completed_count(db, jobs) == len(jobs),
            15,
            lambda: f"{db.states()}\n{second.log_tail()}",
        )
        proceeded = time.monotonic() - freed
    finally:
        workers.stop_all()
    print(
        f"\n[pgbouncer session] one worker holds {held} server connections; the second waited "
        f"({waiting} clients queued in PgBouncer), logged {len(said)} warnings about it, and "
        f"ran its jobs {proceeded:.1f} s after the first stopped: {said}"
    )
    assert said, (
        "a worker waiting for a server connection from a session pooler logs nothing: "
        f"it sits silent\n{second.log_tail()}"
    )


def test_session_pooling_a_worker_short_of_some_connections_says_which_wait_and_proceeds(
    server: PgServer,
    app: worker_app.App,
    db: Db,
    tmp_path: Path,
    pgbouncer_factory: Callable[..., PgBouncer],
) -> None:
    """A worker that got some server connections but not all: it starts, and then its other
    services wait; waiting that long unsaid hides a worker that cannot renew its leases. It
    claims nothing while its heartbeat cannot renew a lease: the first worker is busy, so a
    claimed job would sit until its lease ran out and then run twice (rescued, and run on)."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    bouncer = pgbouncer_factory(server, pool_mode="session", default_pool_size=20)
    workers = Workers(bouncer.dsn(), app.schema, tmp_path)
    try:
        first = workers.start("--concurrency", "1", env={**OFF, **env}, app=APP, pythonpath=[FAULTS_DIR])
        workers.wait_registered(db, first)
        warm = app.queue.enqueue_many([JobSpec("record", {"note": "warm"}) for _ in range(5)])
        wait_until(lambda: logged_count(db, warm) == 5, 10, first.log_tail)
        busy = app.queue.enqueue("record", {"sleep": 12, "note": "busy"})
        wait_until(lambda: logged_count(db, [busy]) == 1, 10, first.log_tail)
        time.sleep(2)
        held = bouncer.pool()["sv_active"]
        # One server connection spare: the second worker starts, then its other services wait.
        bouncer.reconfigure(default_pool_size=held + 1)

        second = workers.start("--concurrency", "1", env={**OFF, **env}, app=APP, pythonpath=[FAULTS_DIR])
        workers.wait_registered(db, second, timeout=15)
        jobs = app.queue.enqueue_many([JobSpec("record", {"note": "short"}) for _ in range(10)])
        time.sleep(8)
        assert second.alive(), second.log_tail()
        waiting = bouncer.pool()["cl_waiting"]
        # Only the second worker could have started one: the first's one slot is busy.
        started_meanwhile = db.one(
            "SELECT coalesce(sum(attempts), 0) FROM {all_jobs} AS j WHERE id = ANY(%s)", [jobs]
        )
        lines = second.log_text().splitlines()
        said = [line for line in lines if " WARNING " in line and "wait" in line.lower()]

        first.signal(signal.SIGTERM)
        first.wait(20)
        freed = time.monotonic()
        wait_until(lambda: completed_count(db, jobs) == len(jobs), 20, second.log_tail)
        proceeded = time.monotonic() - freed
        assert second.alive(), second.log_tail()
    finally:
        workers.stop_all()
    runs = dict(db.rows("SELECT job_id, count(DISTINCT attempt) FROM {log} GROUP BY job_id"))
    print(
        f"\n[pgbouncer session, one spare] {waiting} of the second worker's connections queued in "
        f"PgBouncer; it logged {len(said)} warnings about waiting; all jobs done {proceeded:.1f} s "
        f"after the first worker stopped; runs {sorted(runs[i] for i in jobs)}: {said}"
    )
    assert waiting > 0
    assert started_meanwhile == 0, "the second worker started jobs while it could not renew their leases"
    assert all(runs.get(i) == 1 for i in jobs), {i: runs.get(i) for i in jobs}
    assert said, f"services waiting for a server connection log nothing\n{second.log_tail()}"
