"""Create, upgrade and remove pgqueue's schema with Alembic, from the repo or an installed wheel.

The migrations live in the repository's top-level ``migrations/``; ``pgqueue/_migrations`` links to
it, so the wheel carries them and an app's alembic.ini can name them as the package resource
``pgqueue:_migrations/versions``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from pgqueue._connections import classify_connection_error, connect
from pgqueue._naming import DEFAULT_SCHEMA, check_schema_name
from pgqueue.errors import ConfigurationError, PgQueueError

SCHEMA_ATTRIBUTE = "pgqueue_schema"
# Serialises concurrent `pgqueue migrate` runs (e.g. every replica migrating at start-up).
_MIGRATION_LOCK_KEY = 0x70675F71  # "pg_q"


def migrations_path() -> Path:
    """The Alembic script directory: inside the wheel, or ``migrations/`` in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError(f"pgqueue's migrations are missing next to {package}")


def current_schema() -> str:
    """The schema the running migration targets; used by ``env.py`` and every revision.

    Apps that fold pgqueue's revisions into their own Alembic history may set
    ``config.attributes["pgqueue_schema"]`` or ``pgqueue_schema`` in alembic.ini; default
    ``pgqueue``.
    """
    from alembic import context

    config = context.config
    schema = (
        config.attributes.get(SCHEMA_ATTRIBUTE)
        or context.get_x_argument(as_dictionary=True).get("schema")
        or config.get_main_option(SCHEMA_ATTRIBUTE)
        or DEFAULT_SCHEMA
    )
    return check_schema_name(schema)


def sqlalchemy_url(dsn: str) -> str:
    """A SQLAlchemy URL on the psycopg 3 driver for a ``postgresql://`` DSN."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    raise ConfigurationError(f"expected a postgresql:// URL, got {dsn[:20]!r}…")


def _engine(dsn: str) -> Engine:
    # A creator keeps any libpq DSN working (key=value strings, unix sockets, service files); the
    # connection is named "pgqueue-migrate", waits a bounded time for a server that is only
    # briefly away, and fails with a named pgqueue error (which SQLAlchemy lets through).
    return create_engine(
        "postgresql+psycopg://", creator=lambda: connect(dsn, "migrate"), poolclass=pool.NullPool
    )


@contextmanager
def _named_errors(schema: str) -> Iterator[None]:
    """Database failures during a migration as pgqueue errors, named after their cause (the
    command line prints one line for those); the driver's error stays chained for ``--debug``."""
    try:
        yield
    except DBAPIError as exc:
        if exc.orig is None:
            raise
        error = classify_connection_error(exc.orig)
        raise type(error)(f"schema {schema!r}: {error}") from exc


def _config(schema: str, connection: Any) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes[SCHEMA_ATTRIBUTE] = check_schema_name(schema)
    config.attributes["connection"] = connection
    return config


def upgrade(dsn: str, *, schema: str = DEFAULT_SCHEMA, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there."""
    with _named_errors(schema), _engine(dsn).begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        command.upgrade(_config(schema, conn), revision)


def downgrade(dsn: str, *, schema: str = DEFAULT_SCHEMA, revision: str = "base") -> None:
    """Step the schema down; to ``base`` it also drops the version table and the (empty) schema.

    The schema is dropped without CASCADE, so anything a user put there themselves is never lost:
    the drop fails instead.
    """
    with _named_errors(schema):
        try:
            with _engine(dsn).begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                if not _has_version_table(conn, schema):
                    return
                command.downgrade(_config(schema, conn), revision)
                if revision == "base":
                    conn.execute(text(f'DROP TABLE "{schema}".alembic_version'))
                    conn.execute(text(f'DROP SCHEMA "{schema}"'))
        except DBAPIError as exc:
            if not isinstance(exc.orig, psycopg.errors.DependentObjectsStillExist):
                raise
            raise PgQueueError(
                f"schema {schema!r} holds or references objects pgqueue did not create, so nothing "
                f"was dropped: {exc.orig}"
            ) from exc


def current_revision(dsn: str, *, schema: str = DEFAULT_SCHEMA) -> str | None:
    """The revision the database is at, or None when pgqueue was never migrated there."""
    with _named_errors(schema), _engine(dsn).connect() as conn:
        if not _has_version_table(conn, schema):
            return None
        table = f'"{check_schema_name(schema)}".alembic_version'
        return conn.execute(text(f"SELECT version_num FROM {table}")).scalar()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations_path()))
    head = script.get_current_head()
    assert head is not None
    return head


def _has_version_table(conn: Any, schema: str) -> bool:
    found = conn.execute(
        text("SELECT to_regclass(:name) IS NOT NULL"),
        {"name": f'"{check_schema_name(schema)}".alembic_version'},
    ).scalar()
    return bool(found)
