"""Medians and spreads, the Markdown table, the targets check, and the JSON written per run."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from bench.scenarios import Sample
from bench.systems import ALL

REFERENCES = {name for name, system in ALL.items() if system.reference}

# metric -> (label, unit, higher is better); the table's rows, in order.
METRICS: dict[str, tuple[str, str, bool]] = {
    "enqueue_single": ("1 enqueue, single (one connection)", "jobs/s", True),
    "enqueue_bulk": ("1 enqueue, bulk (batches of 1,000)", "jobs/s", True),
    "drain_1p": ("2 drain, 1 worker process", "jobs/s", True),
    "drain_2p": ("2 drain, 2 worker processes", "jobs/s", True),
    "latency_p50": ("3 latency idle worker, p50", "ms", False),
    "latency_p95": ("3 latency idle worker, p95", "ms", False),
    "latency_p99": ("3 latency idle worker, p99", "ms", False),
    "steady50_held": ("4 steady 50 %: throughput held", "jobs/s", True),
    "steady50_held_pct": ("4 steady 50 %: held / offered", "%", True),
    "steady50_p50": ("4 steady 50 %: latency p50", "ms", False),
    "steady50_p99": ("4 steady 50 %: latency p99", "ms", False),
    "steady90_held": ("4 steady 90 %: throughput held", "jobs/s", True),
    "steady90_held_pct": ("4 steady 90 %: held / offered", "%", True),
    "steady90_p50": ("4 steady 90 %: latency p50", "ms", False),
    "steady90_p99": ("4 steady 90 %: latency p99", "ms", False),
    "app_notify_on": ("5 app tx/s, 8 conns, NOTIFY on", "tx/s", True),
    "app_notify_off": ("5 app tx/s, 8 conns, NOTIFY off", "tx/s", True),
    "app_no_queue": ("5 app tx/s, 8 conns, no job at all", "tx/s", True),
    "bloat_fresh": ("6 bloat: drain, fresh", "jobs/s", True),
    "bloat_after": ("6 bloat: drain, after the volume", "jobs/s", True),
    "bloat_after_pct": ("6 bloat: after / fresh", "%", True),
    "io_rate": ("7 I/O 20 ms x concurrency 100", "jobs/s", True),
    "io_pct_ideal": ("7 I/O: share of ideal 5,000/s", "%", True),
}
# Ratios pgqueue / best peer make sense for these (same work, same units).
RATIO_METRICS = {
    "enqueue_single",
    "enqueue_bulk",
    "drain_1p",
    "drain_2p",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "steady50_p50",
    "steady50_p99",
    "steady90_held",
    "steady90_p50",
    "steady90_p99",
    "app_notify_on",
    "app_notify_off",
    "io_rate",
}


def summarise(samples: list[Sample]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for s in samples:
        if s.value is None or s.metric not in METRICS:
            continue
        out.setdefault(s.metric, {}).setdefault(s.system, {"values": []})["values"].append(s.value)  # type: ignore[dict-item]
    for systems in out.values():
        for stats in systems.values():
            values = stats["values"]  # type: ignore[assignment]
            stats.update(median=statistics.median(values), min=min(values), max=max(values), n=len(values))
    return out


def _fmt(value: float, unit: str) -> str:
    if unit in ("ms",):
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "%":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def best_peer(summary: dict[str, Any], metric: str, peers: list[str]) -> tuple[str, float] | None:
    higher = METRICS[metric][2]
    found = [(p, summary[metric][p]["median"]) for p in peers if p in summary.get(metric, {})]
    if not found:
        return None
    return max(found, key=lambda x: x[1]) if higher else min(found, key=lambda x: x[1])


def ratio(summary: dict[str, Any], metric: str, peers: list[str]) -> str:
    """pgqueue / best peer, as the "x better" factor (for latency: best peer's ms / pgqueue's ms)."""
    if metric not in RATIO_METRICS or "pgqueue" not in summary.get(metric, {}):
        return ""
    best = best_peer(summary, metric, peers)
    if best is None:
        return ""
    mine = summary[metric]["pgqueue"]["median"]
    if mine <= 0 or best[1] <= 0:
        return ""
    factor = mine / best[1] if METRICS[metric][2] else best[1] / mine
    return f"{factor:.2f}x vs {best[0]}"


def peers_of(systems: list[str]) -> list[str]:
    return [s for s in systems if s != "pgqueue" and s not in REFERENCES]


def versus_bare(summary: dict[str, Any], metric: str) -> str:
    """pgqueue's share of the framework-free figure (enqueue and drain rows)."""
    stats = summary.get(metric, {})
    if "pgqueue" not in stats or "bare-sql" not in stats or not stats["bare-sql"]["median"]:
        return ""
    return f"{100 * stats['pgqueue']['median'] / stats['bare-sql']['median']:.0f} %"


def markdown_table(summary: dict[str, Any], systems: list[str]) -> str:
    peers = peers_of(systems)
    columns = list(systems)
    with_bare = "bare-sql" in systems
    head = "| scenario | unit | " + " | ".join(columns) + " | pgqueue vs best peer |"
    head += " pgqueue / bare-sql |" if with_bare else ""
    rule = "|---|---|" + "---|" * len(columns) + "---|" + ("---|" if with_bare else "")
    lines = [head, rule]
    for metric, (label, unit, higher) in METRICS.items():
        if metric not in summary:
            continue
        cells = []
        for system in columns:
            stats = summary[metric].get(system)
            if stats is None:
                cells.append("-")
                continue
            cell = _fmt(stats["median"], unit)
            if stats["n"] > 1:
                cell += f" <sub>{_fmt(stats['min'], unit)}-{_fmt(stats['max'], unit)}</sub>"
            cells.append(cell)
        arrow = "↑" if higher else "↓"
        line = f"| {label} | {unit} {arrow} | " + " | ".join(cells) + f" | {ratio(summary, metric, peers)} |"
        if with_bare:
            line += f" {versus_bare(summary, metric)} |"
        lines.append(line)
    return "\n".join(lines)


TARGETS: list[tuple[str, str, Any]] = [
    ("drain, one process ≥ 20,000 jobs/s", "drain_1p", lambda v, s, p: v >= 20_000),
    ("drain, one process ≥ 3x fastest peer", "drain_1p", "ratio3"),
    ("bulk enqueue ≥ 100,000 jobs/s", "enqueue_bulk", lambda v, s, p: v >= 100_000),
    ("latency p50 ≤ 3 ms", "latency_p50", lambda v, s, p: v <= 3),
    ("latency p99 ≤ 15 ms", "latency_p99", lambda v, s, p: v <= 15),
    ("I/O-bound ≥ 90 % of 5,000/s", "io_pct_ideal", lambda v, s, p: v >= 90),
    ("after bloat, drain within 20 % of fresh", "bloat_after_pct", lambda v, s, p: v >= 80),
]


def targets(summary: dict[str, Any], systems: list[str]) -> list[dict[str, Any]]:
    """The issue's targets against pgqueue's medians."""
    peers = peers_of(systems)
    out = []
    for label, metric, check in TARGETS:
        stats = summary.get(metric, {}).get("pgqueue")
        if stats is None:
            continue
        value = stats["median"]
        if check == "ratio3":
            best = best_peer(summary, metric, peers)
            if best is None:
                continue
            factor = value / best[1]
            out.append(
                {
                    "target": label,
                    "value": f"{factor:.2f}x ({value:,.0f} vs {best[0]} {best[1]:,.0f})",
                    "met": factor >= 3,
                }
            )
        else:
            unit = METRICS[metric][1]
            out.append(
                {
                    "target": label,
                    "value": f"{_fmt(value, unit)} {unit}",
                    "met": bool(check(value, summary, peers)),
                }
            )
    return out


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["| target | pgqueue (median) | met |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['value']} | {'yes' if r['met'] else '**no**'} |" for r in rows]
    return "\n".join(lines)


def samples_json(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]
