"""The benchmark harness runs end to end (``python -m bench --smoke``): pgqueue and the bare-SQL
yardstick (both in pgqueue's venv), tiny sizes.

It checks that the harness works and that every scenario produced a figure, never how fast
anything was: timings are not asserted in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PGQUEUE_SCENARIOS = {
    "enqueue": {"enqueue_single", "enqueue_bulk"},
    "drain": {"drain_1p", "drain_2p"},
    "latency": {"latency_p50", "latency_p95", "latency_p99"},
    "steady": {"steady50_held", "steady90_held", "steady50_p99", "steady90_p99", "steady50_enqueue_call_p50"},
    "app": {"app_notify_on", "app_notify_off"},
    "bloat": {"bloat_fresh", "bloat_after"},
    "io": {"io_rate"},
    "producers": {"producers_notify_on", "producers_notify_off", "producers_notify_off_busy"},
    "wakeups": {"wakeups_tx_per_enqueue", "wakeups_p50"},
    "snapshot": {"snapshot_held_pct", "snapshot_dead_rows"},
    "fairness": {"fairness_p50", "fairness_max"},
    "delayed": {"delayed_drain", "delayed_vs_drain_pct"},
}


@pytest.mark.slow
def test_smoke_run_covers_every_scenario(postgres_dsn: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--dsn", postgres_dsn, "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = list(tmp_path.glob("smoke-*.json"))
    assert len(results) == 1, f"expected one JSON result in {sorted(p.name for p in tmp_path.iterdir())}"
    data = json.loads(results[0].read_text())

    assert data["meta"]["systems"] == ["pgqueue", "bare-sql"]
    assert data["notes"] == [], data["notes"]
    summary = data["summary"]
    for scenario, metrics in PGQUEUE_SCENARIOS.items():
        for metric in metrics:
            assert "pgqueue" in summary.get(metric, {}), f"{scenario}: no pgqueue figure for {metric}"
    # The yardstick runs on pgqueue's own tables, so a schema change that breaks it shows here.
    for metric in ("enqueue_bulk", "drain_1p", "app_no_queue"):
        assert "bare-sql" in summary.get(metric, {}), f"no bare-sql figure for {metric}"
    # Every drained job was accounted for: the database had none left unfinished.
    drains = [
        s for s in data["samples"] if s["metric"] in ("drain_1p", "drain_2p", "io_rate", "delayed_drain")
    ]
    assert drains and all(s["detail"]["remaining"] == 0 for s in drains)
    # The fairness scenario's jobs all ran, with the backlog still queued when they were sent.
    fair = [s for s in data["samples"] if s["metric"] == "fairness_max"]
    assert fair and all(s["detail"]["latency"]["count"] == s["detail"]["jobs"] for s in fair)
    assert (tmp_path / results[0].with_suffix(".md").name).exists()
