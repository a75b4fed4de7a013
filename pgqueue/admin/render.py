"""Turn the admin's models into HTML: the Jinja2 environment, its filters, the sparkline.

Autoescaping is on for every template: job arguments, error messages and tracebacks are
untrusted text, and one ``<script>`` in a job argument must not run in the operator's browser.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"


def ago(seconds: float | None) -> str:
    """``42 s``, ``3 min``, ``2 h 5 min``, ``3 d`` — coarse, as an operator reads an age."""
    if seconds is None or not math.isfinite(seconds):  # an 'infinity' timestamp written by hand
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return ago(seconds)


def when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def input_time(value: datetime | None) -> str:
    """The value of a datetime-local input, in UTC as the form says."""
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class Sparkline:
    """An inline SVG polyline: no script, no image request, passes a strict CSP."""

    points: str
    width: int
    height: int
    peak: int
    last: int


def sparkline(values: list[int], width: int = 120, height: int = 28) -> Sparkline:
    peak = max(values, default=0)
    n = len(values)
    step = width / max(n - 1, 1)
    pad = 2
    coords = []
    for i, v in enumerate(values):
        y = height - pad - (v / peak * (height - 2 * pad) if peak else 0)
        coords.append(f"{i * step:.1f},{y:.1f}")
    return Sparkline(" ".join(coords), width, height, peak, values[-1] if values else 0)


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, duration=duration, when=when, pretty=pretty, input_time=input_time)
    env.globals["sparkline"] = sparkline
    return env
