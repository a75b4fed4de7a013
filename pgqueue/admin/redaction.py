"""Keep secrets in job arguments off the operator's screen.

Job arguments often carry tokens, passwords or personal data. Every view the admin serves
(API, dashboard, schedules) passes them through one hook, ``redact(args) -> args``, so a team
sets its policy once. The default masks values under keys that look secret, at any depth.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
"""The redaction hook: gets a copy-safe dict, returns what may be shown."""

MASK = "[redacted]"
SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[_-]?key|(^|[_-])auth($|[_-])|authori[sz]ation|"
    r"credential|private[_-]?key|session|cookie|signature|card[_-]?number|^cvv$|^ssn$",
    re.IGNORECASE,
)


def _mask(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and pattern.search(k) else _mask(v, pattern)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask(v, pattern) for v in value]
    return value


def mask_keys(pattern: str | re.Pattern[str] = SECRET_KEY) -> Redactor:
    """A redactor that masks values under keys matching ``pattern`` (case-insensitive)."""
    compiled = re.compile(pattern, re.IGNORECASE) if isinstance(pattern, str) else pattern

    def redact(args: dict[str, Any]) -> dict[str, Any]:
        masked: dict[str, Any] = _mask(args, compiled)
        return masked

    return redact


default_redact: Redactor = mask_keys()
"""The default hook: masks password/secret/token/api_key/auth/... values at any depth."""


def no_redaction(args: dict[str, Any]) -> dict[str, Any]:
    """Show arguments as stored (for local development only)."""
    return args


def redact_value(redact: Redactor, value: Any) -> Any:
    """Apply the hook to any JSON value: results and progress need not be objects.

    A non-object is wrapped as ``{"value": ...}`` for the hook and unwrapped after, so a hook
    written for argument dicts also covers a list or a string a handler returned.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return redact(dict(value))
    return redact({"value": value}).get("value", MASK)
