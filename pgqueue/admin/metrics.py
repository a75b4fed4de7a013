"""``/metrics`` in Prometheus' text format, read from the tables at scrape time.

Gauges (jobs by queue and state, oldest waiting age, paused, live workers, their abandoned
threads) are plain counts.
Counters and the run-time histogram need monotonic totals the tables do not keep (finished rows
are pruned), so the collector adds up deltas: each scrape counts the rows that finished between
the previous scrape's database time and now (less a short lag for transactions still committing).
Totals therefore start at zero when the admin starts, like any process counter — ``rate()`` and
``increase()`` handle that. Scrape one admin replica per database, or they count the same jobs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import psycopg
from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pgqueue._queue import Queue
from pgqueue._rows import QueueOverview
from pgqueue.admin.context import AdminContext
from pgqueue.admin.readmodel import ReadModel
from pgqueue.errors import PgQueueError

log = logging.getLogger("pgqueue.admin.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
GAUGE_STATES = ("queued", "delayed", "retrying", "running", "completed", "cancelled", "dead")


class QueueCollector(Collector):
    """A prometheus-client collector over one pgqueue schema."""

    def __init__(
        self,
        queue: Queue,
        *,
        lag_seconds: float = 5.0,
        stale_seconds: float = 60.0,
        db_timeout: float = 5.0,
    ) -> None:
        self.queue = queue
        self.reads = ReadModel(queue.queries)
        self.lag_seconds = lag_seconds
        self.stale_seconds = stale_seconds
        self.db_timeout = db_timeout
        self._lock = threading.Lock()
        self._since: datetime | None = None
        self._processed: Counter[tuple[str, str]] = Counter()
        self._failed: Counter[str] = Counter()
        self._buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * (len(RUN_BUCKETS) + 1))
        self._run_sum: defaultdict[str, float] = defaultdict(float)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                with self.queue.connection(wait=self.db_timeout) as conn:
                    rows, live = self._read(conn)
                    abandoned = self._abandoned(conn)
            except (psycopg.Error, OSError, PgQueueError) as exc:
                log.warning("metrics scrape could not read the database: %s", exc)
                yield _gauge("pgqueue_up", "1 when the database answered this scrape", 0)
                return
            yield _gauge("pgqueue_up", "1 when the database answered this scrape", 1)
            yield from self._families(rows, live)
            if abandoned is not None:
                yield _gauge(
                    "pgqueue_worker_abandoned_threads",
                    "Threads live workers still spend on sync handlers abandoned past their timeout",
                    abandoned,
                )

    def _abandoned(self, conn: psycopg.Connection[Any]) -> int | None:
        """Summed over live workers; None on a schema from before the column (migration 0003),
        so a scrape of an older schema still reports everything else. Read last, so a failure
        here cannot spoil the statements before it."""
        try:
            return self.reads.abandoned_threads(conn, self.stale_seconds)
        except psycopg.errors.UndefinedColumn:
            return None

    def _read(self, conn: psycopg.Connection[Any]) -> tuple[list[QueueOverview], int]:
        rows = self.reads.queues(conn)
        until = self.reads.clock(conn, self.lag_seconds)
        if self._since is not None and until > self._since:
            self._add_deltas(conn, [r.queue for r in rows], self._since, until)
        if self._since is None or until > self._since:
            self._since = until
        return rows, self.reads.live_workers(conn, self.stale_seconds)

    def _add_deltas(
        self, conn: psycopg.Connection[Any], names: list[str], since: datetime, until: datetime
    ) -> None:
        for f in self.reads.finished_between(conn, names, since, until, RUN_BUCKETS):
            self._processed[(f.name, f.outcome)] += f.count
            if f.outcome == "completed":
                self._buckets[f.name][f.bucket] += f.count
                self._run_sum[f.name] += f.seconds or 0.0
        for d in self.reads.dead_between(conn, since, until):
            self._processed[(d.queue, "dead")] += d.count
        for queue, count in self.reads.failures(conn, window=0, since=since, until=until).items():
            self._failed[queue] += count

    def _families(self, rows: list[QueueOverview], live: int) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "pgqueue_jobs",
            "Jobs by queue and state ('retrying' overlaps queued/delayed; 'dead' is the dead-letter table)",
            labels=["queue", "state"],
        )
        paused = GaugeMetricFamily("pgqueue_queue_paused", "1 when the queue is paused", labels=["queue"])
        oldest = GaugeMetricFamily(
            "pgqueue_oldest_waiting_job_age_seconds",
            "Age of the longest-waiting due job (0 when none)",
            labels=["queue"],
        )
        for r in rows:
            for state in GAUGE_STATES:
                jobs.add_metric([r.queue, state], float(getattr(r, state)))
            paused.add_metric([r.queue], 1.0 if r.paused else 0.0)
            oldest.add_metric([r.queue], float(r.oldest_waiting or 0.0))
        yield from (jobs, paused, oldest)
        yield _gauge("pgqueue_workers_alive", "Workers with a recent heartbeat", live)
        names = sorted({r.queue for r in rows} | {n for n, _ in self._processed} | set(self._failed))
        processed = CounterMetricFamily(
            "pgqueue_jobs_processed",
            "Jobs finished since the admin started, by outcome",
            labels=["queue", "outcome"],
        )
        failed = CounterMetricFamily(
            "pgqueue_jobs_failed",
            "Failed attempts (errors recorded) since the admin started",
            labels=["queue"],
        )
        runs = HistogramMetricFamily(
            "pgqueue_job_run_seconds", "Run time of completed jobs (last attempt)", labels=["queue"]
        )
        for name in names:
            for outcome in ("completed", "cancelled", "dead"):
                processed.add_metric([name, outcome], float(self._processed[(name, outcome)]))
            failed.add_metric([name], float(self._failed[name]))
            counts = self._buckets[name]
            cumulative, buckets = 0, []
            for i, bound in enumerate(RUN_BUCKETS):
                cumulative += counts[i]  # width_bucket index i: bounds[i-1] <= t < bounds[i]
                buckets.append((_le(bound), float(cumulative)))
            buckets.append(("+Inf", float(sum(counts))))
            runs.add_metric([name], buckets, sum_value=self._run_sum[name])
        yield from (processed, failed, runs)


def _le(bound: float) -> str:
    return repr(bound)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def build(ctx: AdminContext) -> APIRouter:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        QueueCollector(
            ctx.queue,
            lag_seconds=ctx.options.metrics_lag_seconds,
            stale_seconds=ctx.options.worker_stale_seconds,
            db_timeout=ctx.options.db_timeout,
        )
    )
    router = APIRouter(tags=["metrics"], route_class=ctx.route_class)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format.",
            }
        },
        dependencies=[] if ctx.options.public_metrics else [ctx.read],
    )
    def metrics() -> Response:
        """Prometheus metrics for every queue (scrape with the bearer token)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    return router
