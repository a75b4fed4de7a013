"""The wheel: one top-level import name, the migrations inside, and enough on its own (a fresh
venv, no repository) to migrate a database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import pgqueue

REPO = Path(__file__).resolve().parent.parent
DIST_INFO = f"pgqueue-{pgqueue.__version__}.dist-info"


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points back at this checkout or venv."""
    drop = {
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "PGQUEUE_DSN",
        "DATABASE_URL",
        "PGQUEUE_SCHEMA",
        "PYTHONSTARTUP",
    }
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(command: list[str | Path], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", out, REPO], cwd=out)
    (built,) = out.glob("pgqueue-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_installs_exactly_one_top_level_package(wheel_names: list[str]) -> None:
    assert {name.split("/")[0] for name in wheel_names} == {"pgqueue", DIST_INFO}


def test_the_wheel_ships_the_migrations_and_the_sql(wheel_names: list[str]) -> None:
    names = set(wheel_names)
    assert "pgqueue/_migrations/env.py" in names
    assert "pgqueue/_migrations/script.py.mako" in names
    versions = {n for n in names if n.startswith("pgqueue/_migrations/versions/")}
    expected = {
        f"pgqueue/_migrations/versions/{p.name}" for p in (REPO / "migrations" / "versions").glob("*.py")
    }
    assert expected and versions == expected
    for source in (REPO / "pgqueue").rglob("*"):
        if source.suffix in (".py", ".sql") and "__pycache__" not in source.parts:
            assert source.relative_to(REPO).as_posix() in names, source


def test_the_wheel_holds_no_build_litter(wheel_names: list[str]) -> None:
    litter = [
        n
        for n in wheel_names
        if "__pycache__" in n
        or n.endswith((".pyc", ".pyo"))
        or n.split("/")[0] in ("tests", "api", "workers", "bench", "docs", "migrations")
    ]
    assert litter == []


def test_the_wheel_declares_the_console_script_and_pytest_plugin(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
        metadata = archive.read(f"{DIST_INFO}/METADATA").decode()
    assert "[console_scripts]\npgqueue = pgqueue.cli:main" in entry_points
    assert "[pytest11]\npgqueue = pgqueue.testing" in entry_points
    assert "Requires-Python: >=3.11" in metadata
    for dependency in ("psycopg", "psycopg-pool", "sqlalchemy", "alembic"):
        assert f"Requires-Dist: {dependency}" in metadata


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A brand-new venv (no system site-packages) with only the wheel and its dependencies."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    started = time.monotonic()
    # No pip inside the venv (bootstrapping it costs seconds): this interpreter's pip installs
    # into it with --python, resolving the wheel's dependencies from the index as a user's would.
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            "--no-compile",
            wheel,
        ],
        cwd=venv.parent,
    )
    print(f"fresh venv + pip install of the wheel: {time.monotonic() - started:.1f}s")
    yield venv


def test_the_installed_package_does_not_come_from_the_repository(installed: Path, tmp_path: Path) -> None:
    done = run(
        [
            installed / "bin" / "python",
            "-c",
            "import pgqueue, pgqueue.migrate as m; print(pgqueue.__file__); print(m.migrations_path())",
        ],
        cwd=tmp_path,
    )
    module, migrations = done.stdout.split()
    site = installed.resolve()
    assert Path(module).resolve().is_relative_to(site)
    assert Path(migrations).resolve() == Path(module).resolve().parent / "_migrations"
    assert not Path(module).resolve().is_relative_to(REPO)


def test_the_wheel_alone_can_migrate_a_database(
    installed: Path, tmp_path: Path, postgres_dsn: str, new_schema: str
) -> None:
    pgqueue_cli = installed / "bin" / "pgqueue"
    done = run([pgqueue_cli, "migrate", "--dsn", postgres_dsn, "--schema", new_schema], cwd=tmp_path)
    assert new_schema in done.stdout
    with psycopg.connect(postgres_dsn) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                [new_schema],
            )
        }
        assert {"jobs", "dead_letter", "queues", "workers", "alembic_version"} <= tables
        conn.execute(
            sql.SQL("INSERT INTO {}.jobs (queue, task) VALUES ('default', 'smoke')").format(
                sql.Identifier(new_schema)
            )
        )
    # And it removes what it made.
    run(
        [
            pgqueue_cli,
            "migrate",
            "--dsn",
            postgres_dsn,
            "--schema",
            new_schema,
            "--downgrade",
            "base",
        ],
        cwd=tmp_path,
    )
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", [new_schema]
        ).fetchone() == (0,)
