"""JSON text as PostgreSQL's jsonb takes it: one encoder for everything pgqueue stores (job
arguments, results, progress), and the two things JSON allows that jsonb refuses."""

from __future__ import annotations

import json
import json.encoder
import re
import threading
from collections.abc import Callable
from typing import Any

_DECODER = json.JSONDecoder()
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
# An escaped NUL (\u0000) that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_C_ENCODER: Callable[..., Callable[[Any, int], Any]] | None = getattr(json.encoder, "c_make_encoder", None)
_local = threading.local()
# The largest JSON value pgqueue stores (job args, a result, progress). jsonb holds 256 MB, but
# far less already hurts: a 300 MB result held a worker's batched acknowledgements for minutes
# (the server parsed it ~30 s a try), and a claim of 400 jobs of big args is that many times
# their size in the worker's memory. Large data belongs in a table or object store, its key here.
MAX_VALUE_BYTES = 16 << 20


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


def oversize(text: str) -> str | None:
    """Why ``text`` is too large to store (its size against the limit), or None."""
    if len(text) <= MAX_VALUE_BYTES // 4:  # at most 4 bytes a character: the usual value costs no scan
        return None
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size <= MAX_VALUE_BYTES:
        return None
    limit = MAX_VALUE_BYTES >> 20
    return f"{size / (1 << 20):.1f} MB as JSON, more than the {limit} MB a stored value may take"


def decode_stored(data: bytes | str) -> Any:
    """A jsonb value as the server sends it, decoded as ``json.loads`` would, three times faster.

    ``json.loads`` of bytes first guesses their encoding and skips whitespace around the value
    with two regular expressions: two thirds of the 2.1 µs a small job's arguments took, for
    text the server always sends as UTF-8 without surrounding whitespace. Anything else (never
    from the server) goes to ``json.loads``, which decodes it or says why not.
    """
    text = data if isinstance(data, str) else data.decode("utf-8", "surrogatepass")
    try:
        value, end = _DECODER.raw_decode(text)
    except ValueError:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)
