"""Turn whatever a handler returns, raises or reports into values PostgreSQL accepts.

jsonb refuses NUL characters and lone surrogates, Python's ``json`` refuses sets and NaN, and
``str(exc)`` can itself raise. None of that may reach a batched write, where one bad value
would fail the statement for every job in it: results and progress are checked here (and
refused with a named error), error texts are escaped here (they must always be recorded).
"""

from __future__ import annotations

import json
import traceback
from datetime import UTC, datetime
from typing import Any

from pgqueue import _jsonb as jsonb
from pgqueue.errors import UnstorableResult

# An error message or traceback longer than this is cut: a handler raising a 100 MB message
# must not bloat its row or the batch it is written in.
MAX_MESSAGE_CHARS = 10_000
MAX_TRACEBACK_CHARS = 50_000


def to_jsonb(value: Any) -> str:
    """``value`` as JSON text jsonb accepts; ``ValueError`` naming the reason otherwise."""
    try:
        text = jsonb.encode(value)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"it is not JSON: {exc}") from None
    too_large = jsonb.oversize(text)
    if too_large is not None:
        raise ValueError(f"it is {too_large} (keep large output elsewhere and return its key)")
    if jsonb.lone_surrogate(text) is not None:
        raise ValueError("it holds a lone surrogate, which is not valid Unicode")
    if jsonb.holds_nul(text):
        raise ValueError("it holds a NUL character (\\x00), which PostgreSQL cannot store")
    return text


def dump_result(value: Any) -> str | None:
    """The result as stored JSON (None stays NULL); :class:`UnstorableResult` if it cannot be."""
    if value is None:
        return None
    try:
        return to_jsonb(value)
    except ValueError as exc:
        raise UnstorableResult(
            f"the handler returned a {type(value).__name__} that cannot be stored: {exc}"
        ) from None


def storable_text(text: str, limit: int) -> str:
    """``text`` with NUL and lone surrogates escaped (shown as ``\\x00``, ``\\ud800``), cut to ``limit``."""
    if len(text) > limit:
        text = text[:limit] + f"… [{len(text) - limit} more characters]"
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def describe(exc: BaseException) -> tuple[str, str]:
    """(type name, message) of an exception, even one whose ``__str__`` raises."""
    name = type(exc).__name__
    try:
        message = str(exc)
    except BaseException as inner:  # an exception type's own __str__ can raise anything
        message = f"<unprintable {name}: str() raised {type(inner).__name__}>"
    if not isinstance(message, str):  # a __str__ returning a non-str makes str() raise, but be sure
        message = f"<unprintable {name}>"
    return storable_text(str(name), 200), storable_text(message, MAX_MESSAGE_CHARS)


def format_traceback(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    try:
        text = "".join(traceback.format_exception(exc))
    except BaseException as inner:  # formatting calls str() on every exception in the chain
        text = f"<traceback unavailable: {type(inner).__name__}>"
    return storable_text(text, MAX_TRACEBACK_CHARS)


def error_entry(attempt: int, error_type: str, message: str, traceback_text: str | None) -> str:
    """One entry of a job's ``errors`` list; every string in it is already storable."""
    return json.dumps(
        {
            "attempt": attempt,
            "at": datetime.now(UTC).isoformat(),
            "type": storable_text(error_type, 200),
            "message": storable_text(message, MAX_MESSAGE_CHARS),
            "traceback": None
            if traceback_text is None
            else storable_text(traceback_text, MAX_TRACEBACK_CHARS),
        }
    )


def exception_entry(attempt: int, exc: BaseException) -> str:
    name, message = describe(exc)
    return error_entry(attempt, name, message, format_traceback(exc))
