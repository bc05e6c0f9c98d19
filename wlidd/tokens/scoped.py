"""The state of the tokens a source mints for the scope sets callers name (TokenSource.scoped_token): the
cache per scope set, the mints in flight, their budgets and the backoff after failures."""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict

from wlidd.config import TokenConfig
from wlidd.tokens.limits import CallerBuckets, Flight, MintBackoff, ScopedLimits, TokenBucket, charge
from wlidd.tokens.model import Token


class ScopedTokens:
    """One source's scoped tokens: the LRU of tokens per scope set, the mints in flight, the budgets of
    mints (per caller and for the source), and the backoff after failures (a transient failure holds every
    set, a permanent one its own)."""

    def __init__(self, limits: ScopedLimits, config: TokenConfig, monotonic_now: float) -> None:
        self.limits = limits
        self.cache: OrderedDict[frozenset[str], Token] = OrderedDict()
        self.flights: dict[frozenset[str], Flight[Token]] = {}
        self.backoff = MintBackoff[frozenset[str]](
            config.backoff_min, config.backoff_max, limits.refused_sets, "scoped tokens", "these scopes"
        )
        self.mints = TokenBucket(limits.mints_burst, limits.mints_per_minute / 60, monotonic_now)
        self.callers = CallerBuckets(limits.caller_burst, limits.caller_per_minute, limits.max_callers)

    def charge(self, name: str, caller: int | None, now: float) -> list[TokenBucket]:
        """Take a mint from the caller's bucket and the source's; RateLimited (nothing taken) when either
        is empty. Returns the buckets taken from (given back when the mint does not go upstream)."""
        limits = self.limits
        served = "sets already minted are still served"
        buckets: list[tuple[TokenBucket, str]] = []
        if caller is not None:
            buckets.append(self.callers.share(caller, now, name, "tokens for new scope sets", served))
        why = (
            f"token {name!r} minted tokens for scope sets faster than {limits.mints_per_minute:g} per "
            f"minute (all callers together, burst {limits.mints_burst}); {served}"
        )
        buckets.append((self.mints, why))
        return charge(buckets, now)

    def succeeded(self, key: frozenset[str], token: Token, now: dt.datetime) -> None:
        """Into the LRU: tokens past expiry out first, then the least recently used beyond cache_size; the
        backoff of the set ends."""
        self.backoff.succeeded(key)
        for stale in [k for k, t in self.cache.items() if t.seconds_left(now) <= 0]:
            del self.cache[stale]
        self.cache[key] = token
        self.cache.move_to_end(key)
        while len(self.cache) > self.limits.cache_size:
            self.cache.popitem(last=False)
