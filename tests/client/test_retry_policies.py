"""Backoff policies are pure functions of the attempt number: tested without a database."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta

import pytest

from pgqueue import Abort, Retry, exponential, fixed, linear
from pgqueue._tasks import TaskOptions
from pgqueue.errors import ConfigurationError, PgQueueError

SAMPLES = 2000


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    """Jitter draws from ``random``: seed it so a failure here replays exactly."""
    state = random.getstate()
    random.seed(1234)
    yield
    random.setstate(state)


def test_exponential_doubles_from_the_base_up_to_the_cap() -> None:
    policy = exponential(base=2, factor=2, cap=60)
    assert [policy(a) for a in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]


def test_exponential_defaults_are_2s_doubling_capped_at_an_hour() -> None:
    policy = exponential()
    assert [policy(a) for a in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert policy(12) == 3600  # 2 * 2**11 = 4096 > 3600
    assert policy(40) == 3600


def test_exponential_never_overflows_on_huge_attempt_numbers() -> None:
    policy = exponential(base=1, factor=10, cap=300)
    for attempt in (63, 64, 65, 500, 10_000, 10**9):
        assert policy(attempt) == 300


def test_exponential_with_factor_one_is_constant_and_accepts_timedeltas() -> None:
    policy = exponential(base=timedelta(seconds=7), factor=1, cap=timedelta(minutes=1))
    assert {policy(a) for a in range(1, 50)} == {7}


def test_exponential_first_attempt_numbers_below_one_use_the_base() -> None:
    policy = exponential(base=3, factor=3, cap=1000)
    assert policy(0) == policy(1) == 3
    assert policy(-5) == 3


def test_exponential_fractional_base() -> None:
    policy = exponential(base=0.25, factor=2, cap=10)
    assert [policy(a) for a in range(1, 5)] == [0.25, 0.5, 1.0, 2.0]


def test_linear_grows_by_step_up_to_the_cap() -> None:
    policy = linear(step=10, cap=45)
    assert [policy(a) for a in range(1, 7)] == [10, 20, 30, 40, 45, 45]
    assert policy(0) == 10  # never less than one step
    assert linear(step=timedelta(seconds=1.5))(4) == 6.0
    assert linear()(1) == 10 and linear()(10_000) == 3600


def test_fixed_is_the_same_every_time() -> None:
    policy = fixed(30)
    assert {policy(a) for a in range(1, 100)} == {30}
    assert fixed(timedelta(minutes=2))(5) == 120
    assert fixed(0)(3) == 0


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_stays_within_its_fraction_and_spreads(jitter: float) -> None:
    for policy, nominal in (
        (fixed(100, jitter=jitter), 100.0),
        (linear(step=20, cap=1000, jitter=jitter), 100.0),  # attempt 5
        (exponential(base=6.25, factor=2, cap=1000, jitter=jitter), 100.0),
    ):
        draws = [policy(5) for _ in range(SAMPLES)]
        assert all(nominal * (1 - jitter) <= d <= nominal * (1 + jitter) for d in draws)
        assert all(d >= 0 for d in draws)
        # Spread over most of the band, on both sides of the nominal delay.
        assert min(draws) < nominal * (1 - jitter * 0.8)
        assert max(draws) > nominal * (1 + jitter * 0.8)
        assert len(set(draws)) > SAMPLES * 0.9


def test_jitter_still_spreads_retries_once_the_cap_is_reached() -> None:
    """Jobs that all failed many times must not retry in lockstep at exactly the cap."""
    policy = exponential(base=1, factor=2, cap=100, jitter=0.2)
    draws = [policy(30) for _ in range(SAMPLES)]
    assert all(d >= 80 for d in draws)
    assert min(draws) < 85
    assert len(set(draws)) > SAMPLES * 0.9


def test_no_jitter_is_exact() -> None:
    policy = exponential(base=1.5, factor=3, cap=10_000, jitter=0)
    assert [policy(3) for _ in range(10)] == [13.5] * 10


@pytest.mark.parametrize(
    "make",
    [
        lambda: exponential(base=-1),
        lambda: exponential(cap=-1),
        lambda: exponential(factor=0.5),
        lambda: exponential(jitter=-0.1),
        lambda: exponential(jitter=1.5),
        lambda: linear(step=-1),
        lambda: linear(cap=timedelta(seconds=-1)),
        lambda: linear(jitter=2),
        lambda: fixed(-0.5),
        lambda: fixed(timedelta(seconds=-3)),
        lambda: fixed(1, jitter=-1),
    ],
)
def test_nonsense_policies_are_refused(make: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make()  # type: ignore[operator]
    assert isinstance(caught.value, PgQueueError)


def test_tasks_default_to_exponential_backoff() -> None:
    policy = TaskOptions().backoff
    assert [policy(a) for a in (1, 2, 3)] == [2, 4, 8]


def test_retry_carries_its_delay() -> None:
    assert Retry().delay == 0
    assert Retry(30).delay == 30
    assert Retry(timedelta(minutes=2), reason="rate limited").delay == 120
    assert str(Retry(1, reason="rate limited")) == "rate limited"
    with pytest.raises(ConfigurationError):
        Retry(-1)


def test_abort_and_retry_are_exceptions_a_handler_raises() -> None:
    assert issubclass(Retry, Exception) and issubclass(Abort, Exception)
    assert not issubclass(Retry, PgQueueError) and not issubclass(Abort, PgQueueError)
