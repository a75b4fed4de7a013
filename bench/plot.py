"""Render a run's JSON as a PNG: one panel per measure, a bar per system (median, min-max whisker).

Runs with bench/.venvs/plot's Python (matplotlib lives there, not in pgqueue's venv):
    bench/.venvs/plot/bin/python bench/plot.py RESULT.json OUT.png
Standard library + matplotlib only.
"""

from __future__ import annotations

import json
import sys

PANELS = [
    ("enqueue_single", "enqueue single (jobs/s ↑)"),
    ("enqueue_bulk", "enqueue bulk (jobs/s ↑)"),
    ("drain_1p", "drain, 1 process (jobs/s ↑)"),
    ("drain_2p", "drain, 2 processes (jobs/s ↑)"),
    ("latency_p50", "latency p50, idle (ms ↓)"),
    ("latency_p99", "latency p99, idle (ms ↓)"),
    ("steady90_held", "steady 90 %: held (jobs/s ↑)"),
    ("steady90_p99", "steady 90 %: p99 (ms ↓)"),
    ("app_notify_on", "app tx/s, NOTIFY on (↑)"),
    ("app_notify_off", "app tx/s, NOTIFY off (↑)"),
    ("app_no_queue", "app tx/s, no job at all (↑)"),
    ("bloat_fresh", "bloat: drain fresh (jobs/s ↑)"),
    ("bloat_after", "bloat: drain after volume (jobs/s ↑)"),
    ("io_pct_ideal", "I/O-bound, % of ideal (↑)"),
]
COLORS = {
    "pgqueue": "#2b6cb0",
    "pgqueuer": "#dd6b20",
    "procrastinate": "#38a169",
    "chancy": "#805ad5",
    "bare-sql": "#a0aec0",
}


def main(source: str, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(source) as f:
        data = json.load(f)
    summary = data["summary"]
    systems = data["meta"]["systems"]
    panels = [(m, t) for m, t in PANELS if m in summary]
    cols = 4
    rows = max(1, (len(panels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (metric, title) in zip(axes.flat, panels, strict=False):
        ax.set_visible(True)
        names = [s for s in systems if s in summary[metric]]
        med = [summary[metric][s]["median"] for s in names]
        lo = [summary[metric][s]["median"] - summary[metric][s]["min"] for s in names]
        hi = [summary[metric][s]["max"] - summary[metric][s]["median"] for s in names]
        bars = ax.bar(names, med, yerr=[lo, hi], capsize=3, color=[COLORS.get(s, "#a0aec0") for s in names])
        for bar, value in zip(bars, med, strict=True):
            label = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    meta = data["meta"]
    fig.suptitle(
        f"pgqueue vs peers — {meta['profile']} profile, {meta['reps']} reps, median with min-max; "
        f"PostgreSQL {meta['postgres'].get('server_version')}, {meta['machine'].get('nproc')} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
