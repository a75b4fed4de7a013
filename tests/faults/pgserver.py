"""A PostgreSQL server of a test's own, to stop, restart and misconfigure without touching the
session's shared server.

``initdb`` and ``pg_ctl`` from the PostgreSQL binaries on the machine (``$PGQUEUE_PG_BIN``, else
``pg_config --bindir``, else ``/usr/lib/postgresql/15/bin``) build a throwaway cluster in a temporary
directory that listens on a free loopback TCP port and on a unix socket in that directory. As
root (the servers refuse it) every server command runs as the ``postgres`` system user.

Tests get one with the ``pg_server`` / ``stopped_pg_server`` fixtures (offered to the whole fault
suite by its conftest) or ``with temporary_server() as server:`` in a fixture of their own; the
server is stopped (``-m immediate``) and its directory removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest

ShutdownMode = Literal["smart", "fast", "immediate"]
SYSTEM_USER = "postgres"  # who runs the server when the tests run as root
SUPERUSER = "postgres"  # the cluster's bootstrap role


def _bin_dir() -> Path:
    configured = os.environ.get("PGQUEUE_PG_BIN")
    if configured:
        return Path(configured)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidate = Path(found.stdout.strip())
        if (candidate / "pg_ctl").exists():
            return candidate
    return Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (and, so far, nothing will)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One cluster: ``start``/``stop``/``restart`` it, edit ``pg_hba.conf``, build DSNs for it.

    The server is not started by the constructor, so a test can first point a client at a port
    where nothing listens yet.
    """

    def __init__(self, root: Path, *, port: int | None = None, settings: Mapping[str, Any] | None = None):
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port if port is not None else free_port()
        self.bin = _bin_dir()
        self._as_user = SYSTEM_USER if os.geteuid() == 0 else None
        self._initdb(dict(settings or {}))

    # ------------------------------------------------------------------ commands

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self._as_user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C"},
        )
        if check and done.returncode != 0:
            tail = "\n".join(self.log_text().splitlines()[-15:])
            raise RuntimeError(
                f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}\n--- log ---\n{tail}"
            )
        return done

    def _initdb(self, settings: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_user is not None:
            entry = pwd.getpwnam(self._as_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o755)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        config = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.root}'",
            # No fsync: a server process crash (``-m immediate``) loses nothing, only an OS crash
            # would. synchronous_commit stays on, or a crash would forget the last commits.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": 100,
            "log_connections": "on",
            **settings,
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# pgserver.py\n")
            for name, value in config.items():
                conf.write(f"{name} = {value}\n")

    def start(self, *, wait: bool = True) -> None:
        """Start the server; with ``wait`` until it accepts connections."""
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w" if wait else "-W")

    def stop(self, mode: ShutdownMode = "fast") -> None:
        """Stop the server (``immediate`` is a crash: recovery runs at the next start)."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    def restart(self, mode: ShutdownMode = "immediate") -> None:
        """Stop (by default as a crash) and start again, waiting until it accepts connections."""
        self._run("pg_ctl", "restart", "-D", str(self.data), "-m", mode, "-w", "-l", str(self.log))

    def reload(self) -> None:
        self._run("pg_ctl", "reload", "-D", str(self.data))

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ------------------------------------------------------------------ configuration

    def prepend_hba(self, *lines: str) -> None:
        """Put rules first in ``pg_hba.conf`` (they win over the trust rules); reloads if running."""
        hba = self.data / "pg_hba.conf"
        hba.write_text("\n".join(lines) + "\n" + hba.read_text(encoding="utf-8"), encoding="utf-8")
        if self.running():
            self.reload()

    def execute(
        self, statement: str, params: Any = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit) and return its rows, if any."""
        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description is not None else []

    # ------------------------------------------------------------------ addresses

    def dsn(
        self,
        *,
        user: str = SUPERUSER,
        dbname: str = "postgres",
        password: str | None = None,
        tcp: bool = False,
        port: int | None = None,
    ) -> str:
        """A URL for the server: over its unix socket, or with ``tcp`` over 127.0.0.1."""
        auth = user if password is None else f"{user}:{password}"
        if tcp or port is not None:
            return f"postgresql://{auth}@127.0.0.1:{port or self.port}/{dbname}"
        return f"postgresql://{auth}@/{dbname}?host={self.root}&port={self.port}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def temporary_server(*, start: bool = True, settings: Mapping[str, Any] | None = None) -> Iterator[PgServer]:
    """A new cluster in a temporary directory, started unless ``start=False``; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pgqueue-pgserver-"))
    server = None
    try:
        server = PgServer(root, settings=settings)
        if start:
            server.start()
        yield server
    finally:
        if server is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    """A started server of the test's own (stop, restart and reconfigure it at will)."""
    with temporary_server() as server:
        yield server


@pytest.fixture
def stopped_pg_server() -> Iterator[PgServer]:
    """A server initialised but not started: its port refuses connections until ``start()``."""
    with temporary_server(start=False) as server:
        yield server
