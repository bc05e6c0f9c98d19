"""The sans-IO refresh policy: no loop, no sleeping, clock and randomness passed in."""

from __future__ import annotations

import datetime as dt
import random

import pytest

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
    short = token(lifetime=100)  # shorter than 4 × skew: served until 25 s are left, refreshed at half
    when = policy.next_refresh(short, random.Random(3))
    assert (short.expire_time - when).total_seconds() >= 50 > short.serve_margin(60) == 25


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


# ---- issue 15 items 6 and 7: short lifetimes, and the clients' 300 s threshold ----------------------------


def simulate(
    policy: RefreshPolicy, lifetime: float, rng: random.Random, lifetimes: int = 8
) -> list[tuple[Token, dt.datetime]]:
    """A source whose upstream always answers at once with a token of `lifetime` seconds, on a simulated
    clock: [(token, when it was replaced)], the first token fetched at T0."""
    current, first, history = token(lifetime), True, []
    while current.issued_at < T0 + dt.timedelta(seconds=lifetimes * lifetime):
        when = policy.next_refresh(current, rng, first=first)
        history.append((current, when))
        current, first = token(lifetime, issued=when), False
    return history


def test_a_lifetime_at_or_below_skew_is_served_and_fetched_at_most_twice_per_lifetime() -> None:
    """Item 6: an upstream granting 5…60 s with skew 60 s and min_interval 1 s: every token is served,
    there is always one to serve, and the upstream is called about every half lifetime, not every second."""
    policy = RefreshPolicy(skew=60, min_interval=1)
    for lifetime in (5, 10, 30, 59, 60):
        history = simulate(policy, lifetime, random.Random(lifetime), lifetimes=40)
        steady = [(when - old.issued_at).total_seconds() for old, when in history[1:]]
        assert min(steady) >= max(1, lifetime / 2), lifetime
        assert len(history) <= 2 * 40 + 2, lifetime
        for old, when in history:  # replaced while still servable: no gap between two tokens
            assert old.usable_at(old.issued_at, 60) and old.usable_at(when - dt.timedelta(seconds=0.01), 60)
        assert policy.short_lifetime(history[0][0])
    assert not policy.short_lifetime(token(240)) and policy.short_lifetime(token(239))
    assert token(30).serve_margin(60) == 7.5 and token(3600).serve_margin(60) == 60


def test_a_short_lived_last_good_token_gets_a_retry_before_it_stops_being_served() -> None:
    last = token(lifetime=30)  # served until 7.5 s are left
    now = T0 + dt.timedelta(seconds=16)
    assert retry_at(now, 300, last, skew=60) == last.expire_time - dt.timedelta(seconds=8.5)


LIFETIMES = (60, 120, 240, 300, 450, 600, 660, 900, 1200, 1500, 1800, 2700, 3600)


@pytest.mark.parametrize("lifetime", LIFETIMES)
def test_a_served_token_keeps_300s_whenever_its_lifetime_allows(lifetime: float) -> None:
    """Item 7: Node's google-auth-library refreshes a token with < 300 s left, Python's google-auth < 225 s.
    Refreshed in time, a token is replaced while at least min(300 s, half its lifetime) are left: 300 s
    for every lifetime ≥ 600 s, 225 s (Python's threshold) from 450 s. Refreshes stay at least half a
    lifetime apart, and each token is still servable when it is replaced."""
    policy = RefreshPolicy()  # the defaults: refresh_at 0.8 ± 0.1, skew 60 s
    for seed in range(60):
        history = simulate(policy, lifetime, random.Random(seed))
        for index, (old, when) in enumerate(history):
            left = old.seconds_left(when)
            assert left >= min(300, lifetime / 2), (seed, index, left)
            if lifetime >= 600:
                assert left >= 300
            if lifetime >= 450:
                assert left >= 225
            assert old.usable_at(when, policy.skew)
            if index:
                assert (when - old.issued_at).total_seconds() >= lifetime / 2


def test_the_300s_rule_spreads_refreshes_instead_of_lining_them_up() -> None:
    """Tokens of 15 minutes: the refresh point is drawn from a window, not one instant for every node."""
    rng = random.Random(11)
    offsets = {round((RefreshPolicy().next_refresh(token(900), rng) - T0).total_seconds()) for _ in range(500)}
    assert max(offsets) <= 600 and min(offsets) >= 450 and len(offsets) > 50
