"""Sans-IO refresh policy: when to refresh, how to back off. Clock values and randomness come in.

next_refresh(token, rng)        issued_at + lifetime × (refresh_at ± jitter), never later than
                                expire_time − margin, where margin = max(skew, 10 % of lifetime)
Backoff.next(rng, retry_after)  full-jitter exponential: uniform(min, min(max, min·2^n)), at least
                                Retry-After; `reset()` after a success
retry_at(...)                   the next attempt after a failure, bounded so that a still-valid
                                last good token gets at least one more try before it passes its skew
start_delay(rng, spread)        a random delay before a source's first fetch (fleet boot storms)
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

from wlidd.tokens.model import Token

MAX_RETRY_AFTER = 3600.0
FIRST_REFRESH_FLOOR = 0.1  # the earliest first refresh, as a fraction of the lifetime


@dataclass(frozen=True)
class RefreshPolicy:
    refresh_at: float = 0.8
    jitter: float = 0.1
    skew: float = 60.0
    min_interval: float = 1.0

    def margin(self, token: Token) -> float:
        return max(self.skew, 0.1 * token.lifetime)

    def next_refresh(self, token: Token, rng: random.Random, *, first: bool = False) -> dt.datetime:
        """When to refresh `token`. For the first token a source obtains, the fraction is drawn from
        the whole window [FIRST_REFRESH_FLOOR, refresh_at + jitter]: nodes that booted together (and
        so fetched together) leave each other's phase in one cycle instead of drifting apart slowly."""
        lifetime = token.lifetime
        if first:
            fraction = rng.uniform(min(FIRST_REFRESH_FLOOR, self.refresh_at), self.refresh_at + self.jitter)
        else:
            fraction = self.refresh_at + rng.uniform(-self.jitter, self.jitter)
        planned = token.issued_at + dt.timedelta(seconds=lifetime * fraction)
        latest = token.expire_time - dt.timedelta(seconds=self.margin(token))
        earliest = token.issued_at + dt.timedelta(seconds=self.min_interval)
        return max(earliest, min(planned, latest))


@dataclass
class Backoff:
    """Exponential backoff with full jitter (go-spiffe workloadapi/backoff.go shape)."""

    minimum: float = 1.0
    maximum: float = 300.0
    attempts: int = field(default=0)

    def next(self, rng: random.Random, retry_after: float | None = None) -> float:
        ceiling = min(self.maximum, self.minimum * (2**self.attempts))
        self.attempts += 1
        delay = rng.uniform(self.minimum, max(self.minimum, ceiling))
        if retry_after is not None:
            # The server knows its quota best: wait at least what it asked (within reason).
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def reset(self) -> None:
        self.attempts = 0


def retry_at(now: dt.datetime, delay: float, last_good: Token | None, skew: float) -> dt.datetime:
    """When to try again after a failure. While the last good token is still servable, never wait
    past the point where it stops being servable (minus a little), so recovery has a chance
    before callers see 503s; once it is unusable, the backoff alone decides."""
    planned = now + dt.timedelta(seconds=delay)
    if last_good is not None and last_good.usable_at(now, skew):
        deadline = last_good.expire_time - dt.timedelta(seconds=skew + 1)
        if deadline > now:
            return min(planned, deadline)
    return planned


def start_delay(rng: random.Random, spread: float) -> float:
    return rng.uniform(0.0, spread) if spread > 0 else 0.0


def after_failure(
    backoff: Backoff,
    now: dt.datetime,
    rng: random.Random,
    last_good: Token | None,
    skew: float,
    retry_after: float | None = None,
) -> dt.datetime:
    """The next attempt after a failed fetch: backoff (at least Retry-After), bounded by what remains
    of the last good token. TokenSource and the fleet simulation both decide with this."""
    return retry_at(now, backoff.next(rng, retry_after), last_good, skew)
