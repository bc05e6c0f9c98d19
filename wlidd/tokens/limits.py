"""Bounds on the upstream work a token source's callers can cause, and the pieces its mints share (pure
bookkeeping, times passed in): the limits of ID tokens and scoped tokens, token buckets (one per caller, one
per source), a mint in flight that callers join, and the backoff of a kind of mint with the answer it gives
meanwhile."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

from wlidd.clock import iso_z
from wlidd.errors import RateLimited, TokenUnavailable, UpstreamError, WlidError
from wlidd.tokens.flows.attempts import Attempt
from wlidd.tokens.schedule import Backoff


@dataclass(frozen=True)
class IdTokenLimits:
    """Bounds on ID tokens, whose audience any authorized caller chooses. Rates are per minute; a
    mint is an upstream call for an audience not in the cache (cache hits and joining a mint in
    flight cost nothing)."""

    max_audience: int = 512  # characters
    cache_size: int = 256  # ID tokens kept per source (least recently used dropped first)
    max_inflight: int = 64  # audiences being minted at once per source
    caller_burst: int = 10  # mints one caller (uid) may make at once …
    caller_per_minute: float = 10.0  # … and afterwards per minute
    new_audiences_burst: int = 60  # audiences not in the cache, all callers together …
    new_audiences_per_minute: float = 60.0  # … and afterwards per minute
    max_callers: int = 4096  # per-caller buckets kept (full ones are dropped first)
    refused_audiences: int = 256  # audiences refused permanently, kept with their error (oldest dropped first)


@dataclass(frozen=True)
class ScopedLimits:
    """Bounds on the tokens a source mints for scope sets callers name (TokenSource.scoped_token). Rates are
    per minute; a mint is an upstream call for a scope set whose token is not cached (or is due)."""

    cache_size: int = 32  # scope sets whose token is kept (least recently used dropped first)
    max_inflight: int = 8  # scope sets being minted at once
    caller_burst: int = 10  # mints one caller (uid) may make at once …
    caller_per_minute: float = 10.0  # … and afterwards per minute
    mints_burst: int = 30  # mints, all callers together (the source's cap: about one cache's worth) …
    mints_per_minute: float = 30.0  # … and afterwards per minute
    max_callers: int = 4096  # per-caller buckets kept (full ones are dropped first)
    refused_sets: int = 32  # scope sets refused permanently, kept with their error (oldest dropped first)


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second on a monotonic clock the caller passes in
    (seconds), so tests drive time."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity, self.rate = float(capacity), rate
        self.level, self.stamp = float(capacity), now

    def _fill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait(self, now: float) -> float:
        """Seconds until a token is available: 0 when one is now (inf when the rate is 0)."""
        self._fill(now)
        if self.level >= 1:
            return 0.0
        return (1 - self.level) / self.rate if self.rate > 0 else math.inf

    def take(self, now: float) -> None:
        self._fill(now)
        self.level -= 1

    def full(self, now: float) -> bool:
        self._fill(now)
        return self.level >= self.capacity

    def give_back(self, now: float) -> None:
        """Return a token taken for a call that was not made (held by a backoff, nothing sent)."""
        self._fill(now)
        self.level = min(self.capacity, self.level + 1)


class CallerBuckets:
    """One TokenBucket per caller (uid), at most `max_callers` of them: when the table is full, full buckets
    (the same as none) are dropped first, then the least recently used."""

    def __init__(self, burst: int, per_minute: float, max_callers: int) -> None:
        self.burst, self.per_minute, self.rate, self.max_callers = burst, per_minute, per_minute / 60, max_callers
        self._buckets: OrderedDict[int, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, caller: int, now: float) -> TokenBucket:
        bucket = self._buckets.get(caller)
        if bucket is None:
            self._prune(now)
            bucket = self._buckets[caller] = TokenBucket(self.burst, self.rate, now)
        self._buckets.move_to_end(caller)
        return bucket

    def share(self, caller: int, now: float, source: str, mints: str, served: str) -> tuple[TokenBucket, str]:
        """The caller's bucket for `charge`, with why it is refused when empty: uid `caller` asked token
        `source` for `mints` faster than its share (`served`: what it still gets meanwhile)."""
        why = (
            f"uid {caller} asked token {source!r} for {mints} faster than {self.per_minute:g} per minute "
            f"(burst {self.burst}); {served}"
        )
        return self.bucket(caller, now), why

    def _prune(self, now: float) -> None:
        if len(self._buckets) < self.max_callers:
            return
        for uid in [uid for uid, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[uid]
        while len(self._buckets) >= self.max_callers:
            self._buckets.popitem(last=False)


def charge(buckets: Sequence[tuple[TokenBucket, str]], now: float) -> list[TokenBucket]:
    """A mint charged to every one of `buckets` or to none: when any is empty, RateLimited (nothing taken)
    saying why (the first empty bucket's text) and in how many seconds it has a token again. The buckets
    taken from, for `refund` when the mint does not go upstream."""
    for bucket, why in buckets:
        if (wait := bucket.wait(now)) > 0:
            raise RateLimited(f"{why}; retry in {math.ceil(wait)}s", wait)
    for bucket, _ in buckets:
        bucket.take(now)
    return [bucket for bucket, _ in buckets]


def refund(buckets: list[TokenBucket], now: float) -> None:
    for bucket in buckets:
        bucket.give_back(now)


def held(error: UpstreamError, until: dt.datetime, now: dt.datetime, note: str) -> UpstreamError:
    """The answer from `error` while a backoff holds until `until`: `note` added, and `retry_after` the
    seconds until then (at least 1), for the HTTP layer's Retry-After."""
    answer = error.again(note)
    answer.retry_after = max(1, math.ceil((until - now).total_seconds()))
    return answer


T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class Flight(Generic[T]):
    """One mint in flight (an ID token for an audience, a scoped token for a scope set); callers asking for
    the same one wait for it. `call`: what its upstream call did, once its turn came (None: it never went,
    so its charge is given back)."""

    __slots__ = ("call", "done", "error", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: T | None = None
        self.error: WlidError | None = None
        self.call: Attempt | None = None

    async def outcome(self, source: str, what: str) -> T:
        """For a caller that joins this mint: its value once it ends, else its error (TokenUnavailable naming
        `what`, a token of `source`, when it was cancelled)."""
        await self.done.wait()
        if self.value is not None:
            return self.value
        raise self.error or TokenUnavailable(source, f"the {what} fetch was cancelled")


def seconds_until(when: dt.datetime | None, now: dt.datetime) -> float | None:
    """Whole seconds from `now` until `when` (at least 1), or None when nothing is planned."""
    if when is None:
        return None
    return max(1, math.ceil((when - now).total_seconds()))


@contextlib.contextmanager
def in_flight(
    flights: dict[K, Flight[T]], key: K, charged: list[TokenBucket], monotonic: Callable[[], float]
) -> Iterator[Flight[T]]:
    """A new mint for `key`, in `flights` for as long as it runs, so that callers asking for the same key
    join it (Flight.outcome). When it ends: its error kept for them, the buckets `charged` given back when
    it never went upstream (held by a backoff, or failed before sending), and its waiters woken."""
    flight = flights[key] = Flight[T]()
    try:
        yield flight
    except WlidError as exc:
        flight.error = exc
        raise
    finally:
        flights.pop(key, None)
        if flight.call is None or not flight.call.went_upstream:
            refund(charged, monotonic())
        flight.done.set()


class MintBackoff(Generic[K]):
    """The backoff of one kind of mint (ID tokens by audience, scoped tokens by scope set), as refreshes
    back off: a transient failure holds every key for the next step of a Backoff(minimum, maximum) (at
    least Retry-After); a permanent refusal holds its own key for `maximum` seconds (at least Retry-After),
    at most `max_refused` keys kept (oldest dropped first). Meanwhile `answer` gives the last error, worded
    with `kind` ("ID tokens") and `of_key` ("this audience")."""

    def __init__(self, minimum: float, maximum: float, max_refused: int, kind: str, of_key: str) -> None:
        self.backoff = Backoff(minimum, maximum)
        self.max_refused, self.kind, self.of_key = max_refused, kind, of_key
        self.hold: tuple[UpstreamError, dt.datetime] | None = None  # the last transient failure, until when
        self.refused: OrderedDict[K, tuple[UpstreamError, dt.datetime]] = OrderedDict()  # LRU, bounded

    def answer(self, key: K, now: dt.datetime) -> UpstreamError | None:
        """The error to answer for `key` while a backoff holds it, or None when a mint may go upstream."""
        refused = self.refused.get(key)
        if refused is not None:
            error, until = refused
            if now < until:
                return held(error, until, now, f"refused for {self.of_key}; not asked again before {iso_z(until)}")
            del self.refused[key]
        if self.hold is not None and now < self.hold[1]:
            error, until = self.hold
            return held(error, until, now, f"{self.kind} are backing off; next attempt {iso_z(until)}")
        return None

    def failed(self, key: K, exc: UpstreamError, now: dt.datetime, rng: random.Random) -> dt.datetime:
        """Hold after `exc` (its key when permanent, every key when transient); until when."""
        if exc.permanent:
            until = now + dt.timedelta(seconds=self.backoff.after_permanent(exc.retry_after))
            self.refused[key] = (exc, until)
            self.refused.move_to_end(key)
            for old in [k for k, (_, u) in self.refused.items() if u <= now]:
                del self.refused[old]
            while len(self.refused) > self.max_refused:
                self.refused.popitem(last=False)
        else:
            until = now + dt.timedelta(seconds=self.backoff.next(rng, exc.retry_after))
            self.hold = (exc, until)
        return until

    def succeeded(self, key: K) -> None:
        """A mint for `key` went through: nothing held any more."""
        self.hold = None
        self.backoff.reset()
        self.refused.pop(key, None)
