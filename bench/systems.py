"""The systems compared, and the virtualenvs the peers run in (bench/.venvs/<name>, pinned).

pgqueue runs with the harness's own interpreter (the venv pgqueue is installed in); each peer
gets a venv of its own, so no peer package is ever imported next to pgqueue.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
VENVS_DIR = BENCH_DIR / ".venvs"


@dataclass(frozen=True)
class System:
    name: str
    version_of: str | None  # the distribution whose version the report shows
    requirements: tuple[str, ...] = ()  # pinned; empty for pgqueue (the harness's venv)
    notify_off: bool = False  # can enqueue without NOTIFY (write-heavy app, "off" arm)
    poll_interval: bool = False  # its driver's worker takes a poll interval ("off_busy" arm)
    driver: str = ""  # bench/peers/<driver>_driver.py; default: the system's name
    params: dict[str, Any] = field(default_factory=dict)  # added to every command
    scenarios: frozenset[str] | None = None  # None: every scenario
    reference: bool = False  # not a job queue: a yardstick, never "the best peer"

    @property
    def script(self) -> str:
        return self.driver or self.name

    def runs(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios

    @property
    def is_peer(self) -> bool:
        return bool(self.requirements)

    @property
    def venv(self) -> Path:
        return VENVS_DIR / self.name

    def python(self) -> str:
        if not self.is_peer:
            return sys.executable
        return str(self.venv / "bin" / "python")


PGQUEUE = System("pgqueue", "pgqueue", notify_off=True, poll_interval=True)
# The same work with no framework (one INSERT per job, COPY, a bare claim + ack loop on pgqueue's
# table, and the app's rows with no job at all): the ceiling on this machine, in the same run.
BARE = System(
    "bare-sql",
    "psycopg",
    driver="pgqueue",
    params={"bare": True},
    scenarios=frozenset({"enqueue", "drain", "app"}),
    reference=True,
)
PEERS = {
    "pgqueuer": System(
        "pgqueuer",
        "pgqueuer",
        ("pgqueuer==1.6.0", "asyncpg==0.32.0", "uvloop==0.23.0"),
    ),
    "procrastinate": System(
        "procrastinate",
        "procrastinate",
        ("procrastinate==3.10.0", "psycopg[binary,pool]==3.3.9"),
    ),
    "chancy": System(
        "chancy",
        "chancy",
        ("chancy==0.26.0", "psycopg[binary,pool]==3.3.9"),
        notify_off=True,
    ),
    # BullMQ for Python on its PostgreSQL backend (bench/peers/bullmq_driver.py).
    "bullmq": System(
        "bullmq",
        "bullmq",
        ("bullmq[postgres]==3.4.4", "psycopg[binary]==3.3.6"),
    ),
    # awa: a Rust core with a Python SDK (bench/peers/awa_driver.py).
    "awa": System(
        "awa",
        "awa-pg",
        ("awa-pg==0.6.9", "psycopg[binary]==3.3.9"),
    ),
}
ALL = {"pgqueue": PGQUEUE, **PEERS, "bare-sql": BARE}


def _stamp(system: System) -> str:
    return hashlib.sha256(json.dumps([sys.version, *system.requirements]).encode()).hexdigest()[:16]


def ensure_venv(system: System, log: Path) -> None:
    """Create the peer's venv and pip-install its pinned requirements, unless already done."""
    if not system.is_peer:
        return
    stamp_file = system.venv / ".bench-stamp"
    if stamp_file.exists() and stamp_file.read_text() == _stamp(system) and Path(system.python()).exists():
        return
    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(system.venv)], check=True, stdout=out, stderr=out
        )
        subprocess.run(
            [
                system.python(),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                *system.requirements,
            ],
            check=True,
            stdout=out,
            stderr=out,
        )
    stamp_file.write_text(_stamp(system))


def installed_versions(system: System) -> dict[str, str]:
    """Versions of the packages that matter, as installed in the system's interpreter."""
    names = [system.version_of or system.name, "psycopg", "psycopg-binary", "psycopg-pool"]
    if system.is_peer:
        names += ["asyncpg", "uvloop"]
    code = (
        "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\n"
        "out = {}\nfor n in json.loads(sys.argv[1]):\n"
        "    try:\n        out[n] = version(n)\n    except PackageNotFoundError:\n        pass\n"
        "out['python'] = sys.version.split()[0]\nprint(json.dumps(out))"
    )
    if not system.is_peer:  # where the drivers import pgqueue from (see bench/proto.py)
        code += "\nimport pgqueue, os; out['pgqueue_path'] = os.path.dirname(pgqueue.__file__)"
        code += "\nprint(json.dumps(out))"
    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR.parent) if not system.is_peer else ""}
    done = subprocess.run(
        [system.python(), "-c", code, json.dumps(names)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    if not system.is_peer:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    return dict(json.loads(done.stdout))
