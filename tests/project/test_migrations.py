"""Schema migrations: idempotent, fully reversible, confined to their schema, DSN from the env."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import sql

import pgqueue
from pgqueue import ConfigurationError, PgQueueError, Queue
from pgqueue.cli import main as cli_main
from pgqueue.migrate import (
    current_revision,
    downgrade,
    head_revision,
    migrations_path,
    upgrade,
)

REPO = Path(__file__).resolve().parents[2]
# The core tables; later revisions may add more, so tests check these are present, and rely on
# whole-catalog snapshots for "nothing else changed" and "nothing left behind".
PGQUEUE_TABLES = {"jobs", "dead_letter", "queues", "workers", "alembic_version"}
UNREACHABLE_DSN = "postgresql://nobody@/nowhere?host=/nonexistent-pgqueue-socket-dir"


def catalog_snapshot(dsn: str) -> dict[str, Any]:
    """Every user-visible object of the database, by name: schemas, relations (tables, indexes,
    sequences, views), columns, constraints, types and enum labels, functions, triggers,
    extensions, and the rows of every alembic_version table."""
    user_ns = (
        "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
        "AND n.nspname NOT LIKE 'pg_temp_%%' AND n.nspname NOT LIKE 'pg_toast_temp_%%'"
    )
    queries = {
        "schemas": f"""
            SELECT n.nspname, n.nspowner::regrole::text FROM pg_namespace n WHERE {user_ns}""",
        "relations": f"""
            SELECT n.nspname, c.relname, c.relkind::text, c.relpersistence::text
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user_ns}""",
        "columns": f"""
            SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid)
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attnum > 0 AND NOT a.attisdropped AND {user_ns}""",
        "indexes": f"""
            SELECT n.nspname, c.relname, pg_get_indexdef(i.indexrelid)
            FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user_ns}""",
        "constraints": f"""
            SELECT n.nspname, co.conname, pg_get_constraintdef(co.oid)
            FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace WHERE {user_ns}""",
        "types": f"""
            SELECT n.nspname, t.typname, t.typtype::text,
                   array(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
                         ORDER BY e.enumsortorder)
            FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {user_ns}""",
        "functions": f"""
            SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {user_ns}""",
        "triggers": f"""
            SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t
            JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT t.tgisinternal AND {user_ns}""",
        "extensions": "SELECT extname, extversion FROM pg_extension",
    }
    snapshot: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, query in queries.items():
            snapshot[key] = sorted(tuple(map(str, row)) for row in conn.execute(query))
        versions = []
        for (schema,) in conn.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'alembic_version'"
        ).fetchall():
            for (version,) in conn.execute(
                sql.SQL("SELECT version_num FROM {}.alembic_version").format(sql.Identifier(schema))
            ):
                versions.append((schema, version))
        snapshot["alembic_versions"] = sorted(versions)
    return snapshot


def tables_in(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'",
            [schema],
        ).fetchall()
    return {name for (name,) in rows}


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()
    assert row is not None
    return bool(row[0])


def objects_in(dsn: str, schema: str) -> list[tuple[str, str]]:
    """Anything at all (relation, type, function) still living in ``schema``."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """
            SELECT 'relation', c.relname FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s
            UNION ALL
            SELECT 'type', t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = %(s)s
            UNION ALL
            SELECT 'function', p.proname FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(s)s
            """,
            {"s": schema},
        ).fetchall()


def pgqueue_command() -> list[str]:
    """The console script installed next to this interpreter (``.venv/bin/pgqueue``)."""
    script = shutil.which("pgqueue", path=str(Path(sys.executable).parent))
    assert script is not None, "the pgqueue console script is not installed next to python"
    return [script]


def run_cli(
    args: list[str],
    *,
    module: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pgqueue"] if module else pgqueue_command()
    base_env = {k: v for k, v in os.environ.items() if k not in ("PGQUEUE_DSN", "DATABASE_URL")}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base_env, **(env or {})},
        cwd=cwd,
    )


# ---------------------------------------------------------------------------- schema.sql


def schema_tool() -> ModuleType:
    """``migrations/schema.py``, a script rather than a package module, loaded from its path."""
    spec = importlib.util.spec_from_file_location("pgqueue_schema_tool", REPO / "migrations" / "schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schema_sql_is_what_the_migrations_create(postgres_dsn: str) -> None:
    """A plain pytest run catches a migration committed without ``python migrations/schema.py
    --write`` (``.ci/run`` also runs ``--check`` first, for a quick failure that says just that).
    It dumps a scratch database on the session's server, so it costs a migration and a pg_dump."""
    tool = schema_tool()
    changes = tool.diff(tool.render(postgres_dsn), tool.SCHEMA_FILE.read_text())
    assert changes == "", f"run `python migrations/schema.py --write`:\n{changes}"


def test_schema_sql_drift_is_shown_as_a_diff_and_run_to_run_noise_is_dropped() -> None:
    tool = schema_tool()
    current = tool.SCHEMA_FILE.read_text()
    drifted = current.replace("CREATE TABLE pgqueue.jobs (", "CREATE TABLE pgqueue.jobs (\n    gone int,")
    changes = tool.diff(current, drifted)
    assert changes.startswith("--- migrations/schema.sql") and "\n-    gone int,\n" in changes
    noisy = "--\n-- Dumped from database version 18.1\nSET x = 1;\n\\restrict k3y\nA\n\n\n\nB"
    assert tool.clean(noisy) == "--\nA\n\nB\n"


# ---------------------------------------------------------------------------- idempotence


def test_migrate_creates_the_schema_at_head(postgres_dsn: str, new_schema: str) -> None:
    assert current_revision(postgres_dsn, schema=new_schema) is None
    Queue(postgres_dsn, schema=new_schema).migrate()
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES
    assert current_revision(postgres_dsn, schema=new_schema) == head_revision()


def test_migrate_twice_changes_nothing(postgres_dsn: str, new_schema: str) -> None:
    queue = Queue(postgres_dsn, schema=new_schema)
    queue.migrate()
    once = catalog_snapshot(postgres_dsn)
    queue.migrate()
    assert catalog_snapshot(postgres_dsn) == once
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", new_schema]) == 0
    assert catalog_snapshot(postgres_dsn) == once


def test_migrate_keeps_existing_jobs(queue: Queue, count: Any) -> None:
    job_id = queue.enqueue("keep.me", {"n": 1})
    queue.migrate()
    assert count() == 1
    assert queue.get_job(job_id).args == {"n": 1}


def test_0005_moves_finished_jobs_out_of_jobs_and_back(postgres_dsn: str, new_schema: str) -> None:
    """A schema with history upgrades in place: its completed and cancelled rows (results,
    errors, ids) move to finished_jobs, the live ones stay; downgrade puts them back."""
    upgrade(postgres_dsn, schema=new_schema, revision="0004")
    jobs = sql.SQL("{}.jobs").format(sql.Identifier(new_schema))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, queue, task, state, result, errors, started_at, finished_at)"
                " VALUES (1, 'q', 'done', 'completed', '{{\"ok\": 1}}', '[{{\"attempt\": 1}}]',"
                " now(), now()),"
                " (2, 'q', 'stopped', 'cancelled', NULL, '[]', NULL, now()),"
                " (3, 'q', 'waiting', 'queued', NULL, '[]', NULL, NULL)"
            ).format(jobs)
        )
    with pgqueue.Queue(postgres_dsn, schema=new_schema) as queue:
        queue.migrate()
        done, stopped, waiting = (queue.get_job(i) for i in (1, 2, 3))
        assert (done.state, done.result, len(done.errors)) == (pgqueue.JobState.COMPLETED, {"ok": 1}, 1)
        assert stopped.state is pgqueue.JobState.CANCELLED
        assert waiting.state is pgqueue.JobState.QUEUED
        with psycopg.connect(postgres_dsn) as conn:
            assert conn.execute(sql.SQL("SELECT array_agg(id) FROM {}").format(jobs)).fetchone() == ([3],)
            with pytest.raises(psycopg.errors.CheckViolation):  # jobs holds live jobs only
                conn.execute(sql.SQL("UPDATE {} SET state = 'completed'").format(jobs))
    downgrade(postgres_dsn, schema=new_schema, revision="0004")
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(sql.SQL("SELECT id, state::text, result FROM {} ORDER BY id").format(jobs))
        assert rows.fetchall() == [(1, "completed", {"ok": 1}), (2, "cancelled", None), (3, "queued", None)]


async def test_async_queue_migrates(postgres_dsn: str, new_schema: str) -> None:
    async with pgqueue.AsyncQueue(postgres_dsn, schema=new_schema) as queue:
        await queue.migrate()
        once = catalog_snapshot(postgres_dsn)
        await queue.migrate()
        job_id = await queue.enqueue("after.migrate")
        assert (await queue.get_job(job_id)).task == "after.migrate"
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES
    assert catalog_snapshot(postgres_dsn) == once


def test_concurrent_migrations_all_succeed(postgres_dsn: str, new_schema: str) -> None:
    """Every replica may run `pgqueue migrate` at start-up at the same moment."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        try:
            barrier.wait()
            upgrade(postgres_dsn, schema=new_schema)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES
    assert current_revision(postgres_dsn, schema=new_schema) == head_revision()


def test_plain_alembic_builds_the_same_schema(postgres_dsn: str, new_schema: str) -> None:
    """alembic.ini + migrations/ at the top of the repo are the source of truth pgqueue ships."""
    other = new_schema + "_cli"
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "alembic",
                "-c",
                str(REPO / "alembic.ini"),
                "-x",
                f"dsn={postgres_dsn}",
                "-x",
                f"schema={new_schema}",
                "upgrade",
                "head",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        upgrade(postgres_dsn, schema=other)
        by_alembic = catalog_snapshot(postgres_dsn)

        def only(schema: str) -> dict[str, Any]:
            """The schema's objects with its own name blanked out, so two schemas compare."""
            name = re.compile(rf"\b{re.escape(schema)}\b")
            return {
                key: sorted(
                    tuple(name.sub("S", field) for field in row[1:])
                    for row in rows
                    if row and row[0] == schema
                )
                for key, rows in by_alembic.items()
                if key != "extensions"
            }

        assert only(new_schema) == only(other)
        assert current_revision(postgres_dsn, schema=new_schema) == head_revision()
    finally:
        downgrade(postgres_dsn, schema=other)


def test_every_revision_steps_up_and_back_down_exactly(postgres_dsn: str, new_schema: str) -> None:
    """Each revision's downgrade undoes its upgrade: the catalog at every revision is the same
    on the way up and on the way down."""
    script = ScriptDirectory(str(migrations_path()))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions[-1] == head_revision()
    snapshots = {"base": catalog_snapshot(postgres_dsn)}
    for revision in revisions:
        upgrade(postgres_dsn, schema=new_schema, revision=revision)
        assert current_revision(postgres_dsn, schema=new_schema) == revision
        snapshots[revision] = catalog_snapshot(postgres_dsn)
    for revision, previous in zip(reversed(revisions), reversed(["base", *revisions[:-1]]), strict=True):
        assert catalog_snapshot(postgres_dsn) == snapshots[revision]
        downgrade(postgres_dsn, schema=new_schema, revision=previous)
    assert catalog_snapshot(postgres_dsn) == snapshots["base"]
    assert not schema_exists(postgres_dsn, new_schema)


# ---------------------------------------------------------------------------- downgrade


def test_downgrade_to_base_via_main_leaves_nothing(postgres_dsn: str, new_schema: str) -> None:
    before = catalog_snapshot(postgres_dsn)
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", new_schema]) == 0
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", new_schema, "--downgrade", "base"]) == 0
    assert not schema_exists(postgres_dsn, new_schema)
    assert objects_in(postgres_dsn, new_schema) == []
    assert catalog_snapshot(postgres_dsn) == before
    assert current_revision(postgres_dsn, schema=new_schema) is None


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
def test_downgrade_to_base_via_subprocess_leaves_nothing(
    postgres_dsn: str, new_schema: str, module: bool
) -> None:
    before = catalog_snapshot(postgres_dsn)
    up = run_cli(["migrate", "--dsn", postgres_dsn, "--schema", new_schema], module=module)
    assert up.returncode == 0, up.stderr
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES
    down = run_cli(
        ["migrate", "--dsn", postgres_dsn, "--schema", new_schema, "--downgrade", "base"],
        module=module,
    )
    assert down.returncode == 0, down.stderr
    assert not schema_exists(postgres_dsn, new_schema)
    assert catalog_snapshot(postgres_dsn) == before


def test_downgrade_drops_jobs_and_can_migrate_again(postgres_dsn: str, new_schema: str) -> None:
    with Queue(postgres_dsn, schema=new_schema) as queue:
        queue.migrate()
        queue.enqueue("doomed")
        downgrade(postgres_dsn, schema=new_schema)
        assert not schema_exists(postgres_dsn, new_schema)
        queue.migrate()
        job_id = queue.enqueue("reborn")
        assert queue.get_job(job_id).task == "reborn"
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES


def test_downgrade_of_a_schema_never_migrated_is_a_no_op(postgres_dsn: str, new_schema: str) -> None:
    before = catalog_snapshot(postgres_dsn)
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", new_schema, "--downgrade", "base"]) == 0
    assert catalog_snapshot(postgres_dsn) == before


def test_downgrade_never_drops_what_the_user_put_in_the_schema(
    postgres_dsn: str, new_schema: str, db: psycopg.Connection[Any]
) -> None:
    upgrade(postgres_dsn, schema=new_schema)
    ident = sql.Identifier(new_schema)
    db.execute(sql.SQL("CREATE TABLE {}.mine (x int)").format(ident))
    db.execute(sql.SQL("INSERT INTO {}.mine VALUES (42)").format(ident))
    before = catalog_snapshot(postgres_dsn)
    with pytest.raises(PgQueueError):
        downgrade(postgres_dsn, schema=new_schema)
    # Nothing half-done: the user's table and pgqueue's own tables are all still there.
    assert catalog_snapshot(postgres_dsn) == before
    assert PGQUEUE_TABLES | {"mine"} <= tables_in(postgres_dsn, new_schema)
    assert db.execute(sql.SQL("SELECT x FROM {}.mine").format(ident)).fetchall() == [(42,)]
    assert current_revision(postgres_dsn, schema=new_schema) == head_revision()
    # The command line reports it as an error, not a traceback.
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", new_schema, "--downgrade", "base"]) == 2


def test_downgrade_never_breaks_the_users_objects_that_use_pgqueue(
    postgres_dsn: str, new_schema: str, db: psycopg.Connection[Any]
) -> None:
    upgrade(postgres_dsn, schema=new_schema)
    view = f"pgq_view_{new_schema}"
    db.execute(
        sql.SQL("CREATE VIEW public.{} AS SELECT id FROM {}.jobs").format(
            sql.Identifier(view), sql.Identifier(new_schema)
        )
    )
    try:
        before = catalog_snapshot(postgres_dsn)
        with pytest.raises(PgQueueError):
            downgrade(postgres_dsn, schema=new_schema)
        assert catalog_snapshot(postgres_dsn) == before
        assert db.execute(
            sql.SQL("SELECT count(*) FROM public.{}").format(sql.Identifier(view))
        ).fetchone() == (0,)
    finally:
        db.execute(sql.SQL("DROP VIEW public.{}").format(sql.Identifier(view)))


# ---------------------------------------------------------------------------- schema name


def test_custom_schema_touches_nothing_outside_it(
    postgres_dsn: str, new_schema: str, db: psycopg.Connection[Any]
) -> None:
    # The app's own tables, one of them named like pgqueue's, in public.
    db.execute("DROP TABLE IF EXISTS public.jobs, public.app_users")
    db.execute("CREATE TABLE public.jobs (id int PRIMARY KEY, title text)")
    db.execute("INSERT INTO public.jobs VALUES (1, 'plumber')")
    db.execute("CREATE TABLE public.app_users (id int)")
    try:
        before = catalog_snapshot(postgres_dsn)
        upgrade(postgres_dsn, schema=new_schema)
        after = catalog_snapshot(postgres_dsn)
        for key in (
            "relations",
            "columns",
            "indexes",
            "constraints",
            "types",
            "functions",
            "triggers",
        ):
            added = set(after[key]) - set(before[key])
            removed = set(before[key]) - set(after[key])
            assert removed == set(), key
            assert {row[0] for row in added} <= {new_schema}, key
        assert after["extensions"] == before["extensions"]
        assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES
        assert "pgqueue" not in {row[0] for row in after["schemas"]} - {row[0] for row in before["schemas"]}

        with Queue(postgres_dsn, schema=new_schema) as queue:
            job_id = queue.enqueue("in.custom.schema")
            assert queue.get_job(job_id).task == "in.custom.schema"
        row = db.execute(sql.SQL("SELECT task FROM {}.jobs").format(sql.Identifier(new_schema)))
        assert row.fetchall() == [("in.custom.schema",)]

        downgrade(postgres_dsn, schema=new_schema)
        assert catalog_snapshot(postgres_dsn) == before
        assert db.execute("SELECT id, title FROM public.jobs").fetchall() == [(1, "plumber")]
    finally:
        db.execute("DROP TABLE IF EXISTS public.jobs, public.app_users")


def test_default_schema_is_pgqueue(postgres_dsn: str) -> None:
    with Queue(postgres_dsn) as queue:
        assert queue.schema == "pgqueue"
        queue.migrate()
        try:
            assert tables_in(postgres_dsn, "pgqueue") >= PGQUEUE_TABLES
            job_id = queue.enqueue("default.schema")
            assert queue.get_job(job_id).queue == "default"
        finally:
            downgrade(postgres_dsn)
    assert not schema_exists(postgres_dsn, "pgqueue")


@pytest.mark.parametrize("schema", ["Upper", "with-dash", "semi;colon", 'quo"te', "", "9lead", "x" * 49])
def test_unsafe_schema_names_are_refused(postgres_dsn: str, schema: str) -> None:
    before = catalog_snapshot(postgres_dsn)
    with pytest.raises(ConfigurationError):
        Queue(postgres_dsn, schema=schema)
    with pytest.raises(ConfigurationError):
        upgrade(postgres_dsn, schema=schema)
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", schema]) == 2
    assert catalog_snapshot(postgres_dsn) == before


# ---------------------------------------------------------------------------- DSN


def test_dsn_comes_from_pgqueue_dsn_before_database_url(
    postgres_dsn: str, new_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGQUEUE_DSN", postgres_dsn)
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_DSN)
    assert Queue(schema=new_schema).dsn == postgres_dsn
    assert cli_main(["migrate", "--schema", new_schema]) == 0
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES


def test_dsn_falls_back_to_database_url(
    postgres_dsn: str, new_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGQUEUE_DSN", raising=False)
    monkeypatch.setenv("DATABASE_URL", postgres_dsn)
    with Queue(schema=new_schema) as queue:
        queue.migrate()
        assert queue.get_job(queue.enqueue("via.database_url")).task == "via.database_url"
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES


def test_explicit_dsn_wins_over_the_environment(
    postgres_dsn: str, new_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGQUEUE_DSN", UNREACHABLE_DSN)
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_DSN)
    assert cli_main(["migrate", "--dsn", postgres_dsn, "--schema", new_schema]) == 0
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES


def test_sqlalchemy_style_urls_are_accepted(
    postgres_dsn: str, new_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert postgres_dsn.startswith("postgresql://")
    sa_url = "postgresql+psycopg://" + postgres_dsn.removeprefix("postgresql://")
    monkeypatch.setenv("DATABASE_URL", sa_url)
    monkeypatch.delenv("PGQUEUE_DSN", raising=False)
    with Queue(schema=new_schema) as queue:
        assert queue.dsn == postgres_dsn
        queue.migrate()
        assert queue.get_job(queue.enqueue("sa.url")).task == "sa.url"


def test_dsn_from_the_environment_in_a_subprocess(postgres_dsn: str, new_schema: str) -> None:
    done = run_cli(
        ["migrate", "--schema", new_schema],
        env={"PGQUEUE_DSN": postgres_dsn, "DATABASE_URL": UNREACHABLE_DSN},
    )
    assert done.returncode == 0, done.stderr
    assert tables_in(postgres_dsn, new_schema) >= PGQUEUE_TABLES


def test_no_dsn_anywhere_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PGQUEUE_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="PGQUEUE_DSN"):
        _ = Queue().dsn
    assert cli_main(["migrate"]) == 2
    assert "PGQUEUE_DSN" in capsys.readouterr().err
