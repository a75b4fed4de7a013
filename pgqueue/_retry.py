"""Backoff policies: how long a failed job waits before its next attempt.

A policy is any callable ``(attempt) -> seconds`` where ``attempt`` is the number (1-based) of
the attempt that just failed. The helpers below build the usual ones; they are pure functions so
they are tested without a database.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from pgqueue.errors import ConfigurationError

Backoff = Callable[[int], float]
# The longest wait before a retry: a century. Past it the database cannot add the wait to now()
# (an interval tops out near 178 million years, a timestamp at year 294276) and the outcome
# would be refused; anything near it is a bug, not a plan.
MAX_RETRY_DELAY = 100 * 365.25 * 86400


def valid_delay(seconds: float) -> bool:
    """Whether ``seconds`` is a wait a retry can be given (NaN is not)."""
    return 0 <= seconds <= MAX_RETRY_DELAY


def _seconds(value: timedelta | float, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not valid_delay(seconds):
        raise ConfigurationError(
            f"{name} must be a number of seconds from 0 to {MAX_RETRY_DELAY:.0f} (a century), got {value!r}"
        )
    return seconds


def _jittered(seconds: float, jitter: float, cap: float = float("inf")) -> float:
    """Spread retries of jobs that failed together over ±``jitter`` of the delay, never past ``cap``.

    At the cap the spread goes downward only, so jobs that failed many times still do not retry
    in lockstep.
    """
    base = min(seconds, cap)
    if jitter == 0:
        return base
    return random.uniform(base * (1 - jitter), min(base * (1 + jitter), cap))


@dataclass(frozen=True, slots=True)
class Exponential:
    base: float
    factor: float
    cap: float
    jitter: float

    def __call__(self, attempt: int) -> float:
        raw = self.base * self.factor ** max(attempt - 1, 0) if attempt < 64 else self.cap
        return _jittered(raw, self.jitter, self.cap)


@dataclass(frozen=True, slots=True)
class Linear:
    step: float
    cap: float
    jitter: float

    def __call__(self, attempt: int) -> float:
        return _jittered(self.step * max(attempt, 1), self.jitter, self.cap)


@dataclass(frozen=True, slots=True)
class Fixed:
    seconds: float
    jitter: float

    def __call__(self, attempt: int) -> float:
        return _jittered(self.seconds, self.jitter)


def _check_jitter(jitter: float) -> float:
    if not 0 <= jitter <= 1:
        raise ConfigurationError(f"jitter is a fraction from 0 to 1, got {jitter!r}")
    return jitter


def exponential(
    base: timedelta | float = 2.0,
    factor: float = 2.0,
    cap: timedelta | float = 3600.0,
    jitter: float = 0.0,
) -> Backoff:
    """``base * factor**(attempt-1)`` seconds, never more than ``cap``: 2 s, 4 s, 8 s … 1 h."""
    if factor < 1:
        raise ConfigurationError(f"factor must be at least 1, got {factor!r}")
    return Exponential(_seconds(base, "base"), factor, _seconds(cap, "cap"), _check_jitter(jitter))


def linear(step: timedelta | float = 10.0, cap: timedelta | float = 3600.0, jitter: float = 0.0) -> Backoff:
    """``step * attempt`` seconds, never more than ``cap``."""
    return Linear(_seconds(step, "step"), _seconds(cap, "cap"), _check_jitter(jitter))


def fixed(seconds: timedelta | float, jitter: float = 0.0) -> Backoff:
    """The same wait after every failure."""
    return Fixed(_seconds(seconds, "seconds"), _check_jitter(jitter))


DEFAULT_BACKOFF: Backoff = exponential()


class Retry(Exception):
    """Raise from a handler to retry the job after a specific delay instead of the backoff.

    The attempt still counts: a job on its last attempt is dead-lettered.
    """

    def __init__(self, in_: timedelta | float = 0.0, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = _seconds(in_, "in_")


class Abort(Exception):
    """Raise from a handler to fail the job at once, with no further attempts."""
