"""Keep secrets in job data off the operator's screen.

Job arguments, results and progress often carry tokens, passwords or personal data, and error
messages and tracebacks repeat them (a failed connection prints its DSN, an HTTP client its
headers). Every view the admin serves — API, dashboard, schedules, error history, unique keys —
passes them through one hook, ``redact(data) -> data``, so a team sets its policy once.

The default hook works two ways, because secrets hide in both shapes:

- **by key**: a value under a key that names a secret (``password``, ``apiKey``,
  ``aws_secret_access_key``, ``X-Auth-Token``, ``pin``…) is replaced whole, at any depth, in
  dicts, in ``[name, value]`` pairs (header lists) and in ``{"name": …, "value": …}`` entries;
- **by pattern**: inside every string, the password of a URL/DSN, ``Bearer``/``Basic``
  credentials, ``key=value`` / ``key: value`` pairs whose key names a secret, and JWTs are
  masked — the rest of the string stays readable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
"""The redaction hook: gets a copy-safe dict, returns what may be shown."""

MASK = "[redacted]"
"""What replaces a whole value found under a secret key."""
TEXT_MASK = "***"
"""What replaces a secret found inside a string, so the string keeps its shape."""

SECRET_FRAGMENTS: tuple[str, ...] = (
    "password",
    "passwd",
    "passphrase",
    "passcode",
    "pwd",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "sshkey",
    "signingkey",
    "encryptionkey",
    "credential",
    "authorization",
    "cookie",
    "session",
    "signature",
    "jwt",
    "creditcard",
    "cardnumber",
    "pincode",
)
"""Matched anywhere in a key once it is lower-cased and stripped of separators, so
``aws_secret_access_key``, ``AWSAccessKeyId``, ``x-api-key`` and ``dbPassword`` all count."""

SECRET_WORDS: frozenset[str] = frozenset(
    {"auth", "pass", "pin", "otp", "totp", "hotp", "ssn", "cvv", "cvc", "sig", "mfa"}
)
"""Matched only as a whole word of a key (``user_pin``, ``otpCode``): as substrings these
would also hit ``shipping``, ``footprint`` or ``author``."""

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def is_secret_key(key: str) -> bool:
    """Whether a key (a dict key, a header name, a query parameter) names a secret."""
    words = [w.lower() for w in _WORDS.findall(key)]
    joined = "".join(words)
    return any(f in joined for f in SECRET_FRAGMENTS) or not SECRET_WORDS.isdisjoint(words)


# ------------------------------------------------------------------------------ patterns

_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*:)([^\s@]+)(@)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/=-]+)")
_BASIC = re.compile(r"\b(Basic\s+)([A-Za-z0-9+/]{6,}={0,2})(?![A-Za-z0-9+/=])")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_KEY_SEP = re.compile(r"""(?P<key>[A-Za-z_][\w.-]*)(?P<sep>["']?\s*[=:]\s*)""")
_VALUE = re.compile(r"""("[^"]*"|'[^']*')|[^\s&,;"'<>)\]}]+""")


def _mask_pairs(text: str) -> str:
    """``key=value`` / ``key: value`` / ``"key": "value"`` with a secret key: mask the value.

    Keys are found first and values read after them, so ``a:password=x`` still finds
    ``password`` (a single pattern would have eaten it as the value of ``a``).
    """
    out: list[str] = []
    pos = 0
    for key in _KEY_SEP.finditer(text):
        if key.start() < pos or not is_secret_key(key["key"]):
            continue
        value = _VALUE.match(text, key.end())
        if value is None:
            continue
        quote = value[0][0] if value[1] else ""
        out += [text[pos : key.end()], quote, TEXT_MASK, quote]
        pos = value.end()
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def redact_text(text: str) -> str:
    """Mask the secrets a string carries inline, keeping the rest readable.

    ``postgresql://app:s3cret@db/app`` → ``postgresql://app:***@db/app``; ``Bearer abc`` →
    ``Bearer ***``; ``?token=abc&x=1`` → ``?token=***&x=1``; ``password: "x"`` →
    ``password: "***"``; a JWT → ``***``.
    """
    if len(text) < 4:
        return text
    text = _URL_PASSWORD.sub(rf"\1{TEXT_MASK}\3", text)
    text = _BEARER.sub(rf"\1{TEXT_MASK}", text)
    text = _BASIC.sub(rf"\1{TEXT_MASK}", text)
    text = _JWT.sub(TEXT_MASK, text)
    return _mask_pairs(text)


# ------------------------------------------------------------------------------ the walk

_LABELS = ("name", "key", "header")
_VALUES = ("value", "val")


def _walk(value: Any, secret: Callable[[str], bool], strings: bool) -> Any:
    if isinstance(value, str):
        return redact_text(value) if strings else value
    if isinstance(value, dict):
        # {"name": "Authorization", "value": "..."}: a header or env entry spelled out.
        labelled = any(isinstance(value.get(label), str) and secret(value[label]) for label in _LABELS)
        return {
            k: MASK
            if isinstance(k, str) and (secret(k) or (labelled and k.lower() in _VALUES))
            else _walk(v, secret, strings)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_pair(item, secret, strings) for item in value]
    return value


def _pair(item: Any, secret: Callable[[str], bool], strings: bool) -> Any:
    """``["Authorization", "Bearer x"]`` inside a list is a header pair: mask its value."""
    if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and secret(item[0]):
        return [item[0], MASK]
    return _walk(item, secret, strings)


def mask_keys(
    pattern: str | re.Pattern[str] | None = None,
    *,
    defaults: bool = False,
    strings: bool = True,
) -> Redactor:
    """A redactor that masks values under secret keys, and secrets inside strings.

    ``pattern`` (case-insensitive, searched in each key) replaces the built-in key rule
    (:func:`is_secret_key`) unless ``defaults=True`` keeps both. ``strings=False`` leaves
    strings as stored (only whole values under matching keys are masked).
    """
    compiled = re.compile(pattern, re.IGNORECASE) if isinstance(pattern, str) else pattern

    def secret(key: str) -> bool:
        if compiled is None:
            return is_secret_key(key)
        return bool(compiled.search(key)) or (defaults and is_secret_key(key))

    def redact(args: dict[str, Any]) -> dict[str, Any]:
        masked: dict[str, Any] = _walk(args, secret, strings)
        return masked

    return redact


default_redact: Redactor = mask_keys()
"""The default hook: secret keys at any depth, and secrets inside every string."""


def no_redaction(args: dict[str, Any]) -> dict[str, Any]:
    """Show everything as stored (for local development only)."""
    return args


def redact_value(redact: Redactor, value: Any) -> Any:
    """Apply the hook to any JSON value: results, progress, error lists and strings alike.

    A non-object is wrapped as ``{"value": ...}`` for the hook and unwrapped after, so a hook
    written for argument dicts also covers a list or a string a handler returned.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return redact(dict(value))
    return redact({"value": value}).get("value", MASK)


def redact_strings(redact: Redactor, values: Iterable[str | None]) -> list[str | None]:
    """Pass loose strings (error messages, unique keys) through the hook in one call."""
    out = redact_value(redact, list(values))
    return [v if v is None or isinstance(v, str) else str(v) for v in out]
