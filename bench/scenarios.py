"""The twelve scenarios, each written once against the driver protocol and run for every system.

Every measurement runs in a database of its own (``fresh_database``). Timing rules:

- enqueue: wall time of the driver's enqueue loop, connection already open (jobs/s).
- drain / I/O: jobs are queued first; rate = jobs / (last handler end - first handler start),
  taken from the handlers' own clocks across all worker processes; worker start-up is excluded,
  and afterwards the database is asked how many jobs are left unfinished (must be 0).
- latency: every job carries ``t`` = time.time() taken just before the enqueue call that commits
  it; the handler takes time.time() on entry; latency = the difference. It therefore includes the
  enqueue round trip itself (an upper bound on commit -> start by that much; the producer also
  reports how long its enqueue calls took). Same clock, same machine, every system alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.proto import Driver, DriverError, run_op
from bench.server import fresh_database, to_url
from bench.systems import System

IO_IDEAL = 5000.0  # 100 concurrent 20 ms sleeps


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int
    single: int  # single enqueues
    bulk: int  # bulk enqueue (batches of 1,000)
    drain: int  # jobs drained
    latency_jobs: int  # 20 ms apart
    steady_seconds: float
    app_seconds: float
    bloat_measure: int  # drained before and after
    bloat_volume: int  # pushed through in between
    io_jobs: int
    producer_jobs: int = 500  # single enqueues per producer, all producers at once
    snapshot_seconds: float = 5.0  # steady load while a REPEATABLE READ snapshot is held
    producers: int = 16  # producer processes enqueueing at once
    idle_workers: int = 8  # worker processes waiting for the wake-up scenario's jobs
    fair_backlog: int = 10_000  # 2 ms jobs queued in one queue while another queue's jobs arrive
    delayed_jobs: int = 100_000  # delayed at the first-running priority, in front of the drain


PROFILES = {
    "smoke": Profile("smoke", 1, 50, 500, 500, 10, 0.5, 0.5, 300, 1_000, 200, 20, 1.0, 3, 2, 300, 1_000),
    "quick": Profile(
        "quick", 3, 2_000, 20_000, 20_000, 250, 10.0, 10.0, 20_000, 100_000, 10_000, 1_000, 30.0
    ),
    "full": Profile(
        "full",
        5,
        10_000,
        200_000,
        200_000,
        1_500,
        60.0,
        30.0,
        200_000,
        1_000_000,
        50_000,
        5_000,
        300.0,
        fair_backlog=30_000,
        delayed_jobs=200_000,
    ),
}
SCENARIOS = (
    "enqueue",
    "drain",
    "latency",
    "steady",
    "app",
    "bloat",
    "io",
    "producers",
    "wakeups",
    "snapshot",
    "fairness",
    "delayed",
)
BATCH = 1_000


@dataclass
class Sample:
    scenario: str
    metric: str
    system: str
    rep: int
    value: float | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    admin_dsn: str
    profile: Profile
    log_dir: Path
    say: Callable[[str], None]
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(
        self, scenario: str, metric: str, system: str, rep: int, value: float | None, **detail: Any
    ) -> None:
        detail.setdefault("load1", round(os.getloadavg()[0], 2))
        self.samples.append(Sample(scenario, metric, system, rep, value, detail))

    def median(self, metric: str, system: str) -> float | None:
        values = sorted(
            s.value for s in self.samples if s.metric == metric and s.system == system and s.value is not None
        )
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class Bench:
    """Runs scenarios for one system in one fresh database."""

    def __init__(self, ctx: Context, system: System, dsn: str) -> None:
        self.ctx, self.system, self.dsn = ctx, system, dsn
        self.base = {"dsn": dsn, "url": to_url(dsn)}

    def command(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        return {**self.base, **self.system.params, "op": op, **params}

    def op(self, op: str, timeout: float = 600, **params: Any) -> dict[str, Any]:
        s = self.system
        return run_op(s.python(), s.name, self.command(op, params), timeout, self.ctx.log_dir, s.script)

    def start(self, op: str, **params: Any) -> Driver:
        s = self.system
        return Driver(s.python(), s.name, self.command(op, params), self.ctx.log_dir, s.script)

    def setup(self) -> None:
        self.op("setup", timeout=300)

    def seed(self, n: int, task: str = "noop", **options: Any) -> dict[str, Any]:
        """Queue ``n`` jobs in bulk (``options``: the enqueue op's queue, delay, priority, ...)."""
        return self.op(
            "enqueue", mode="bulk", n=n, batch=BATCH, task=task, timeout=max(600, n / 200), **options
        )

    def remaining(self) -> int:
        return int(self.op("count", timeout=120)["remaining"])

    def drain(
        self,
        processes: int,
        expected: int,
        task: str = "noop",
        concurrency: int | None = None,
        timeout: float | None = None,
        not_due: int = 0,
        budget: float | None = None,
    ) -> dict[str, Any]:
        """Start the workers on a full queue, stop them once every job ran, return the rate.

        ``not_due``: delayed jobs that must still be queued afterwards (not counted as left).
        ``budget``: stop after this many seconds even if jobs are left (``partial`` then says
        so); the rate is that of the jobs run meanwhile. For a system too slow to finish in a
        bench's time, where the rate, not the finish, is the figure.
        """
        limit = timeout or (expected / 40 + 120)
        partial = False
        workers = [self.start("worker", task=task, concurrency=concurrency) for _ in range(processes)]
        try:
            for w in workers:
                w.wait_for("ready", 120)
            started = time.monotonic()
            deadline = started + limit
            while sum(w.done for w in workers) < expected:
                for w in workers:
                    if w.proc.poll() is not None:
                        w.wait_for("result", 5)  # surfaces the driver's error
                if budget is not None and time.monotonic() > started + budget:
                    partial = True
                    break
                if time.monotonic() > deadline:
                    raise DriverError(
                        f"{self.system.name}: {sum(w.done for w in workers)}/{expected} jobs"
                        f" after {limit:.0f}s"
                    )
                time.sleep(0.05)
            results = _stop_all(workers)
        except BaseException:
            _kill_all(workers)
            raise
        first = min(r["first_start"] for r in results if r["first_start"] is not None)
        last = max(r["last_end"] for r in results if r["last_end"] is not None)
        count = sum(r["count"] for r in results)
        left = self.remaining() - not_due
        warnings = _worker_warnings(workers)
        if partial:
            self.ctx.notes.append(
                f"{self.system.name} drain of {expected} jobs stopped after its {budget:.0f}s budget"
                f" with {count} run: the rate is theirs"
            )
        elif left or count > expected or warnings:
            # Jobs left unfinished, or handlers run more often than there were jobs (a job run
            # again after its lease expired, e.g. because its outcome was never written).
            self.ctx.notes.append(
                f"{self.system.name} drain of {expected} jobs: {count} handler runs, {left} left"
                f" unfinished; worker said: {'; '.join(warnings) or 'nothing'}"
            )
        return {
            "rate": count / (last - first),
            "jobs": count,
            "expected": expected,
            "extra_runs": max(0, count - expected),
            "remaining": left,
            "partial": partial,
            "seconds": last - first,
            "per_process": [r["count"] for r in results],
            "config": results[0].get("config"),
            "worker_warnings": warnings,
        }


def _stop_all(workers: list[Driver]) -> list[dict[str, Any]]:
    """Tell every worker to stop, then collect their results."""
    for w in workers:
        w.stop()
    return [w.finish(120) for w in workers]


def _kill_all(workers: list[Driver]) -> None:
    for w in workers:
        w.kill()


_WARNING_WORDS = ("could not write", "rescued", "failed", "Traceback", "ERROR")


def _worker_warnings(workers: list[Driver]) -> list[str]:
    """Distinct warning lines from the workers' stderr logs (the first few of each kind)."""
    seen: dict[str, int] = {}
    for w in workers:
        text = w.stderr_text()
        for line in text.splitlines():
            if any(word in line for word in _WARNING_WORDS):
                key = line.strip()[:160]
                seen[key] = seen.get(key, 0) + 1
    return [f"{line} (x{n})" if n > 1 else line for line, n in list(seen.items())[:5]]


def each_system(
    ctx: Context,
    systems: list[System],
    scenario: str,
    label: str,
    body: Callable[[Bench, int], None],
    reps: int | None = None,
) -> None:
    """Repetitions x systems, order alternating per repetition, a fresh database each time."""
    systems = [s for s in systems if s.runs(scenario)]
    reps = reps or ctx.profile.reps
    for rep in range(reps):
        order = systems if rep % 2 == 0 else list(reversed(systems))
        for system in order:
            ctx.say(f"{label} · {system.name} · rep {rep + 1}/{reps}")
            try:
                with fresh_database(ctx.admin_dsn, f"{system.name}_{scenario}") as dsn:
                    bench = Bench(ctx, system, dsn)
                    bench.setup()
                    body(bench, rep)
            except DriverError as exc:
                message = f"{label} · {system.name} · rep {rep + 1}: failed: {exc}"
                ctx.say("  " + message.splitlines()[0])
                ctx.notes.append(message)
                ctx.record(scenario, "error", system.name, rep, None, error=str(exc)[:2000])


# ---------------------------------------------------------------- 1. enqueue


def enqueue(ctx: Context, systems: list[System]) -> None:
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        single = b.op("enqueue", mode="single", n=p.single)
        ctx.record("enqueue", "enqueue_single", b.system.name, rep, single["rate"], jobs=p.single)
        bulk = b.op("enqueue", mode="bulk", n=p.bulk, batch=BATCH)
        ctx.record("enqueue", "enqueue_bulk", b.system.name, rep, bulk["rate"], jobs=p.bulk, batch=BATCH)
        ctx.say(f"  single {single['rate']:,.0f}/s · bulk {bulk['rate']:,.0f}/s")

    each_system(ctx, systems, "enqueue", "1 enqueue", body)


# ---------------------------------------------------------------- 2. drain


def drain(ctx: Context, systems: list[System]) -> None:
    p = ctx.profile
    for processes in (1, 2):

        def body(b: Bench, rep: int, processes: int = processes) -> None:
            b.seed(p.drain)
            expected = b.remaining()
            r = b.drain(processes, expected)
            ctx.record("drain", f"drain_{processes}p", b.system.name, rep, r["rate"], **r)
            lost = f" · {r['remaining']} LEFT UNFINISHED" if r["remaining"] else ""
            ctx.say(f"  {r['rate']:,.0f} jobs/s ({r['jobs']} jobs, {r['seconds']:.2f}s){lost}")
            if r["remaining"]:
                ctx.notes.append(
                    f"drain {processes}p {b.system.name} rep {rep + 1}: {r['remaining']} jobs unfinished"
                )

        each_system(
            ctx,
            systems,
            "drain",
            f"2 drain {p.drain:,} · {processes} process{'es' if processes > 1 else ''}",
            body,
        )


# ---------------------------------------------------------------- 3. latency

WARMUP = 5


def _warm_worker(b: Bench, worker: Driver) -> int:
    """Wait for the worker to be up and to have run a few warm-up jobs; returns its count so far."""
    worker.wait_for("ready", 120)
    b.op("enqueue", mode="single", n=WARMUP, warm=True)
    deadline = time.monotonic() + 60
    while worker.done < WARMUP:
        if time.monotonic() > deadline or worker.proc.poll() is not None:
            worker.wait_for("result", 5)
            raise DriverError(f"{b.system.name}: worker ran {worker.done}/{WARMUP} warm-up jobs in 60s")
        time.sleep(0.02)
    time.sleep(0.5)  # let the worker go idle again
    return worker.done


def _done_at(worker: Driver, at: float) -> float:
    """Jobs the worker had run by time ``at``, interpolated between its progress reports."""
    points = list(worker.progress)
    before = [(t, n) for t, n in points if t <= at]
    after = [(t, n) for t, n in points if t > at]
    if not before:
        return float(after[0][1]) if after else 0.0
    t0, n0 = before[-1]
    if not after:
        return float(n0)
    t1, n1 = after[0]
    return n0 + (n1 - n0) * (at - t0) / (t1 - t0)


def _produce_and_collect(
    b: Bench, worker: Driver, rate: float, duration: float, tick: float | None
) -> tuple[dict[str, Any], dict[str, Any], int]:
    before = _warm_worker(b, worker)
    producer = b.start("produce", rate=rate, duration=duration, tick=tick)
    produced = producer.finish(duration * 3 + 120)
    time.sleep(0.3)  # a progress event after the window closes, to interpolate against
    in_window = _done_at(worker, produced["end"]) - _done_at(worker, produced["begin"])
    expected = before + produced["enqueued"]
    deadline = time.monotonic() + max(30.0, duration * 2)
    while worker.done < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop()
    result = worker.finish(120)
    return produced, result, in_window


def latency(ctx: Context, systems: list[System]) -> None:
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        worker = b.start("worker", latency=True)
        try:
            produced, result, _ = _produce_and_collect(
                b, worker, rate=50, duration=p.latency_jobs * 0.02, tick=0.02
            )
        except BaseException:
            worker.kill()
            raise
        lat = result["latency"] or {}
        for q in ("p50", "p95", "p99"):
            ctx.record("latency", f"latency_{q}", b.system.name, rep, lat.get(f"{q}_ms"), **lat)
        ctx.record(
            "latency",
            "latency_enqueue_call_p50",
            b.system.name,
            rep,
            produced["enqueue_call"].get("p50_ms"),
            **produced["enqueue_call"],
        )
        ctx.say(
            f"  p50 {lat.get('p50_ms', float('nan')):.2f} ms · p95 {lat.get('p95_ms', float('nan')):.2f} · "
            f"p99 {lat.get('p99_ms', float('nan')):.2f} ({lat.get('count', 0)} jobs)"
        )

    each_system(ctx, systems, "latency", f"3 latency {p.latency_jobs} jobs 20 ms apart", body)


# ---------------------------------------------------------------- 4. steady state


def _drain_rate(ctx: Context, system: System) -> float:
    rate = ctx.median("drain_1p", system.name)
    if rate is not None:
        return rate
    ctx.say(f"4 steady · {system.name} · calibrating: drain {ctx.profile.drain:,} with one process")
    with fresh_database(ctx.admin_dsn, f"{system.name}_calibrate") as dsn:
        b = Bench(ctx, system, dsn)
        b.setup()
        b.seed(ctx.profile.drain)
        r = b.drain(1, b.remaining())
    ctx.record("drain", "drain_1p_calibration", system.name, 0, r["rate"], **r)
    return float(r["rate"])


def steady(ctx: Context, systems: list[System]) -> None:
    """Each system at 50 % and 90 % of its own drain rate, then every system that can drain that
    fast at one rate, 90 % of the fastest peer's: the first two compare systems each at its own
    load (on two shared cores, twice the rate also costs the producer and the server twice the
    CPU), the third at the load a user has, whichever system they run."""
    p = ctx.profile
    rates = {s.name: _drain_rate(ctx, s) for s in systems if s.runs("steady")}
    for fraction in (0.5, 0.9):
        pct = int(fraction * 100)
        _steady_pass(
            ctx,
            systems,
            f"steady{pct}",
            f"4 steady {pct}% of drain rate for {p.steady_seconds:.0f}s",
            {name: rate * fraction for name, rate in rates.items()},
        )
    peer_rates = [rates[s.name] for s in systems if s.name in rates and s.is_peer and not s.reference]
    if not peer_rates:
        return
    shared = 0.9 * max(peer_rates)
    able = [s for s in systems if s.name in rates and rates[s.name] >= shared]
    left_out = sorted(name for name in rates if name not in {s.name for s in able})
    if left_out:
        ctx.say(f"4 steady at {shared:,.0f} jobs/s: {', '.join(left_out)} drain slower than that, left out")
    _steady_pass(
        ctx,
        able,
        "steadyeq",
        f"4 steady, every system at {shared:,.0f} jobs/s (90% of the fastest peer's drain) "
        f"for {p.steady_seconds:.0f}s",
        {s.name: shared for s in able},
    )


def _steady_pass(
    ctx: Context, systems: list[System], metric: str, label: str, offered_by: dict[str, float]
) -> None:
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        offered = offered_by[b.system.name]
        worker = b.start("worker", latency=True)
        try:
            produced, result, in_window = _produce_and_collect(
                b, worker, rate=offered, duration=p.steady_seconds, tick=0.01
            )
        except BaseException:
            worker.kill()
            raise
        held = in_window / produced["seconds"]
        lat = result["latency"] or {}
        call = produced["enqueue_call"]
        detail = {
            "offered": offered,
            "produced_rate": produced["rate"],
            "in_window": in_window,
            "enqueued": produced["enqueued"],
            "latency": lat,
            "enqueue_call": call,
        }
        ctx.record("steady", f"{metric}_held", b.system.name, rep, held, **detail)
        ctx.record("steady", f"{metric}_held_pct", b.system.name, rep, 100 * held / offered, **detail)
        ctx.record("steady", f"{metric}_p50", b.system.name, rep, lat.get("p50_ms"))
        ctx.record("steady", f"{metric}_p99", b.system.name, rep, lat.get("p99_ms"))
        # A job's latency counts from just before the producer's call that enqueued it (a tick's
        # batch, rate x 10 ms of jobs): the call's own time is part of every job's figure.
        ctx.record("steady", f"{metric}_enqueue_call_p50", b.system.name, rep, call.get("p50_ms"), **call)
        ctx.say(
            f"  offered {offered:,.0f}/s · produced {produced['rate']:,.0f}/s · held {held:,.0f}/s "
            f"({100 * held / offered:.0f}%) · p50 {lat.get('p50_ms', float('nan')):.1f} ms · "
            f"p99 {lat.get('p99_ms', float('nan')):.1f} ms · enqueue call p50 "
            f"{call.get('p50_ms', float('nan')):.2f} ms"
        )

    each_system(ctx, systems, "steady", label, body)


# ---------------------------------------------------------------- 5. write-heavy app

APP_CONNECTIONS = 8


def app(ctx: Context, systems: list[System]) -> None:
    p = ctx.profile
    arms = [("on", True), ("off", False)]

    def body(b: Bench, rep: int) -> None:
        if b.system.reference:  # the same app with no job at all
            r = b.op(
                "app",
                connections=APP_CONNECTIONS,
                duration=p.app_seconds,
                no_job=True,
                timeout=p.app_seconds + 120,
            )
            ctx.record("app", "app_no_queue", b.system.name, rep, r["tx_per_s"], **r)
            ctx.say(f"  app rows only, no job: {r['tx_per_s']:,.0f} tx/s")
            return
        for arm, notify in arms:
            if not notify and not b.system.notify_off:
                continue
            r = b.op(
                "app",
                connections=APP_CONNECTIONS,
                duration=p.app_seconds,
                notify=notify,
                timeout=p.app_seconds + 120,
            )
            ctx.record("app", f"app_notify_{arm}", b.system.name, rep, r["tx_per_s"], **r)
            ctx.say(f"  NOTIFY {arm}: {r['tx_per_s']:,.0f} tx/s")

    each_system(
        ctx, systems, "app", f"5 write-heavy app · {APP_CONNECTIONS} connections x {p.app_seconds:.0f}s", body
    )


# ---------------------------------------------------------------- 6. bloat


def bloat(ctx: Context, systems: list[System]) -> None:
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        b.seed(p.bloat_measure)
        fresh = b.drain(1, b.remaining())
        b.seed(p.bloat_volume)
        b.drain(1, b.remaining(), timeout=p.bloat_volume / 20 + 300)
        b.seed(p.bloat_measure)
        after = b.drain(1, b.remaining())
        sizes = _table_sizes(b) if b.system.name == "pgqueue" else {}
        ratio = 100 * after["rate"] / fresh["rate"]
        ctx.record("bloat", "bloat_fresh", b.system.name, rep, fresh["rate"], **fresh)
        ctx.record("bloat", "bloat_after", b.system.name, rep, after["rate"], **after, sizes=sizes)
        ctx.record("bloat", "bloat_after_pct", b.system.name, rep, ratio)
        ctx.say(
            f"  fresh {fresh['rate']:,.0f}/s · after {p.bloat_volume + p.bloat_measure:,} jobs "
            f"{after['rate']:,.0f}/s ({ratio:.0f}%) {sizes}"
        )

    each_system(ctx, systems, "bloat", f"6 bloat: {p.bloat_volume:,} jobs through the queue", body)


def _table_sizes(b: Bench) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(b.dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'pgqueue' AND c.relname LIKE '%%jobs%%' AND c.relkind IN ('r', 'i')"
        ).fetchall()
        live = c.execute("SELECT count(*) FROM pgqueue.jobs").fetchone()
        finished = c.execute("SELECT count(*) FROM pgqueue.finished_jobs").fetchone()
    return {
        "rows": live[0] if live else None,
        "finished rows": finished[0] if finished else None,
        **{name: f"{size / 2**20:.1f} MiB" for name, size in rows},
    }


# ---------------------------------------------------------------- 7. I/O-bound

IO_CONCURRENCY = 100


def io(ctx: Context, systems: list[System]) -> None:
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        b.seed(p.io_jobs, task="sleep")
        r = b.drain(1, b.remaining(), task="sleep", concurrency=IO_CONCURRENCY)
        ctx.record("io", "io_rate", b.system.name, rep, r["rate"], **r)
        ctx.record("io", "io_pct_ideal", b.system.name, rep, 100 * r["rate"] / IO_IDEAL)
        ctx.say(f"  {r['rate']:,.0f} jobs/s = {100 * r['rate'] / IO_IDEAL:.0f}% of ideal {IO_IDEAL:,.0f}/s")

    each_system(
        ctx, systems, "io", f"7 I/O-bound: {p.io_jobs:,} x 20 ms sleeps at concurrency {IO_CONCURRENCY}", body
    )


# ---------------------------------------------------------------- 8. many producers, NOTIFY


def _database_stats(dsn: str) -> dict[str, int]:
    """The database's transaction and dead-row counters (as its statistics have them so far)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_stat_force_next_flush()")
        row = c.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        dead = c.execute("SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables").fetchone()
    return {"transactions": int(row[0]) if row else 0, "dead_rows": int(dead[0]) if dead else 0}


def _durable_commits(dsn: str) -> None:
    """Every commit waits for its WAL flush in this database, as an app's own would."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        dbname = c.execute("SELECT current_database()").fetchone()
        assert dbname is not None
        c.execute(f'ALTER DATABASE "{dbname[0]}" SET synchronous_commit = on')


# The third arm: NOTIFY off, the worker polling this often, so it runs the jobs as they come (as
# the "on" arm's worker does, woken) instead of in a few batches at 2 s polls.
BUSY_POLL = 0.01


def producers(ctx: Context, systems: list[System]) -> None:
    """16 producers (by profile) enqueueing one job per transaction at once, durable commits, one
    worker running: what NOTIFY's commit-time lock costs each system (NOTIFY off where it can be).

    Off, a worker finds the jobs at its polls, mostly after the producers are done; on, it runs
    them meanwhile, on the same cores. The ``off_busy`` arm (NOTIFY off, a 10 ms poll; systems
    whose worker takes a poll interval) does that work meanwhile too, so on / off_busy is what
    NOTIFY itself costs."""
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        _durable_commits(b.dsn)
        arms: list[tuple[str, bool, float | None]] = [("on", True, None), ("off", False, None)]
        if b.system.poll_interval:
            arms.append(("off_busy", False, BUSY_POLL))
        for arm, notify, poll in arms:
            if not notify and not b.system.notify_off:
                continue
            worker = b.start("worker", poll=poll)
            try:
                worker.wait_for("ready", 120)
                start_at = time.time() + 3.0  # every producer's interpreter is up by then
                drivers = [
                    b.start("enqueue", mode="single", n=p.producer_jobs, notify=notify, start_at=start_at)
                    for _ in range(p.producers)
                ]
                results = [d.finish(600) for d in drivers]
                worker.stop()
                worker.finish(120)
            except BaseException:
                worker.kill()
                raise
            rate = sum(r["rate"] for r in results)
            ctx.record("producers", f"producers_notify_{arm}", b.system.name, rep, rate, per_producer=results)
            ctx.say(f"  NOTIFY {arm}: {rate:,.0f} enqueues/s from {p.producers} producers")

    each_system(ctx, systems, "producers", f"8 {p.producers} producers x {p.producer_jobs:,} enqueues", body)


# ---------------------------------------------------------------- 9. idle workers, wake-ups

WAKE_JOBS = 50


def wakeups(ctx: Context, systems: list[System]) -> None:
    """Eight idle worker processes (by profile), 50 jobs enqueued 30 ms apart: the transactions the database
    ran per enqueue (every claim is one; a herd shows as many) and each job's wait."""

    def body(b: Bench, rep: int) -> None:
        workers = [b.start("worker", latency=True) for _ in range(ctx.profile.idle_workers)]
        try:
            for w in workers:
                w.wait_for("ready", 120)
            time.sleep(3.0)  # every worker settles into its idle wait
            before = _database_stats(b.dsn)
            producer = b.start("produce", rate=1 / 0.03, duration=WAKE_JOBS * 0.03, tick=0.03)
            produced = producer.finish(120)
            deadline = time.monotonic() + 30
            while sum(w.done for w in workers) < produced["enqueued"] and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            after = _database_stats(b.dsn)
            results = _stop_all(workers)
        except BaseException:
            _kill_all(workers)
            raise
        enqueued = int(produced["enqueued"])
        per_enqueue = (after["transactions"] - before["transactions"] - enqueued) / enqueued
        lats = [r["latency"] for r in results if r.get("latency") and r["latency"].get("count")]
        counted = sum(lat["count"] for lat in lats)
        p50 = sum(lat["p50_ms"] * lat["count"] for lat in lats) / counted if counted else None
        worst = max((lat["max_ms"] for lat in lats), default=None)
        ctx.record("wakeups", "wakeups_tx_per_enqueue", b.system.name, rep, per_enqueue, enqueued=enqueued)
        ctx.record("wakeups", "wakeups_p50", b.system.name, rep, p50)
        ctx.record("wakeups", "wakeups_max", b.system.name, rep, worst)
        ctx.say(
            f"  {per_enqueue:.1f} transactions per enqueue · wait p50 {p50 or float('nan'):.1f} ms"
            f" (count-weighted over workers) · max {worst or float('nan'):.1f} ms"
        )

    label = f"9 wake-ups: {ctx.profile.idle_workers} idle workers, {WAKE_JOBS} jobs"
    each_system(ctx, systems, "wakeups", label, body)


# ---------------------------------------------------------------- 10. held snapshot

SNAPSHOT_RATE = 5000.0


def snapshot(ctx: Context, systems: list[System]) -> None:
    """Steady load (5,000 jobs/s, or half the system's drain rate if lower) while another
    session holds a REPEATABLE READ snapshot the whole time, so no dead row can be removed:
    the share of the offered rate held, and the dead rows left behind."""
    import psycopg

    p = ctx.profile
    rates = {s.name: _drain_rate(ctx, s) for s in systems if s.runs("snapshot")}

    def body(b: Bench, rep: int) -> None:
        offered = min(SNAPSHOT_RATE, rates[b.system.name] * 0.5)
        worker = b.start("worker", latency=True)
        holder = psycopg.connect(b.dsn)
        try:
            holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            holder.execute("SELECT count(*) FROM pg_class")  # the snapshot is taken here
            produced, result, in_window = _produce_and_collect(
                b, worker, rate=offered, duration=p.snapshot_seconds, tick=0.01
            )
            dead = _database_stats(b.dsn)["dead_rows"]
        except BaseException:
            worker.kill()
            raise
        finally:
            holder.rollback()
            holder.close()
        held = in_window / produced["seconds"]
        lat = result["latency"] or {}
        detail = {"offered": offered, "in_window": in_window, "dead_rows": dead, "latency": lat}
        ctx.record("snapshot", "snapshot_held_pct", b.system.name, rep, 100 * held / offered, **detail)
        ctx.record("snapshot", "snapshot_p99", b.system.name, rep, lat.get("p99_ms"))
        ctx.record("snapshot", "snapshot_dead_rows", b.system.name, rep, dead)
        ctx.say(
            f"  offered {offered:,.0f}/s · held {held:,.0f}/s ({100 * held / offered:.0f}%) · "
            f"p99 {lat.get('p99_ms', float('nan')):.1f} ms · {dead:,} dead rows"
        )

    each_system(
        ctx,
        systems,
        "snapshot",
        f"10 held snapshot: steady load for {p.snapshot_seconds:.0f}s",
        body,
        reps=min(ctx.profile.reps, 2),
    )


# ---------------------------------------------------------------- 11. fairness

FAIR_SLEEP = 0.002  # each backlog job's length
FAIR_CONCURRENCY = 10
FAIR_JOBS = 20  # enqueued on the other queue, 50 ms apart, while the backlog runs
BACKLOG_QUEUE = "imports"
OTHER_QUEUE = "bench"  # the drivers' default queue


def fairness(ctx: Context, systems: list[System]) -> None:
    """One worker process serves two queues: one holds a backlog of 2 ms jobs (10,000 by profile),
    the other gets 20 jobs, 50 ms apart, while the backlog runs: how long those 20 wait. A worker
    that claims in queue order makes them wait for the backlog; a fair one, for one claim round."""
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        b.seed(p.fair_backlog, task="sleep", sleep=FAIR_SLEEP, warm=True, queue=BACKLOG_QUEUE)
        worker = b.start(
            "worker", queues=[BACKLOG_QUEUE, OTHER_QUEUE], concurrency=FAIR_CONCURRENCY, latency=True
        )
        try:
            worker.wait_for("ready", 120)
            deadline = time.monotonic() + 120
            while worker.done < min(200, p.fair_backlog // 10):  # the backlog is being worked
                if time.monotonic() > deadline or worker.proc.poll() is not None:
                    worker.wait_for("result", 5)
                    raise DriverError(f"{b.system.name}: the backlog did not start within 120s")
                time.sleep(0.02)
            producer = b.start("produce", queue=OTHER_QUEUE, rate=20, duration=FAIR_JOBS * 0.05, tick=0.05)
            produced = producer.finish(120)
            time.sleep(0.3)
            backlog_left = p.fair_backlog + produced["enqueued"] - _done_at(worker, produced["end"])
            expected = p.fair_backlog + produced["enqueued"]
            deadline = time.monotonic() + p.fair_backlog * FAIR_SLEEP * 10 + 120
            while worker.done < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.stop()
            result = worker.finish(120)
        except BaseException:
            worker.kill()
            raise
        lat = result["latency"] or {}
        if lat.get("count", 0) < produced["enqueued"]:
            ctx.notes.append(
                f"fairness {b.system.name} rep {rep + 1}: {lat.get('count', 0)} of"
                f" {produced['enqueued']} jobs on the other queue ran before the worker was stopped"
            )
        detail = {"latency": lat, "backlog_left_when_sent": round(backlog_left), "jobs": produced["enqueued"]}
        ctx.record("fairness", "fairness_p50", b.system.name, rep, lat.get("p50_ms"), **detail)
        ctx.record("fairness", "fairness_max", b.system.name, rep, lat.get("max_ms"), **detail)
        ctx.say(
            f"  other queue's jobs waited p50 {lat.get('p50_ms', float('nan')):.1f} ms ·"
            f" max {lat.get('max_ms', float('nan')):.1f} ms ({lat.get('count', 0)} jobs;"
            f" backlog still queued when the last was sent: {backlog_left:,.0f})"
        )

    label = (
        f"11 fairness: {p.fair_backlog:,} x {FAIR_SLEEP * 1000:.0f} ms jobs in one queue,"
        f" {FAIR_JOBS} jobs in another, concurrency {FAIR_CONCURRENCY}"
    )
    each_system(ctx, systems, "fairness", label, body)


# ---------------------------------------------------------------- 12. delayed backlog

DELAY_SECONDS = 3600.0
DELAYED_BUDGET = 60.0  # seconds of draining; a system this slow is measured over what it ran


def delayed(ctx: Context, systems: list[System]) -> None:
    """100,000 jobs (by profile) delayed an hour at the priority that runs first, then the drain's
    20,000 ready jobs at the default priority: the drain rate, against the plain drain's in the
    same run. A claim that walks the delayed jobs to reach the ready ones shows here."""
    p = ctx.profile

    def body(b: Bench, rep: int) -> None:
        b.seed(p.delayed_jobs, delay=DELAY_SECONDS, priority="high", warm=True)
        not_due = b.remaining()  # what the driver queued (a driver may add a warm-up job)
        b.seed(p.drain)
        r = b.drain(1, b.remaining() - not_due, not_due=not_due, budget=DELAYED_BUDGET)
        ctx.record("delayed", "delayed_drain", b.system.name, rep, r["rate"], **r)
        plain = ctx.median("drain_1p", b.system.name)
        share = f" = {100 * r['rate'] / plain:.0f} % of the plain drain" if plain else ""
        if plain:
            ctx.record("delayed", "delayed_vs_drain_pct", b.system.name, rep, 100 * r["rate"] / plain)
        if r["partial"]:
            lost = f" · stopped after {DELAYED_BUDGET:.0f}s with {r['jobs']:,} run"
        else:
            lost = f" · {r['remaining']} LEFT UNFINISHED" if r["remaining"] else ""
        ctx.say(f"  {r['rate']:,.0f} jobs/s{share}{lost}")

    label = f"12 delayed backlog: {p.delayed_jobs:,} delayed at high priority, drain {p.drain:,}"
    each_system(ctx, systems, "delayed", label, body)
