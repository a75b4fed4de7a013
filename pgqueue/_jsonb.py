"""JSON text as PostgreSQL's jsonb takes it: one encoder for everything pgqueue stores (job
arguments, results, progress), and the two things JSON allows that jsonb refuses."""

from __future__ import annotations

import json
import json.encoder
import re
import threading
from collections.abc import Callable
from typing import Any

_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
# An escaped NUL (\u0000) that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_C_ENCODER: Callable[..., Callable[[Any, int], Any]] | None = getattr(json.encoder, "c_make_encoder", None)
_local = threading.local()


def _make_encoder() -> Callable[[Any, int], Any]:
    """The C encoder ``_ENCODER.encode`` builds on every call, built once: half the cost of
    encoding a small job's arguments was building it. Its circular-reference markers are its
    own, so each thread keeps one (see ``encode``)."""
    assert _C_ENCODER is not None
    e = _ENCODER
    return _C_ENCODER(
        {}, e.default, json.encoder.encode_basestring, None, e.key_separator, e.item_separator,
        e.sort_keys, e.skipkeys, e.allow_nan,
    )  # fmt: skip


def encode(value: Any) -> str:
    """Compact JSON; raises what ``json`` raises (TypeError, ValueError, RecursionError)."""
    if _C_ENCODER is None:  # a Python without the json accelerator
        return _ENCODER.encode(value)
    encoder = getattr(_local, "encoder", None)
    if encoder is None:
        encoder = _local.encoder = _make_encoder()
    try:
        return "".join(encoder(value, 0))
    except BaseException:
        _local.encoder = None  # a failed encoding can leave markers behind: start afresh
        raise


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
