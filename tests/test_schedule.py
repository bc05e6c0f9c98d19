"""The sans-IO refresh policy: no loop, no sleeping, clock and randomness passed in."""

from __future__ import annotations

import datetime as dt
import random

from wlidd.tokens.model import Token
from wlidd.tokens.schedule import Backoff, RefreshPolicy, retry_at, start_delay

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def token(lifetime: float = 3600, issued: dt.datetime = T0) -> Token:
    return Token("v", issued + dt.timedelta(seconds=lifetime), issued, "t")


def test_refresh_lands_at_the_fraction_of_lifetime_within_the_jitter() -> None:
    policy = RefreshPolicy(refresh_at=0.8, jitter=0.1)
    rng = random.Random(1)
    times = [(policy.next_refresh(token(), rng) - T0).total_seconds() for _ in range(2000)]
    assert min(times) >= 0.7 * 3600 and max(times) <= 0.9 * 3600
    assert 0.78 * 3600 < sum(times) / len(times) < 0.82 * 3600
    assert max(times) - min(times) > 0.15 * 3600  # the spread is really used


def test_refresh_always_leaves_a_margin_before_expiry() -> None:
    policy = RefreshPolicy(refresh_at=0.95, jitter=0.04, skew=60)
    when = policy.next_refresh(token(lifetime=3600), random.Random(2))
    assert (token().expire_time - when).total_seconds() >= 360  # 10 % of the lifetime
    short = token(lifetime=100)
    when = policy.next_refresh(short, random.Random(3))
    assert (short.expire_time - when).total_seconds() >= 60  # at least the skew


def test_refresh_is_never_sooner_than_the_minimum_interval() -> None:
    policy = RefreshPolicy(refresh_at=0.1, jitter=0.0, skew=60, min_interval=5)
    tiny = token(lifetime=30)
    assert policy.next_refresh(tiny, random.Random(4)) == T0 + dt.timedelta(seconds=5)


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap() -> None:
    rng = random.Random(5)
    backoff = Backoff(minimum=1, maximum=300)
    ceilings = [min(300, 2**n) for n in range(12)]
    for ceiling in ceilings:
        delay = backoff.next(rng)
        assert 1 <= delay <= ceiling
    assert backoff.next(rng) <= 300
    backoff.reset()
    assert backoff.next(rng) == 1


def test_backoff_honours_retry_after() -> None:
    backoff = Backoff(minimum=1, maximum=300)
    assert backoff.next(random.Random(6), retry_after=42) >= 42
    assert backoff.next(random.Random(6), retry_after=600) == 600  # even beyond the backoff cap
    assert backoff.next(random.Random(6), retry_after=10**6) == 3600  # but within reason


def test_retry_is_bounded_by_what_remains_of_the_last_good_token() -> None:
    last = token(lifetime=600)
    now = T0 + dt.timedelta(seconds=400)
    when = retry_at(now, 300, last, skew=60)
    assert when == last.expire_time - dt.timedelta(seconds=61)
    assert retry_at(now, 10, last, skew=60) == now + dt.timedelta(seconds=10)
    expired_now = T0 + dt.timedelta(seconds=590)
    assert retry_at(expired_now, 300, last, skew=60) == expired_now + dt.timedelta(seconds=300)


def test_start_delay_spreads_over_the_window() -> None:
    rng = random.Random(7)
    delays = [start_delay(rng, 30) for _ in range(1000)]
    assert 0 <= min(delays) < 1 and 29 < max(delays) <= 30
    assert start_delay(rng, 0) == 0


def test_first_refresh_is_drawn_from_the_whole_window_to_break_up_boot_herds() -> None:
    policy = RefreshPolicy(refresh_at=0.8, jitter=0.1)
    rng = random.Random(8)
    times = [(policy.next_refresh(token(), rng, first=True) - T0).total_seconds() for _ in range(2000)]
    assert 0.1 * 3600 <= min(times) < 0.15 * 3600 and 0.85 * 3600 < max(times) <= 0.9 * 3600


def test_after_failure_combines_backoff_retry_after_and_the_last_good_bound() -> None:
    from wlidd.tokens.schedule import after_failure

    last = token(lifetime=600)
    now = T0 + dt.timedelta(seconds=100)
    assert after_failure(Backoff(1, 300), now, random.Random(9), last, 60, retry_after=30) >= now + dt.timedelta(
        seconds=30
    )
    bounded = after_failure(Backoff(1000, 1000), now, random.Random(9), last, 60)
    assert bounded == last.expire_time - dt.timedelta(seconds=61)
