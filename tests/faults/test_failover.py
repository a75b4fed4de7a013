"""Failover to a synchronous standby under running workers and a steady producer.

A primary (``pgserver.py``) and a streaming standby cloned from it with ``pg_basebackup -R``; the
primary runs ``synchronous_standby_names = '*'`` with ``synchronous_commit = on``, so a commit is
acknowledged only once the standby has the WAL. Everything pgqueue opens uses one multi-host DSN,
``postgresql://…@h:p1,h:p2/db?target_session_attrs=read-write``: libpq tries the hosts in turn
and keeps the first that accepts writes. The primary is crashed (``-m immediate``), the standby
promoted 3 s later (``pg_ctl promote``).

What the test holds pgqueue to: work resumes within 5 s of the standby accepting writes; every
job id the producer was given back exists on the new primary (no acknowledged enqueue lost, no
id handed out twice); a job whose completion had been committed before the crash never runs
again, and the only jobs that run twice are ones that were running at the crash (at-least-once).

Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import worker_app
from pgserver import SUPERUSER, PgServer
from worker_helpers import Db, Workers, wait_until

from pgqueue import DatabaseUnavailableError
from pgqueue.migrate import upgrade

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_worker_environment")]

SCHEMA = "failover"
RESUME_BOUND = 5.0  # seconds from "the standby accepts writes" to the first job started there


class Standby(PgServer):
    """A streaming replica of ``primary``: ``pg_basebackup -R`` instead of ``initdb``."""

    def __init__(self, root: Path, primary: PgServer, *, settings: Mapping[str, Any] | None = None) -> None:
        self.primary = primary
        super().__init__(root, settings=settings)

    def _initdb(self, settings: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_user is not None:
            entry = pwd.getpwnam(self._as_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o755)
        self._run(
            "pg_basebackup",
            *("-D", str(self.data), "-R", "-X", "stream", "-c", "fast"),
            *("-h", str(self.primary.root), "-p", str(self.primary.port), "-U", SUPERUSER),
        )
        # The clone carries the primary's settings: its own address comes last and wins.
        config = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.root}'",
            "hot_standby": "on",
            **settings,
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# standby\n")
            for name, value in config.items():
                conf.write(f"{name} = {value}\n")

    def promote(self) -> None:
        """``pg_ctl promote -w``: returns once the server accepts writes."""
        self._run("pg_ctl", "promote", "-D", str(self.data), "-w")


@contextlib.contextmanager
def replicated_pair() -> Iterator[tuple[PgServer, Standby]]:
    """A primary with pgqueue migrated and a synchronous standby streaming from it."""
    root = Path(tempfile.mkdtemp(prefix="pgqueue-failover-"))
    os.chmod(root, 0o755)  # the servers' system user must reach their directories inside
    servers: list[PgServer] = []
    try:
        primary = PgServer(root / "primary")
        servers.append(primary)
        primary.start()
        upgrade(primary.dsn(), schema=SCHEMA)
        worker_app.create_tables(primary.dsn(), SCHEMA)
        standby = Standby(root / "standby", primary)
        servers.append(standby)
        standby.start()
        # Synchronous from now on (set after the clone, so the promoted standby does not wait
        # for a standby of its own).
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        primary.execute("ALTER SYSTEM SET synchronous_commit = on")
        primary.reload()
        wait_until(
            lambda: primary.execute("SELECT sync_state FROM pg_stat_replication") == [("sync",)],
            15,
            lambda: f"standby not synchronous: {primary.execute('SELECT * FROM pg_stat_replication')}",
        )
        yield primary, standby
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def multi_host_dsn(*servers: PgServer) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    return f"postgresql://{SUPERUSER}@{hosts}/postgres?target_session_attrs=read-write"


class Producer(threading.Thread):
    """Enqueues a job every few milliseconds; keeps the ids it was given back, counts refusals."""

    def __init__(self, app: worker_app.App) -> None:
        super().__init__(name="producer", daemon=True)
        self.app = app
        self.acked: list[int] = []
        self.refused = 0
        self.unsure = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                job_id = self.app.queue.enqueue("record", {"sleep": 0.2})
            except DatabaseUnavailableError as exc:
                # "may or may not have taken effect": not acknowledged, so not counted.
                if "may or may not" in str(exc):
                    self.unsure += 1
                else:
                    self.refused += 1
                continue
            with self.lock:
                self.acked.append(job_id)
            time.sleep(0.01)

    def acknowledged(self) -> list[int]:
        with self.lock:
            return list(self.acked)


def replayed(standby: Standby) -> bool:
    """The standby has applied every bit of WAL it received."""
    rows = standby.execute("SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()")
    return bool(rows[0][0])


def test_failover_to_a_synchronous_standby_loses_no_acknowledged_job(tmp_path: Path) -> None:
    """A crash of the primary under load, a promotion 3 s later: see the module's docstring."""
    env = {"PGQUEUE_LEASE_SECONDS": "5", "PGQUEUE_RESCUE_INTERVAL": "1"}
    with replicated_pair() as (primary, standby):
        dsn = multi_host_dsn(primary, standby)
        app = worker_app.App(dsn, SCHEMA)
        workers = Workers(dsn, SCHEMA, tmp_path)
        producer = Producer(app)
        try:
            procs = [workers.start(env=env), workers.start(env=env)]
            with psycopg.connect(primary.dsn(), autocommit=True) as conn:
                workers.wait_registered(Db(primary.dsn(), SCHEMA, conn), *procs)
            producer.start()
            time.sleep(3)

            primary.stop("immediate")
            crashed = time.time()
            acked_at_crash = producer.acknowledged()
            # What the crash left, read on the standby (hot standby: read-only).
            wait_until(lambda: replayed(standby), 10, "standby did not finish replaying")
            with psycopg.connect(standby.dsn(), autocommit=True) as conn:
                snap = Db(standby.dsn(), SCHEMA, conn)
                running = {r[0] for r in snap.rows("SELECT id FROM {jobs} WHERE state = 'running'")}
                done = {r[0] for r in snap.rows("SELECT id FROM {finished} WHERE state = 'completed'")}
                present = snap.one(
                    "SELECT count(*) FROM {all_jobs} AS j WHERE id = ANY(%s)", [acked_at_crash]
                )
            time.sleep(max(0.0, crashed + 3 - time.time()))
            standby.promote()
            writable = time.time()

            with psycopg.connect(standby.dsn(), autocommit=True) as conn:
                db = Db(standby.dsn(), SCHEMA, conn)
                first_start = wait_until(
                    lambda: db.one(
                        "SELECT extract(epoch FROM min(started_at))::float8 FROM {all_jobs} AS j"
                        " WHERE started_at > to_timestamp(%s)",
                        [writable],
                    ),
                    15,
                    lambda: f"no job started on the promoted standby\n{workers.logs()}",
                )
                time.sleep(4)  # the producer goes on against the new primary
                producer.stopping.set()
                producer.join(15)
                acked = producer.acknowledged()
                wait_until(
                    lambda: (
                        db.one(
                            "SELECT count(*) FROM {finished} WHERE id = ANY(%s) AND state = 'completed'",
                            [acked],
                        )
                        == len(acked)
                    ),
                    30,
                    lambda: f"jobs not completed on the new primary: {db.states()}\n{workers.logs()}",
                    interval=0.2,
                )
                for w in procs:
                    assert w.alive(), w.log_tail()
                stored = {
                    r[0]
                    for r in db.rows(
                        "SELECT id FROM {all_jobs} AS j WHERE id = ANY(%s) UNION SELECT id FROM {dead_letter}"
                        " WHERE id = ANY(%s)",
                        [acked, acked],
                    )
                }
                runs = dict(db.rows("SELECT job_id, count(DISTINCT attempt) FROM {log} GROUP BY job_id"))
                first_handler = db.one(
                    "SELECT extract(epoch FROM min(started_at))::float8 FROM {log}"
                    " WHERE started_at > to_timestamp(%s)",
                    [writable],
                )
        finally:
            producer.stopping.set()
            workers.stop_all()
            app.queue.close()

    lost = sorted(set(acked) - stored)
    reissued = len(acked) - len(set(acked))
    twice = {i for i, n in runs.items() if n > 1}
    resumed = first_start - writable
    print(
        f"\n[failover, synchronous] {len(acked_at_crash)} enqueues acknowledged before the crash, "
        f"{len(acked)} in all ({producer.refused} refused, {producer.unsure} unsure during the "
        f"outage); lost {len(lost)}, ids reissued {reissued}; {len(running)} jobs running at the "
        f"crash, {len(twice)} ran twice, {len(twice & done)} of them completed before it; first job "
        f"started {resumed:.2f} s after the standby accepted writes (first handler run "
        f"{first_handler - writable:.2f} s)"
    )
    assert present == len(acked_at_crash), "an acknowledged enqueue never reached the standby"
    assert not lost, f"acknowledged enqueues lost: {lost[:20]}"
    assert reissued == 0, "a job id was handed out twice"
    assert not (twice & done), f"jobs completed before the crash ran again: {sorted(twice & done)[:20]}"
    assert twice <= running, f"jobs ran twice that were not running at the crash: {sorted(twice - running)}"
    assert resumed < RESUME_BOUND, f"work resumed {resumed:.1f} s after the standby accepted writes"


def test_a_switchover_that_leaves_the_old_primary_up_moves_the_listener_too(tmp_path: Path) -> None:
    """A switchover can leave the old primary running, read-only, with the worker's connections
    still on it. The services that write meet the refusal and reconnect to the new primary; the
    listener only reads, and would stay on the old one, deaf to every NOTIFY sent on the new one,
    while the worker believed it could wait for them: each job would then wait for a poll (30 s
    here). The refusal makes the listener test itself, and it moves too: a job enqueued on the
    new primary starts within a second, woken, not polled."""
    env = {"PGQUEUE_LEASE_SECONDS": "3", "PGQUEUE_RESCUE_INTERVAL": "0.5"}
    root = Path(tempfile.mkdtemp(prefix="pgqueue-switchover-"))
    os.chmod(root, 0o755)
    old, new = PgServer(root / "old"), PgServer(root / "new")
    try:
        for server in (old, new):
            server.start()
            upgrade(server.dsn(), schema=SCHEMA)
        dsn = multi_host_dsn(old, new)
        app = worker_app.App(dsn, SCHEMA)
        workers = Workers(dsn, SCHEMA, tmp_path)
        try:
            worker = workers.start("--poll-interval", "30", env=env)
            with psycopg.connect(old.dsn(), autocommit=True) as conn:
                workers.wait_registered(Db(old.dsn(), SCHEMA, conn), worker)
            old.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            old.reload()
            with psycopg.connect(new.dsn(), autocommit=True) as conn:
                db = Db(new.dsn(), SCHEMA, conn)
                wait_until(
                    lambda: db.rows("SELECT 1 FROM {workers} WHERE waiting_until IS NOT NULL"),
                    15,
                    lambda: f"the worker never waited on the new primary\n{worker.log_tail()}",
                )
                wait_until(
                    lambda: "notifications arrive again" in worker.log_tail(200),
                    15,
                    lambda: f"the listener never heard again\n{worker.log_tail()}",
                )
                enqueued = time.monotonic()
                job_id = app.queue.enqueue("noop")
                wait_until(
                    lambda: db.rows(
                        "SELECT 1 FROM {all_jobs} AS j WHERE id = %s AND started_at IS NOT NULL", [job_id]
                    ),
                    5,
                    lambda: f"job not started\n{worker.log_tail()}",
                    interval=0.01,
                )
                started_after = time.monotonic() - enqueued
            assert worker.alive(), worker.log_tail()
            assert "went unheard" in worker.log_tail(200), worker.log_tail()
        finally:
            workers.stop_all()
            app.queue.close()
    finally:
        for server in (old, new):
            with contextlib.suppress(Exception):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nswitchover, old primary left read-only: started {started_after * 1000:.0f} ms after enqueue")
    assert started_after < 1.0
