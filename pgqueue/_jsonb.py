"""JSON text as PostgreSQL's jsonb takes it: one encoder for everything pgqueue stores (job
arguments, results, progress), and the two things JSON allows that jsonb refuses."""

from __future__ import annotations

import json
import re
from typing import Any

_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
# An escaped NUL (\u0000) that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode(value: Any) -> str:
    """Compact JSON; raises what ``json`` raises (TypeError, ValueError, RecursionError)."""
    return _ENCODER.encode(value)


def lone_surrogate(text: str) -> UnicodeEncodeError | None:
    """Why ``text`` is not valid Unicode (a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc
    return None


def holds_nul(text: str) -> bool:
    """Whether the JSON ``text`` holds a NUL character, which jsonb cannot store."""
    return "\\u0000" in text and _NUL_ESCAPE.search(text) is not None
