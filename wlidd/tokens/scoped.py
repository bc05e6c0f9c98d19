"""The state of the tokens a source mints for the scope sets callers name (TokenSource.scoped_token): the
cache per scope set, the mints in flight, their budgets and the backoff after failures."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import OrderedDict

from wlidd.clock import iso_z
from wlidd.config import TokenConfig
from wlidd.errors import RateLimited, UpstreamError
from wlidd.tokens.limits import CallerBuckets, Flight, ScopedLimits, TokenBucket, held
from wlidd.tokens.model import Token
from wlidd.tokens.schedule import MAX_RETRY_AFTER, Backoff


class ScopedTokens:
    """One source's scoped tokens: the LRU of tokens per scope set, the mints in flight, the budgets of
    mints (per caller and for the source), and the backoff after failures (a transient failure holds every
    set, a permanent one its own)."""

    def __init__(self, limits: ScopedLimits, config: TokenConfig, monotonic_now: float) -> None:
        self.limits = limits
        self.cache: OrderedDict[frozenset[str], Token] = OrderedDict()
        self.flights: dict[frozenset[str], Flight[Token]] = {}
        self.refused: OrderedDict[frozenset[str], tuple[UpstreamError, dt.datetime]] = OrderedDict()
        self.hold: tuple[UpstreamError, dt.datetime] | None = None  # the last transient failure, until when
        self.backoff = Backoff(config.backoff_min, config.backoff_max)
        self.mints = TokenBucket(limits.mints_burst, limits.mints_per_minute / 60, monotonic_now)
        self.callers = CallerBuckets(limits.caller_burst, limits.caller_per_minute, limits.max_callers)

    def charge(self, name: str, caller: int | None, now: float) -> list[TokenBucket]:
        """Take a mint from the caller's bucket and the source's; RateLimited (nothing taken) when either
        is empty. Returns the buckets taken from (given back when the mint does not go upstream)."""
        limits = self.limits
        bucket = self.callers.bucket(caller, now) if caller is not None else None
        if bucket is not None and (wait := bucket.wait(now)) > 0:
            raise RateLimited(
                f"uid {caller} asked token {name!r} for tokens for new scope sets faster than "
                f"{limits.caller_per_minute:g} per minute (burst {limits.caller_burst}); sets already minted "
                f"are still served; retry in {math.ceil(wait)}s",
                wait,
            )
        if (wait := self.mints.wait(now)) > 0:
            raise RateLimited(
                f"token {name!r} minted tokens for scope sets faster than {limits.mints_per_minute:g} per "
                f"minute (all callers together, burst {limits.mints_burst}); sets already minted are still "
                f"served; retry in {math.ceil(wait)}s",
                wait,
            )
        self.mints.take(now)
        taken = [self.mints]
        if bucket is not None:
            bucket.take(now)
            taken.append(bucket)
        return taken

    def last_error(self, key: frozenset[str], now: dt.datetime) -> UpstreamError | None:
        """The answer while scoped tokens back off (None: a mint may go upstream)."""
        refused = self.refused.get(key)
        if refused is not None:
            error, until = refused
            if now < until:
                return held(error, until, now, f"refused for these scopes; not asked again before {iso_z(until)}")
            del self.refused[key]
        if self.hold is not None and now < self.hold[1]:
            error, until = self.hold
            return held(error, until, now, f"scoped tokens are backing off; next attempt {iso_z(until)}")
        return None

    def succeeded(self, key: frozenset[str], token: Token, now: dt.datetime) -> None:
        """Into the LRU: tokens past expiry out first, then the least recently used beyond cache_size."""
        self.hold = None
        self.backoff.reset()
        self.refused.pop(key, None)
        for stale in [k for k, t in self.cache.items() if t.seconds_left(now) <= 0]:
            del self.cache[stale]
        self.cache[key] = token
        self.cache.move_to_end(key)
        while len(self.cache) > self.limits.cache_size:
            self.cache.popitem(last=False)

    def failed(self, key: frozenset[str], exc: UpstreamError, now: dt.datetime, rng: random.Random) -> None:
        if exc.permanent:
            delay = max(self.backoff.maximum, min(exc.retry_after or 0.0, MAX_RETRY_AFTER))
            self.refused[key] = (exc, now + dt.timedelta(seconds=delay))
            self.refused.move_to_end(key)
            while len(self.refused) > self.limits.refused_sets:
                self.refused.popitem(last=False)
        else:
            self.hold = (exc, now + dt.timedelta(seconds=self.backoff.next(rng, exc.retry_after)))
