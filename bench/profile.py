"""Where pgqueue's time goes: py-spy on the worker (or producer) process and pg_stat_statements.

    pip install py-spy                      # into pgqueue's venv; optional (SQL side works without)
    python -m bench.profile drain --jobs 100000
    python -m bench.profile drain --jobs 100000 --no-freeze   # what freeze_startup_heap saves
    python -m bench.profile io --jobs 20000
    python -m bench.profile bulk --jobs 200000
    python -m bench.profile single --jobs 5000
    python -m bench.profile steady --offered 14000 --seconds 10

Starts its own embedded PostgreSQL (bench.server settings + pg_stat_statements), runs one
workload through pgqueue's driver, samples the busy Python process with ``py-spy record`` and
prints the functions with the most samples (self and inclusive) and the statements with the most
database time. Nothing here is timed for the results table; it only explains it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.proto import Driver, run_op
from bench.server import SETTINGS, embedded_server, fresh_database, to_url
from bench.systems import PGQUEUE


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.path.exists(found) else None


def summarise_stacks(raw: Path, top: int) -> str:
    """py-spy's collapsed stacks -> the top functions by self and by inclusive samples."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        names = [_short(f) for f in frames]
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "self %   function"]
    out += [f"{100 * c / total:5.1f}   {name}" for name, c in self_counts.most_common(top)]
    out += ["", "incl %   function"]
    out += [f"{100 * c / total:5.1f}   {name}" for name, c in incl_counts.most_common(top)]
    return "\n".join(out)


def _short(frame: str) -> str:
    # "fn (path/to/module.py:123)" -> "fn (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = Path(file).parts
    tail = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({tail})"


def statements(dsn: str, top: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT calls, total_exec_time, mean_exec_time, rows,"
            " left(regexp_replace(query, '\\s+', ' ', 'g'), 110) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " ORDER BY total_exec_time DESC LIMIT %s",
            (top,),
        ).fetchall()
    out = ["   calls   total ms   mean ms      rows  statement"]
    out += [
        f"{calls:8d} {total:10.0f} {mean:9.3f} {nrows:9d}  {query}"
        for calls, total, mean, nrows, query in rows
    ]
    return "\n".join(out)


def attach(spy: str | None, pid: int, rate: int, raw: Path) -> subprocess.Popen[bytes] | None:
    if spy is None:
        return None
    argv = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    argv += ["--output", str(raw), "--nonblocking"]
    return subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def reset_statements(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("VACUUM ANALYZE pgqueue.jobs")
        c.execute("SELECT pg_stat_statements_reset()")


def drain(args: argparse.Namespace, base: dict[str, Any], spy: str | None, raw: Path, work: Path):  # type: ignore[no-untyped-def]
    python = PGQUEUE.python()
    task = "sleep" if args.workload == "io" else "noop"
    command = {**base, "op": "enqueue", "mode": "bulk", "n": args.jobs, "task": task}
    run_op(python, "pgqueue", command, 600)
    reset_statements(base["dsn"])
    concurrency = args.concurrency or (100 if args.workload == "io" else None)
    command = {**base, "op": "worker", "concurrency": concurrency, "clock": True}
    command["freeze"] = not args.no_freeze
    worker = Driver(python, "pgqueue", command, work)
    worker.wait_for("ready", 60)
    spy_proc = attach(spy, worker.proc.pid, args.rate, raw)
    while worker.done < args.jobs + 1:
        time.sleep(0.05)
    worker.stop()
    result = worker.finish()
    rate = result["count"] / (result["last_end"] - result["first_start"])
    clock = result["clock"]
    passes = ", ".join(f"{g} {n['passes']} in {n['seconds']:.3f} s" for g, n in clock["collector"].items())
    line = f"{args.workload}: {result['count']} jobs, {rate:,.0f} jobs/s; collector: {passes}"
    if "on_cpu_s" in clock:  # the worker's main thread, from its start to its stop
        line += f"; main thread on a CPU {clock['on_cpu_s']:.2f} s,"
        line += f" runnable but waiting {clock['runnable_waiting_s']:.2f} s"
    return spy_proc, line


def steady(args: argparse.Namespace, base: dict[str, Any], spy: str | None, raw: Path, work: Path):  # type: ignore[no-untyped-def]
    """A producer at --offered jobs/s for --seconds onto a running worker (scenario 4's shape)."""
    python = PGQUEUE.python()
    worker = Driver(python, "pgqueue", {**base, "op": "worker", "latency": True}, work)
    worker.wait_for("ready", 60)
    run_op(python, "pgqueue", {**base, "op": "enqueue", "mode": "single", "n": 5, "warm": True}, 60)
    while worker.done < 6:
        time.sleep(0.02)
    reset_statements(base["dsn"])
    spy_proc = attach(spy, worker.proc.pid, args.rate, raw)
    produce = {**base, "op": "produce", "rate": args.offered, "duration": args.seconds, "tick": 0.01}
    produced = run_op(python, "pgqueue", produce, args.seconds * 3 + 60)
    deadline = time.monotonic() + args.seconds * 2 + 10
    while worker.done < 6 + produced["enqueued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop()
    result = worker.finish()
    lat = result["latency"] or {}
    return spy_proc, (
        f"steady: offered {args.offered:,}/s, produced {produced['rate']:,.0f}/s, ran {result['count']}"
        f" jobs; latency p50 {lat.get('p50_ms', 0):.1f} ms p95 {lat.get('p95_ms', 0):.1f}"
        f" p99 {lat.get('p99_ms', 0):.1f} max {lat.get('max_ms', 0):.0f}"
    )


def enqueue(args: argparse.Namespace, base: dict[str, Any], spy: str | None, raw: Path, work: Path):  # type: ignore[no-untyped-def]
    python = PGQUEUE.python()
    reset_statements(base["dsn"])
    command = {**base, "op": "enqueue", "mode": args.workload, "n": args.jobs}
    if spy is None:
        r = run_op(python, "pgqueue", command, 900)
        return None, f"{args.workload} enqueue: {r['rate']:,.0f} jobs/s"
    driver = str(Path(__file__).parent / "peers" / "pgqueue_driver.py")
    argv = [spy, "record", "--rate", str(args.rate), "--format", "raw", "--output", str(raw)]
    argv += ["--", python, driver, json.dumps(command)]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    line = [x for x in done.stdout.splitlines() if '"result"' in x]
    return None, f"{args.workload} enqueue: {line[-1] if line else done.stdout[-300:]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workload", choices=["drain", "io", "steady", "bulk", "single"])
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, help="worker concurrency (default: the driver's)")
    p.add_argument("--offered", type=int, default=10_000, help="steady: producer jobs/s")
    p.add_argument("--seconds", type=float, default=10.0, help="steady: producer duration")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-freeze", action="store_true", help="the worker keeps its start-up heap unfrozen")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    args = p.parse_args(argv)

    spy = py_spy()
    if spy is None:
        print("py-spy not found: pip install py-spy (Python side skipped)", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="pgqueue-profile-"))
    raw = work / "stacks.txt"
    settings = {
        **SETTINGS,
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "all",
    }
    runner = {"drain": drain, "io": drain, "steady": steady, "bulk": enqueue, "single": enqueue}
    with embedded_server(settings) as admin, fresh_database(admin, "profile") as dsn:
        base = {"dsn": dsn, "url": to_url(dsn)}
        run_op(PGQUEUE.python(), "pgqueue", {**base, "op": "setup"}, 300)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        spy_proc, headline = runner[args.workload](args, base, spy, raw, work)
        if spy_proc is not None:  # py-spy writes its file once the worker process has exited
            try:
                spy_proc.wait(20)
            except subprocess.TimeoutExpired:
                spy_proc.send_signal(signal.SIGINT)
                spy_proc.wait(30)
        print(headline)
        print("\n== pg_stat_statements (this database, by total time) ==")
        print(statements(dsn, args.top))
    if spy and raw.exists():
        print("\n== py-spy (the busy Python process) ==")
        print(summarise_stacks(raw, args.top))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
