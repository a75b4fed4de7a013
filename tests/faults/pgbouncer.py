"""A real PgBouncer in front of a :class:`~pgserver.PgServer`, for the pooler tests.

Debian's ``pgbouncer`` package puts the binary at ``/usr/sbin/pgbouncer`` (``$PGQUEUE_PGBOUNCER``
overrides it); CI installs the package, so a missing binary fails the tests rather than skipping
them. Tests get one with ``with running_pgbouncer(server, pool_mode=…) as bouncer:``, the
``pgbouncer_factory`` fixture, or ``pg_bouncer`` (transaction mode in front of ``pg_server``); the
fault suite's conftest offers both fixtures. Each bouncer gets a configuration of its own in a temporary
directory and listens on a free loopback port; it runs in the foreground as a child of the test,
so the test stops it by its pid. PgBouncer refuses to run as root: as root it runs as the
``postgres`` system user, the same one that runs the test servers.

The module is also a worker app, ``pgbouncer:queue``: ``worker_app``'s handlers, whose own
logging connections never prepare statements. A handler's connection through PgBouncer in
transaction mode needs ``prepare_threshold=None`` just like the caller's own connections: with
psycopg's default (prepare at the fifth run) some transactions land on a server connection that
never saw the statement, and the handler fails with ``prepared statement "_pg3_0" does not exist``.

The knobs the tests turn are the pool mode (``transaction`` or ``session``), the authentication
(``trust``, or ``md5`` against an ``auth_file``), ``default_pool_size`` and ``max_client_conn``.

What psycopg sends at startup: ``user``, ``database``, ``application_name`` (pgqueue names every
connection; PgBouncer tracks that parameter itself and passes it on) and ``client_encoding``,
which PgBouncer also tracks. Nothing else, unless a DSN adds ``options``; drivers that set
``extra_float_digits`` (psycopg 2, JDBC) would be refused without ``ignore_startup_parameters``,
so the list names both, as a production configuration would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest
import worker_app
from pgserver import SUPERUSER, SYSTEM_USER, PgServer, free_port
from psycopg.rows import dict_row

from pgqueue import Queue

PoolMode = Literal["session", "transaction"]
AuthType = Literal["trust", "md5"]
DEFAULT_BINARY = "/usr/sbin/pgbouncer"


def pgbouncer_binary() -> Path:
    """``$PGQUEUE_PGBOUNCER``, else Debian's path; fails loudly when it is not installed."""
    path = Path(os.environ.get("PGQUEUE_PGBOUNCER", DEFAULT_BINARY))
    if not path.exists():
        raise RuntimeError(
            f"{path} not found: install PgBouncer (apt-get install -y pgbouncer) or set PGQUEUE_PGBOUNCER"
        )
    return path


class PgBouncer:
    """One PgBouncer process: ``start``/``stop`` it, build DSNs for it, ask its admin console.

    ``settings`` go verbatim into the ``[pgbouncer]`` section (they win over the defaults here).
    """

    def __init__(
        self,
        root: Path,
        server: PgServer,
        *,
        pool_mode: PoolMode = "transaction",
        auth_type: AuthType = "trust",
        passwords: Mapping[str, str] | None = None,
        default_pool_size: int = 20,
        max_client_conn: int = 500,
        port: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.server = server
        self.pool_mode = pool_mode
        self.auth_type = auth_type
        self.passwords = dict(passwords or {SUPERUSER: "bouncer-secret"})
        self.port = port if port is not None else free_port()
        self.ini = root / "pgbouncer.ini"
        self.log = root / "pgbouncer.log"
        self.binary = pgbouncer_binary()
        self._as_user = SYSTEM_USER if os.geteuid() == 0 else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._options: dict[str, Any] = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": auth_type,
            "auth_file": str(root / "userlist.txt"),
            "admin_users": SUPERUSER,
            "pool_mode": pool_mode,
            "default_pool_size": default_pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": max_client_conn,
            "ignore_startup_parameters": "extra_float_digits,options",
            # A server that went away is tried again within a second, not the default 15 s.
            "server_login_retry": 1,
            # Longer than any test: a client waiting for a server connection waits, it is
            # not dropped (what the session-mode sizing test looks at).
            "query_wait_timeout": 120,
            "logfile": str(self.log),
            "pidfile": str(root / "pgbouncer.pid"),
            "log_connections": 1,
            "log_disconnections": 1,
            "verbose": 0,
            **dict(settings or {}),
        }
        self._write_config(self._options)

    # ------------------------------------------------------------------ configuration

    def _write_config(self, options: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            "[databases]",
            f"* = host=127.0.0.1 port={self.server.port}",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in options.items()),
        ]
        self.ini.write_text("\n".join(lines) + "\n", encoding="utf-8")
        users = "".join(f'"{user}" "{password}"\n' for user, password in self.passwords.items())
        (self.root / "userlist.txt").write_text(users, encoding="utf-8")
        if self._as_user is not None:
            entry = pwd.getpwnam(self._as_user)
            for path in (self.root, self.ini, self.root / "userlist.txt"):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    # ------------------------------------------------------------------ the process

    def start(self, timeout: float = 15) -> None:
        """Start PgBouncer and wait until its admin console answers."""
        if self.running():
            return
        self._proc = subprocess.Popen(
            [str(self.binary), str(self.ini)],
            user=self._as_user,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self._proc.returncode}:\n{self.log_text()}")
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (immediate shutdown), killed if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    # ------------------------------------------------------------------ addresses, admin console

    def dsn(self, *, user: str = SUPERUSER, dbname: str = "postgres", password: str | None = None) -> str:
        """A URL through the bouncer; with md5 auth the user's password is filled in."""
        if password is None and self.auth_type == "md5":
            password = self.passwords[user]
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, command: str) -> list[dict[str, Any]]:
        """A ``SHOW …`` on the admin console (simple query protocol: a client-side cursor)."""
        with psycopg.connect(
            self.dsn(dbname="pgbouncer"),
            autocommit=True,
            connect_timeout=2,
            cursor_factory=psycopg.ClientCursor,
            row_factory=dict_row,
        ) as conn:
            cur = conn.execute(command)
            return cur.fetchall() if cur.description is not None else []

    def pool(self, dbname: str = "postgres", user: str = SUPERUSER) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of one pool (cl_active, cl_waiting, sv_active, sv_idle…)."""
        for row in self.admin("SHOW POOLS"):
            if row["database"] == dbname and row["user"] == user:
                return row
        return {}

    def reconfigure(self, **settings: Any) -> None:
        """Change ``[pgbouncer]`` settings of the running bouncer (``RELOAD``: pool sizes apply to
        the pools that exist, clients stay connected)."""
        self._options.update(settings)
        self._write_config(self._options)
        self.admin("RELOAD")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def running_pgbouncer(server: PgServer, **options: Any) -> Iterator[PgBouncer]:
    """A started PgBouncer in front of ``server`` (options: see :class:`PgBouncer`); removed after."""
    root = Path(tempfile.mkdtemp(prefix="pgqueue-pgbouncer-"))
    bouncer = None
    try:
        bouncer = PgBouncer(root, server, **options)
        bouncer.start()
        yield bouncer
    finally:
        if bouncer is not None:
            bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pgbouncer_factory() -> Iterator[Callable[..., PgBouncer]]:
    """``pgbouncer_factory(server, pool_mode="session", default_pool_size=6, …)`` starts a
    bouncer (options: see :class:`PgBouncer`); every one started is stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(server: PgServer, **options: Any) -> PgBouncer:
            return stack.enter_context(running_pgbouncer(server, **options))

        yield start


@pytest.fixture
def pg_bouncer(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[PgBouncer]:
    """A transaction-mode bouncer in front of the test's own server; parametrize indirectly with
    a dict of :class:`PgBouncer` options for another mode, authentication or pool size."""
    options: dict[str, Any] = getattr(request, "param", None) or {}
    with running_pgbouncer(pg_server, **options) as bouncer:
        yield bouncer


# ---------------------------------------------------------------------------- the worker app


class BouncerApp(worker_app.App):
    """``worker_app``'s handlers and tables; their logging pool never prepares statements."""

    pool_kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}  # noqa: RUF012


_app: BouncerApp | None = None


def __getattr__(name: str) -> Queue:
    """``pgbouncer:queue`` for ``pgqueue worker``, built on first access from ``PGQUEUE_DSN`` and
    ``PGQUEUE_SCHEMA`` (so importing this module as a fixture builds nothing)."""
    global _app
    if name != "queue":
        raise AttributeError(name)
    if _app is None:
        _app = BouncerApp(os.environ.get("PGQUEUE_DSN"), os.environ.get("PGQUEUE_SCHEMA", "pgqueue"))
    return _app.queue
