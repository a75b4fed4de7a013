"""An app that already uses Alembic folds pgqueue's revisions into its own history."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg

from pgqueue.migrate import migrations_path

APP_ENV = """
import os
from alembic import context
from sqlalchemy import create_engine, pool
import psycopg

config = context.config
config.attributes["pgqueue_schema"] = os.environ["APP_PGQUEUE_SCHEMA"]
dsn = os.environ["APP_DSN"]
engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                       poolclass=pool.NullPool)
with engine.begin() as conn:
    context.configure(connection=conn, version_table="app_alembic_version")
    with context.begin_transaction():
        context.run_migrations()
"""

APP_REVISION = '''
"""app table"""
from alembic import op
revision = "a1"
down_revision = None
branch_labels = ("app",)
depends_on = None

def upgrade():
    op.execute("CREATE TABLE {table} (id int primary key)")

def downgrade():
    op.execute("DROP TABLE {table}")
'''


def _alembic(workdir: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(workdir / "alembic.ini"), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_app_history_includes_pgqueue_revisions(postgres_dsn: str, tmp_path: Path) -> None:
    schema = f"pgq_app_{uuid.uuid4().hex[:8]}"
    table = f"app_{uuid.uuid4().hex[:8]}"
    (tmp_path / "versions").mkdir()
    (tmp_path / "alembic.ini").write_text(
        f"[alembic]\nscript_location = {tmp_path}\n"
        # The app's own revisions and pgqueue's, named as a package resource.
        f"version_locations = {tmp_path}/versions pgqueue:_migrations/versions\n"
    )
    (tmp_path / "env.py").write_text(textwrap.dedent(APP_ENV))
    (tmp_path / "script.py.mako").write_text((migrations_path() / "script.py.mako").read_text())
    (tmp_path / "versions" / "a1_app.py").write_text(APP_REVISION.format(table=table))
    env = {**os.environ, "APP_DSN": postgres_dsn, "APP_PGQUEUE_SCHEMA": schema}

    heads = _alembic(tmp_path, env, "heads")
    assert "(app)" in heads and "(pgqueue)" in heads

    _alembic(tmp_path, env, "upgrade", "heads")
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f"{schema}.jobs",)).fetchone() == (f"{schema}.jobs",)
        assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (table,)
        # pgqueue's revisions are recorded in the app's own version table, beside the app's.
        versions = {r[0] for r in conn.execute("SELECT version_num FROM app_alembic_version")}
    from pgqueue.migrate import head_revision

    assert versions == {"a1", head_revision()}

    _alembic(tmp_path, env, "downgrade", "pgqueue@base")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f"{schema}.jobs",)).fetchone() == (None,)
        assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (table,)
        conn.execute(f"DROP TABLE {table}")
        conn.execute("DROP TABLE app_alembic_version")
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}"')
