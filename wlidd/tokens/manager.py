"""TokenSource: one named token, kept fresh in the background and served from memory.

- Serving (`get`) reads the current token and judges its expiry by the wall clock on every call:
  nothing within `skew` of expiry is ever served; callers get TokenUnavailable (503) with the reason.
- One upstream fetch at a time per source (single-flight): concurrent callers share it.
- Refresh at `refresh_at` of the lifetime ± `jitter`; after a failure, full-jitter exponential
  backoff (at least Retry-After), bounded by what remains of the last good token.
- `min_interval` between upstream calls and a random `start_delay` protect a fleet's shared quota;
  `on_demand` sources fetch on first request and stop refreshing after `idle` without requests.
- Every upstream call, access-token chains and ID-token and scoped mints alike, goes through `_paced`:
  spaced by `min_interval` in arrival order, counted in `upstream_calls` and wlidd_token_upstream_calls
  when something was sent (a ca_file that cannot be loaded sends nothing: wlidd.tokens.flows.attempt).
  A mint waiting for its turn re-checks the backoff when the turn comes and whenever a failure sets one:
  held, it gives its turn up and answers from the last error, nothing sent and nothing charged.
- ID tokens (any audience a caller names): one mint per audience at a time, a bounded LRU cache, a
  per-caller token bucket and a cap on new audiences per minute for mints (cache hits are free); the
  STS exchange they need is renewed through `refresh` (single-flight, same backoff), never by the flow
  itself. Mints back off like refreshes: after a transient failure no audience is minted until the
  backoff (at least Retry-After) passes, then one mint probes the upstream while the others wait for
  its outcome; an audience refused permanently is answered from its error for `backoff_max` (bounded
  LRU). Until then callers get the last error, and the upstream is not asked; an error answered from a
  backoff carries `retry_after`, the seconds until the next attempt (the HTTP layer's Retry-After).
- Cached ID tokens and scoped tokens follow the rule of the source's own token (RefreshPolicy.keep: at
  least min(300 s, half the lifetime) left when served): below it a request re-mints (single-flight), and
  only when no fresh one can be had (a failure, a backoff, a rate limit) is the cached one served, while it
  is above its serving margin.
- Scoped mints are charged to the caller (uid) and to the source, like ID tokens; a caller refused (rate
  limit, failure) whose request the source's own token covers gets that token.
- Permanent errors (`UpstreamError.retryable` false: a 4xx refusal, a bad signing key) back off to
  `backoff_max` at once, still bounded by the last good token; transient ones back off exponentially.
- x509-sts sources refresh at once when their SVID rotates.
- Publishing: every token obtained is published (`changes()`, as CredentialWatcher.changes publishes identity
  states); the caller that asked for it has it as soon as it is cached. Nothing here writes a file or runs
  a command: the daemon runs one task per source that follows `changes()` and writes its sinks
  (wlidd.sinks.follow_token), so a cold token's first caller never waits for sink writes or on_change hooks.
- Time: the wall clock (`clock`), the monotonic one (`monotonic`) and every sleep (`sleep`: the refresh
  loop's naps and the `min_interval` turns) are injected, so a virtual clock drives refreshes and backoffs
  without waiting.
- Every fetch names its trigger (wlidd.tokens.schedule.TRIGGERS) in its log line: the loop fires with
  the trigger that planned its next attempt (`_next_trigger`), so a refresh the SVID's rotation asked for
  says `svid_rotated`, a retry after a failure `retry`, and only the planned one `scheduled`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import jwt
from anyio.abc import TaskStatus

from wlidd.clock import Clock, iso_z, utc_now
from wlidd.config import TokenConfig
from wlidd.errors import ApiError, UpstreamError, WlidError
from wlidd.logs import get_logger
from wlidd.metrics import Metrics
from wlidd.tokens.flows import Attempt, Flow, attempt
from wlidd.tokens.model import IdentityChanges, Token
from wlidd.tokens.providers.expiry import id_token_expiry
from wlidd.tokens.schedule import MAX_RETRY_AFTER, Backoff, RefreshPolicy, after_failure, retry_at, start_delay

log = get_logger("wlidd.tokens")

MAX_SLEEP = 30.0  # the wall clock is re-checked at least this often (suspend/resume, clock jumps)


class TokenUnavailable(ApiError):
    """503: no token to serve; `retry_after` is the seconds until the next attempt when one is planned
    (for a Retry-After header), else None."""

    def __init__(self, name: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(503, "token_unavailable", f"token {name!r} is not available: {message}")
        self.retry_after = retry_after


class RateLimited(ApiError):
    """429: a caller asked for more upstream work than its share; `retry_after` in seconds (>= 1)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, "rate_limited", message)
        self.retry_after = max(1, math.ceil(retry_after))


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
        self.burst, self.rate, self.max_callers = burst, per_minute / 60, max_callers
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

    def _prune(self, now: float) -> None:
        if len(self._buckets) < self.max_callers:
            return
        for uid in [uid for uid, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[uid]
        while len(self._buckets) >= self.max_callers:
            self._buckets.popitem(last=False)


def _refund(buckets: list[TokenBucket], now: float) -> None:
    for bucket in buckets:
        bucket.give_back(now)


def _held(error: UpstreamError, until: dt.datetime, now: dt.datetime, note: str) -> UpstreamError:
    """The answer from `error` while a backoff holds until `until`: `note` added, and `retry_after` the
    seconds until then (at least 1), for the HTTP layer's Retry-After."""
    answer = error.again(note)
    answer.retry_after = max(1, math.ceil((until - now).total_seconds()))
    return answer


T = TypeVar("T")


class _Flight(Generic[T]):
    """One mint in flight (an ID token for an audience, a scoped token for a scope set); callers asking for
    the same one wait for it. `call`: what its upstream call did, once its turn came (None: it never went,
    so its charge is given back)."""

    __slots__ = ("call", "done", "error", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: T | None = None
        self.error: WlidError | None = None
        self.call: Attempt | None = None


class TokenSource:
    """One configured token: state, schedule, and the refresh loop."""

    def __init__(
        self,
        name: str,
        config: TokenConfig,
        flow: Flow,
        *,
        watcher: IdentityChanges | None = None,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        id_limits: IdTokenLimits | None = None,
        scoped_limits: ScopedLimits | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.flow = flow
        self.watcher = watcher
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.metrics = metrics
        self.monotonic = monotonic or time.monotonic  # the event loop's clock, without anyio's per-call lookup
        self._sleep = sleep or anyio.sleep
        self.policy = RefreshPolicy(config.refresh_at, config.jitter, config.skew, config.min_interval)
        self._warned_short = False  # the short-lifetime warning is logged once per source
        self.backoff = Backoff(config.backoff_min, config.backoff_max)
        self.current: Token | None = None
        self.failures = 0
        self.upstream_calls = 0
        self.last_error: UpstreamError | None = None
        self.last_error_at: dt.datetime | None = None
        self.last_refresh: dt.datetime | None = None
        self.next_refresh: dt.datetime | None = None
        self.last_request: float | None = None
        self._last_call: float | None = None  # the latest turn handed out (taken or still waited for)
        self._turn_taken: float | None = None  # the latest turn taken by a call that went
        self._turns: list[float] = []  # turns handed out and still waited for
        self._hold_set = anyio.Event()  # set (and replaced) whenever a failure starts a backoff for mints
        self._inflight: anyio.Event | None = None
        self._wake = anyio.Event()
        self._changed = anyio.Event()  # set (and replaced) whenever a token is published
        self.published = 0  # tokens published so far (`current` is the latest)
        self.id_limits = id_limits or IdTokenLimits()
        self.scoped_limits = scoped_limits or ScopedLimits()
        self._id_cache: OrderedDict[str, Token] = OrderedDict()  # LRU, at most cache_size; Token.value: the JWT
        self._id_flights: dict[str, _Flight[str]] = {}  # audiences being minted; an entry lives as long as its mint
        self._id_callers = CallerBuckets(
            self.id_limits.caller_burst, self.id_limits.caller_per_minute, self.id_limits.max_callers
        )
        self._id_new_audiences = TokenBucket(
            self.id_limits.new_audiences_burst, self.id_limits.new_audiences_per_minute / 60, self.monotonic()
        )
        # ID-token mints back off like refreshes: a transient failure holds every mint until its time (then
        # one probe mint goes first); a permanent refusal holds its audience for backoff_max.
        self._id_backoff = Backoff(config.backoff_min, config.backoff_max)
        self._id_hold: tuple[UpstreamError, dt.datetime] | None = None  # (last transient error, next attempt)
        self._id_probe: _Flight[str] | None = None  # the mint retrying the upstream after a hold passed
        self._id_refused: OrderedDict[str, tuple[UpstreamError, dt.datetime]] = OrderedDict()  # LRU, bounded
        self._log = log.bind(source=name, flow=config.flow)
        self.first_trigger = "start"  # the first fetch's trigger: "config" for a source a reload (re)started
        self._next_trigger: str | None = None  # why the loop's next attempt (next_refresh) fires; None: first

    # ---- serving ---------------------------------------------------------------------------
    def servable(self, now: dt.datetime | None = None) -> Token | None:
        token = self.current
        if token is not None and token.usable_at(now or self.clock(), self.config.skew):
            return token
        return None

    def not_servable_reason(self, now: dt.datetime) -> str:
        token = self.current
        if token is not None and token.seconds_left(now) > 0:
            prefix = f"the last token is within {self.config.skew:g}s of its expiry"
        elif token is not None:
            prefix = "the last token has expired"
        else:
            prefix = "no token obtained yet"
        if self.last_error is not None:
            when = f"; next attempt {iso_z(self.next_refresh)}" if self.next_refresh else ""
            kind = " (permanent)" if self.last_error.permanent else ""
            return f"{prefix}; last error{kind}: {self.last_error.message}{when}"
        return prefix

    def _may_fetch_now(self, now: dt.datetime) -> bool:
        """Whether a request may start a refresh: never fetched or last fetch good, or an on-demand source
        (whose loop sleeps while idle) past its next attempt. After failures, requests never bypass the
        backoff (or Retry-After): they get the reason instead."""
        if self.failures == 0:
            return True
        return self.config.on_demand and (self.next_refresh is None or now >= self.next_refresh)

    async def get(self) -> Token:
        """The token to serve now, fetching it first when nothing was fetched yet or on demand."""
        self.last_request = self.monotonic()
        token = self.servable()
        if token is not None:
            return token
        if self._may_fetch_now(self.clock()):
            # Cold (never fetched, start delay pending, or on-demand idle): demand wins over the delay.
            # After failures, callers do not bypass the backoff: they get the reason instead.
            self._wake.set()
            with contextlib.suppress(UpstreamError):
                await self.refresh("cold")
            token = self.servable()
            if token is not None:
                return token
        now = self.clock()
        planned = self.next_refresh if self.last_error is not None and self.next_refresh is not None else None
        wait = _seconds_until(planned, now) if planned is not None and planned > now else None
        raise TokenUnavailable(self.name, self.not_servable_reason(now), wait)

    async def id_token(self, audience: str, *, caller: int | None = None) -> str:
        """An ID token for `audience`, for the local caller `caller` (a uid; None: an internal caller).

        Served from the cache while it has more than `policy.keep` left (min(300 s, half its lifetime),
        the rule of the source's own token). Otherwise minted: one mint per audience at a time (concurrent
        callers share it), charged to the caller's token bucket and, for an audience not in the cache, to
        the source's budget of new audiences; spaced and counted like every upstream call, and backing off
        like refreshes (answered from the last error meanwhile, free of charge). When a cached token is
        due but no new one can be had (the mint failed, is backing off or is rate-limited), the cached
        one is served while it is above its serving margin. Raises ApiError 400 (bad audience),
        RateLimited 429, UpstreamError (the mint failed or is backing off, the STS exchange it needs
        failed or is backing off, or the flow mints none).
        """
        self._check_audience(audience)
        if (unsupported := self.flow.id_token_unsupported()) is not None:
            raise unsupported
        cached = self._id_cache.get(audience)
        if cached is not None and self.policy.fresh(cached, self.clock()):
            self._id_cache.move_to_end(audience)
            return cached.value
        try:
            return await self._new_id_token(audience, caller)
        except WlidError:
            cached = self._id_cache.get(audience)  # due, not expired: better than no token
            if cached is not None and cached.usable_at(self.clock(), self.config.skew):
                self._id_cache.move_to_end(audience)
                return cached.value
            raise

    async def _new_id_token(self, audience: str, caller: int | None) -> str:
        """A newly minted ID token for `audience` (or the one minted for it in flight)."""
        flight = self._id_flights.get(audience)
        if flight is not None:  # someone is minting it: share that mint
            await flight.done.wait()
            if flight.value is not None:
                return flight.value
            raise flight.error or TokenUnavailable(self.name, "the ID token fetch was cancelled")
        if (last := self._id_last_error(audience, self.clock())) is not None:
            raise last
        probe = self._id_probe
        if self._id_hold is not None and probe is not None:  # another mint retries the upstream: its outcome first
            await probe.done.wait()
            return await self.id_token(audience, caller=caller)
        limits = self.id_limits
        if len(self._id_flights) >= limits.max_inflight:
            raise RateLimited(
                f"token {self.name!r} is already minting {len(self._id_flights)} ID tokens; retry shortly", 1
            )
        charged = self._charge_id_token(audience, caller)
        flight = self._id_flights[audience] = _Flight[str]()
        if self._id_hold is not None:  # the hold has passed: this mint probes the upstream
            self._id_probe = flight
        try:
            flight.value = await self._mint_id_token(audience, flight)
            return flight.value
        except WlidError as exc:
            flight.error = exc
            raise
        finally:
            self._id_flights.pop(audience, None)
            if self._id_probe is flight:
                self._id_probe = None
            if flight.call is None or not flight.call.went_upstream:  # held, or failed before sending
                _refund(charged, self.monotonic())
            flight.done.set()

    def _id_last_error(self, audience: str, now: dt.datetime) -> UpstreamError | None:
        """The answer while ID tokens back off, or None when a mint may go upstream: the audience's
        permanent refusal until its time, else the last transient failure until its time."""
        refused = self._id_refused.get(audience)
        if refused is not None:
            error, until = refused
            if now < until:
                return _held(error, until, now, f"refused for this audience; not asked again before {iso_z(until)}")
            del self._id_refused[audience]
        if self._id_hold is not None:
            error, until = self._id_hold
            if now < until:
                return _held(error, until, now, f"ID tokens are backing off; next attempt {iso_z(until)}")
        return None

    def _check_audience(self, audience: str) -> None:
        limit = self.id_limits.max_audience
        if not audience:
            raise ApiError(400, "bad_audience", "audience is required")
        if len(audience) > limit:
            raise ApiError(
                400, "bad_audience", f"audience is {len(audience)} characters long; at most {limit} are accepted"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in audience):
            raise ApiError(400, "bad_audience", "audience contains control characters")

    def _charge_id_token(self, audience: str, caller: int | None) -> list[TokenBucket]:
        """Take a mint from the caller's bucket and, for an audience not in the cache, one from the new
        audiences bucket; RateLimited (nothing taken) when either is empty. Returns the buckets taken
        from (given back when the mint does not go upstream)."""
        limits, now = self.id_limits, self.monotonic()
        taken: list[TokenBucket] = []
        bucket = None
        if caller is not None:
            bucket = self._id_callers.bucket(caller, now)
            if (wait := bucket.wait(now)) > 0:
                raise RateLimited(
                    f"uid {caller} asked token {self.name!r} for ID tokens for new audiences faster than "
                    f"{limits.caller_per_minute:g} per minute (burst {limits.caller_burst}); audiences already "
                    f"fetched are still served; retry in {math.ceil(wait)}s",
                    wait,
                )
        if audience not in self._id_cache:
            if (wait := self._id_new_audiences.wait(now)) > 0:
                raise RateLimited(
                    f"token {self.name!r} minted ID tokens for more new audiences than "
                    f"{limits.new_audiences_per_minute:g} per minute (all callers together); audiences already "
                    f"fetched are still served; retry in {math.ceil(wait)}s",
                    wait,
                )
            self._id_new_audiences.take(now)
            taken.append(self._id_new_audiences)
        if bucket is not None:
            bucket.take(now)
            taken.append(bucket)
        return taken

    async def _mint_id_token(self, audience: str, flight: _Flight[str]) -> str:
        """One upstream ID-token call (after an STS exchange through `refresh` when the flow needs one:
        single-flight, counted, its token kept as the source's, its failure backing off the source). Its
        turn given up, nothing sent, when a backoff holds the audience by then (`_paced`)."""
        if self.flow.needs_federated(self.clock()):
            if not self._may_fetch_now(self.clock()):  # do not bypass the backoff (as `get`)
                raise self._no_federated_token()
            await self.refresh("id_token")
            if self.flow.needs_federated(self.clock()):  # joined a refresh that failed (it served the last good)
                raise self._no_federated_token()
        minter = "metadata" if self.config.flow == "gce-metadata" else "iam"
        async with self._paced("id_token", lambda: self._id_last_error(audience, self.clock())) as call:
            flight.call = call
            sent = self.clock()
            try:
                value = await self.flow.fetch_id_token(audience, sent)
                expiry = id_token_expiry(value, sent_at=sent, kind=minter)  # exp − iat from `sent`: no skew
            except UpstreamError as exc:
                self._id_token_failed(audience, exc)
                raise
            except (jwt.PyJWTError, KeyError, ValueError, TypeError, OverflowError):
                error = UpstreamError(minter, "the ID token has no readable exp claim", code="bad_response")
                self._id_token_failed(audience, error)
                raise error from None
            except Exception as exc:  # a bug or an unexpected library error: a clear error, no details leaked
                error = UpstreamError("wlidd", f"unexpected {type(exc).__name__} while minting", code="internal")
                self._id_token_failed(audience, error)
                raise error from None
        self._id_hold = None
        self._id_backoff.reset()
        self._id_refused.pop(audience, None)
        self._store_id_token(audience, Token(value, expiry, sent, self.name))
        self._log.info("id token fetched", audience=audience, expire_time=iso_z(expiry))
        return value

    def _no_federated_token(self) -> WlidError:
        """Why no token can be minted now: the STS exchange it needs failed and backs off (its error, with
        the seconds until the next attempt)."""
        note = "the federated token that mints need could not be renewed"
        now, until = self.clock(), self.next_refresh
        if until is not None:
            note += f"; next attempt {iso_z(until)}"
        if self.last_error is None:
            return TokenUnavailable(self.name, note, _seconds_until(until, now))
        answer = self.last_error.again(note)
        answer.retry_after = _seconds_until(until, now)
        return answer

    def _id_token_failed(self, audience: str, exc: UpstreamError) -> None:
        """Back ID tokens off: a transient failure holds every mint for the next backoff step (at least
        Retry-After); a permanent one holds `audience` for backoff_max (at least Retry-After)."""
        now = self.clock()
        if exc.permanent:
            until = now + dt.timedelta(seconds=self._permanent_delay(exc))
            self._id_refused[audience] = (exc, until)
            self._id_refused.move_to_end(audience)
            for old in [a for a, (_, u) in self._id_refused.items() if u <= now]:
                del self._id_refused[old]
            while len(self._id_refused) > self.id_limits.refused_audiences:
                self._id_refused.popitem(last=False)
        else:
            until = now + dt.timedelta(seconds=self._id_backoff.next(self.rng, exc.retry_after))
            self._id_hold = (exc, until)
        self._signal_hold()
        if self.metrics is not None:
            self.metrics.token_failures.labels(self.name, exc.reason).inc()
        self._log.warning(
            "id token fetch failed",
            audience=audience,
            reason=exc.reason,
            detail=exc.message,
            permanent=exc.permanent,
            retry_in=round((until - now).total_seconds(), 3),
        )

    def _permanent_delay(self, exc: UpstreamError) -> float:
        """Seconds before retrying after a permanent error: backoff_max at once (at least Retry-After)."""
        return max(self.backoff.maximum, min(exc.retry_after or 0.0, MAX_RETRY_AFTER))

    def _store_id_token(self, audience: str, token: Token) -> None:
        """Into the LRU cache: entries no longer servable out first, then the least recently used beyond
        cache_size."""
        now, skew = self.clock(), self.config.skew
        for stale in [a for a, cached in self._id_cache.items() if not cached.usable_at(now, skew)]:
            del self._id_cache[stale]
        self._id_cache[audience] = token
        self._id_cache.move_to_end(audience)
        while len(self._id_cache) > self.id_limits.cache_size:
            self._id_cache.popitem(last=False)

    # ---- refreshing ------------------------------------------------------------------------
    async def refresh(self, reason: str) -> Token:
        """Fetch a new token (single-flight: concurrent callers share one upstream call)."""
        inflight = self._inflight
        if inflight is not None:
            await inflight.wait()
            token = self.servable()
            if token is None:
                raise self.last_error or UpstreamError(
                    "wlidd", "the refresh this request joined failed", code="internal"
                )
            return token
        self._inflight = anyio.Event()
        try:
            return await self._refresh(reason)
        finally:
            done, self._inflight = self._inflight, None
            done.set()

    @contextlib.asynccontextmanager
    async def _paced(self, kind: str, held: Callable[[], WlidError | None] | None = None) -> AsyncIterator[Attempt]:
        """The guard around every upstream call: the block runs at its turn (`_take_turn`: `min_interval`
        after the previous call, in arrival order), and is counted in `upstream_calls` and
        wlidd_token_upstream_calls{kind} when it sent something (the Attempt it yields says). With `held`
        (the error to answer while a backoff holds the call, else None), a held call raises that error
        instead of running: its turn given up, nothing sent, nothing counted."""
        await self._take_turn(held)
        with attempt() as call:
            try:
                yield call
            finally:
                if call.went_upstream:
                    self.upstream_calls += 1
                    if self.metrics is not None:
                        self.metrics.token_upstream_calls.labels(self.name, kind).inc()

    async def _take_turn(self, held: Callable[[], WlidError | None] | None) -> None:
        """Wait for this call's turn: `min_interval` seconds after the turn handed out before it (each
        caller takes its turn before waiting, so concurrent callers queue rather than slip through).
        `held` is asked on arrival, whenever a failure starts a backoff meanwhile (`_signal_hold`) and
        when the turn comes: its error is raised, and the turn given back (the turns after it are not
        moved, but a new caller queues after the last turn still waited for, not after this one)."""
        if held is not None and (error := held()) is not None:
            raise error
        now = self.monotonic()
        turn = now if self._last_call is None else max(now, self._last_call + self.config.min_interval)
        self._last_call = turn
        self._turns.append(turn)
        went = False
        try:
            while (wait := turn - self.monotonic()) > 0:
                if held is None:
                    await self._sleep(wait)
                    break
                if not await self._sleep_unless_held(wait):
                    break  # slept its time (an injected sleep need not move the monotonic clock)
                if (error := held()) is not None:
                    raise error
            if held is not None and (error := held()) is not None:
                raise error
            went = True
        finally:
            self._turns.remove(turn)
            if went:
                self._turn_taken = turn if self._turn_taken is None else max(self._turn_taken, turn)
            else:
                handed = [t for t in (*self._turns, self._turn_taken) if t is not None]
                self._last_call = max(handed) if handed else None

    async def _sleep_unless_held(self, seconds: float) -> bool:
        """Sleep `seconds`, or until a failure starts a backoff (`_signal_hold`): True when woken by one."""
        return await self._sleep_or_wake(seconds, self._hold_set)

    async def _sleep_or_wake(self, seconds: float, event: anyio.Event) -> bool:
        """Sleep `seconds` with the injected `sleep`, or until `event` is set: True when the event ended it."""
        woken = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal woken
                await event.wait()
                woken = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self._sleep(seconds)
            tg.cancel_scope.cancel()
        return woken

    def _signal_hold(self) -> None:
        """Wake the calls waiting for their turn: a backoff may hold them now."""
        event, self._hold_set = self._hold_set, anyio.Event()
        event.set()

    async def _refresh(self, reason: str) -> Token:
        now = self.clock()
        try:
            async with self._paced("token"):
                now = self.clock()
                token = await self.flow.fetch(now)
        except UpstreamError as exc:
            self._failed(exc, now, reason)
            raise
        except Exception as exc:  # a bug or an unexpected library error must not kill the loop
            error = UpstreamError("wlidd", f"unexpected {type(exc).__name__} while fetching", code="internal")
            self._failed(error, now, reason)
            raise error from None
        self._succeeded(token, reason)
        return token

    def _failed(self, exc: UpstreamError, now: dt.datetime, reason: str) -> None:
        self.failures += 1
        self._next_trigger = "retry"
        self.last_error, self.last_error_at = exc, now
        if exc.permanent:  # trying again soon cannot help: backoff_max at once, bounded by the last good token
            self.next_refresh = retry_at(now, self._permanent_delay(exc), self.current, self.config.skew)
        else:
            self.next_refresh = after_failure(
                self.backoff, now, self.rng, self.current, self.config.skew, exc.retry_after
            )
        if self.metrics is not None:
            self.metrics.token_refreshes.labels(self.name, "failure").inc()
            self.metrics.token_failures.labels(self.name, exc.reason).inc()
        self._log.warning(
            "token refresh failed",
            trigger=reason,
            reason=exc.reason,
            detail=exc.message,
            permanent=exc.permanent,
            failures=self.failures,
            retry_in=round((self.next_refresh - now).total_seconds(), 3),
            serving_last_good=self.servable(now) is not None,
        )

    def _succeeded(self, token: Token, reason: str) -> None:
        first = self.current is None
        self.current = token
        self.failures = 0
        self.backoff.reset()
        self.last_refresh = token.issued_at
        self.next_refresh = self.policy.next_refresh(token, self.rng, first=first)
        self._next_trigger = "scheduled"
        if self.policy.short_lifetime(token) and not self._warned_short:
            self._warned_short = True
            self._log.warning(
                "short token lifetime",
                detail="the upstream granted less than 4 x skew: the token is served until a quarter of its "
                "lifetime is left (not skew), and refreshed at most twice per lifetime",
                lifetime=round(token.lifetime, 1),
                skew=self.config.skew,
                serve_margin=round(token.serve_margin(self.config.skew), 1),
            )
        if self.metrics is not None:
            self.metrics.token_refreshes.labels(self.name, "success").inc()
            self.metrics.token_expiry.labels(self.name).set(token.expire_time.timestamp())
        self._log.info(
            "token refreshed",
            trigger=reason,
            expire_time=iso_z(token.expire_time),
            next_refresh=iso_z(self.next_refresh),
            lifetime=int(token.lifetime),
        )
        self.published += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def changes(self) -> AsyncIterator[Token]:
        """The latest token obtained (if any), then every newer one, as each is cached: what sinks follow
        (wlidd.sinks.follow_token). A slow consumer skips to the latest (as CredentialWatcher.changes)."""
        seen = 0
        while True:
            while self.published <= seen:
                await self._changed.wait()
            seen = self.published
            token = self.current
            assert token is not None  # set before `published` counts it
            yield token

    async def wait_until_servable(self, timeout: float) -> Token:
        """For require_at_start: the first servable token within `timeout`, else WlidError."""
        with anyio.move_on_after(timeout):
            while (token := self.servable()) is None:
                await self._changed.wait()
            return token
        detail = self.last_error.message if self.last_error else "no answer yet"
        raise WlidError(f"token {self.name!r} could not be obtained within {timeout:g}s: {detail}")

    def trigger(self, reason: str) -> None:
        """Refresh as soon as possible (e.g. "svid_rotated": the SVID the token depends on rotated); the
        refresh is logged with `reason` as its trigger."""
        self._log.info("refresh requested", trigger=reason)
        self.next_refresh = self.clock()
        self._next_trigger = reason
        self._wake.set()

    async def _nap(self, seconds: float) -> None:
        """The refresh loop's sleep: `seconds` (at most MAX_SLEEP) on the injected `sleep`, or until `trigger`
        or a cold request wakes the loop."""
        await self._sleep_or_wake(max(0.0, min(seconds, MAX_SLEEP)), self._wake)
        self._wake = anyio.Event()

    def _idle(self) -> bool:
        if not self.config.on_demand:
            return False
        return self.last_request is None or self.monotonic() - self.last_request > self.config.idle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background refresh loop; never raises on upstream failures."""
        async with anyio.create_task_group() as tg:
            if self.watcher is not None and self.config.flow == "x509-sts":
                tg.start_soon(self._follow_rotations, self.watcher)
            task_status.started()
            if not (self.config.require_at_start or self.config.on_demand):
                delay = start_delay(self.rng, self.config.start_delay)
                self.next_refresh = self.clock() + dt.timedelta(seconds=delay)
                self._log.info("first fetch scheduled", delay=round(delay, 3))
            while True:
                if self._idle():
                    await self._nap(MAX_SLEEP)  # on demand and idle: refresh nothing until asked
                    continue
                now = self.clock()
                due = self.next_refresh or now
                if now >= due:
                    with contextlib.suppress(UpstreamError):
                        await self.refresh(self._next_trigger or self.first_trigger)
                    continue
                await self._nap((due - now).total_seconds())

    async def _follow_rotations(self, watcher: IdentityChanges) -> None:
        async for state in watcher.changes():
            token = self.current
            if token is not None and token.identity_version is not None and token.identity_version < state.version:
                self.trigger("svid_rotated")

    def status(self, now: dt.datetime) -> dict[str, Any]:
        token = self.current
        error = self.last_error
        return {
            "flow": self.config.flow,
            "identity": self.config.identity,
            "valid": self.servable(now) is not None,
            "required": self.config.require_at_start,
            "on_demand": self.config.on_demand,
            "expire_time": iso_z(token.expire_time) if token else None,
            "seconds_left": max(0, int(token.seconds_left(now))) if token else None,
            "last_refresh": iso_z(self.last_refresh),
            "next_refresh": iso_z(self.next_refresh),
            "failures": self.failures,
            "upstream_calls": self.upstream_calls,
            "last_error": (
                {
                    "reason": error.reason,
                    "status": error.status,
                    "message": error.message,
                    "permanent": error.permanent,
                    "at": iso_z(self.last_error_at),
                }
                if error
                else None
            ),
        }

    # ---- access tokens with the scopes a caller names (the metadata API's token?scopes=) ---------
    # Self-contained (its state, ScopedTokens below, is made on first use), so the rest of the class is
    # untouched by it.
    _scoped: ScopedTokens | None = None

    async def scoped_token(self, scopes: tuple[str, ...], *, caller: int | None = None, covered: bool = False) -> Token:
        """An access token with exactly `scopes` for the local caller `caller` (a uid; None: an internal
        caller): IAM generateAccessToken for the impersonated service account, with `impersonate.lifetime`
        and `delegates` (least privilege for a caller that names its scopes).

        The guards of every upstream call: spaced and counted by `_paced` (kind "scoped_token"); the
        federated token it is minted with comes from the source's own refresh (single-flight, its backoff),
        never a chain of its own; one mint per scope set at a time; the tokens of the last
        `ScopedLimits.cache_size` scope sets served while they have more than `policy.keep` left (the rule
        of the source's own token; below it a request re-mints, and the cached token is served while it is
        above its serving margin only when no new one can be had); mints charged to the caller's bucket and
        to the source's (`ScopedLimits`); after a failure its error is the answer until the backoff passes
        (a transient one: for every set, at least Retry-After; a permanent one: for its set, `backoff_max`),
        and mints waiting for their turn then give it up.

        `covered`: the source's own token covers every scope asked for (the caller may have it by asking
        without scopes), so when no scoped token can be had (a rate limit, a failure, a backoff) that token
        is the answer instead of the error.

        Raises RateLimited 429, TokenUnavailable 503 (the exchange it needs is backing off), UpstreamError
        (the mint failed or is backing off; the source impersonates no service account)."""
        state = self._scoped
        if state is None:
            state = self._scoped = ScopedTokens(self.scoped_limits, self.config, self.monotonic())
        key = frozenset(scopes)
        cached = state.cache.get(key)
        if cached is not None and self.policy.fresh(cached, self.clock()):
            state.cache.move_to_end(key)
            return cached
        try:
            return await self._new_scoped_token(state, key, caller)
        except WlidError as exc:
            cached = state.cache.get(key)  # due, not expired: better than no token
            if cached is not None and cached.usable_at(self.clock(), self.config.skew):
                state.cache.move_to_end(key)
                return cached
            if not covered:
                raise
            try:
                token = await self.get()
            except WlidError:
                raise exc from None
            log.limited(
                "info",
                "scoped token not minted; serving the token, whose scopes cover the request",
                key={"source": self.name, "reason": exc.reason, "uid": caller},
                detail=exc.message,
            )
            return token

    async def _new_scoped_token(self, state: ScopedTokens, key: frozenset[str], caller: int | None) -> Token:
        """A newly minted token for the scope set `key` (or the one minted for it in flight)."""
        flight = state.flights.get(key)
        if flight is not None:  # someone is minting this set: share that mint
            await flight.done.wait()
            if flight.value is not None:
                return flight.value
            raise flight.error or TokenUnavailable(self.name, "the scoped token fetch was cancelled")
        if (last := state.last_error(key, self.clock())) is not None:
            raise last
        if len(state.flights) >= state.limits.max_inflight:
            raise RateLimited(
                f"token {self.name!r} is already minting {len(state.flights)} scoped tokens; retry shortly", 1
            )
        charged = state.charge(self.name, caller, self.monotonic())
        flight = state.flights[key] = _Flight[Token]()
        try:
            flight.value = await self._mint_scoped(state, key, flight)
            state.succeeded(key, flight.value, self.clock())
            return flight.value
        except WlidError as exc:
            flight.error = exc
            raise
        finally:
            state.flights.pop(key, None)
            if flight.call is None or not flight.call.went_upstream:  # held, or failed before sending
                _refund(charged, self.monotonic())
            flight.done.set()

    async def _mint_scoped(self, state: ScopedTokens, key: frozenset[str], flight: _Flight[Token]) -> Token:
        """One IAM generateAccessToken call for the scope set `key` (after the source's own refresh when the
        federated token it needs is missing or within `skew` of its expiry). Its turn given up, nothing
        sent, when a backoff holds the set by then (`_paced`)."""
        scopes = tuple(sorted(key))
        if self.config.impersonate is None:
            raise UpstreamError(
                "wlidd",
                f"token {self.name!r} impersonates no service account, so it mints no token with other scopes",
                code="other",
                retryable=False,
            )
        if self.flow.needs_federated(self.clock()):
            if not self._may_fetch_now(self.clock()):  # do not bypass the backoff (as `get`)
                raise self._no_federated_token()
            await self.refresh("scoped_token")
            if self.flow.needs_federated(self.clock()):  # joined a refresh that failed (it served the last good)
                raise self._no_federated_token()
        async with self._paced("scoped_token", lambda: state.last_error(key, self.clock())) as call:
            flight.call = call
            sent = self.clock()
            try:
                value, expiry = await self.flow.fetch_scoped_token(scopes, sent)
            except UpstreamError as exc:
                self._scoped_failed(state, key, exc)
                raise
            except Exception as exc:  # a bug or an unexpected library error: a clear error, no details leaked
                error = UpstreamError("wlidd", f"unexpected {type(exc).__name__} while minting", code="internal")
                self._scoped_failed(state, key, error)
                raise error from None
        self._log.info("scoped token minted", scopes=list(scopes), expire_time=iso_z(expiry))
        return Token(value, expiry, sent, self.name)

    def _scoped_failed(self, state: ScopedTokens, key: frozenset[str], exc: UpstreamError) -> None:
        state.failed(key, exc, self.clock(), self.rng)
        self._signal_hold()
        if self.metrics is not None:
            self.metrics.token_failures.labels(self.name, exc.reason).inc()
        self._log.warning("scoped token mint failed", reason=exc.reason, detail=exc.message)


def _seconds_until(when: dt.datetime | None, now: dt.datetime) -> float | None:
    """Whole seconds from `now` until `when` (at least 1), or None when nothing is planned."""
    if when is None:
        return None
    return max(1, math.ceil((when - now).total_seconds()))


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


class ScopedTokens:
    """One source's scoped tokens: the LRU of tokens per scope set, the mints in flight, the budgets of
    mints (per caller and for the source), and the backoff after failures (a transient failure holds every
    set, a permanent one its own)."""

    def __init__(self, limits: ScopedLimits, config: TokenConfig, monotonic_now: float) -> None:
        self.limits = limits
        self.cache: OrderedDict[frozenset[str], Token] = OrderedDict()
        self.flights: dict[frozenset[str], _Flight[Token]] = {}
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
                return _held(error, until, now, f"refused for these scopes; not asked again before {iso_z(until)}")
            del self.refused[key]
        if self.hold is not None and now < self.hold[1]:
            error, until = self.hold
            return _held(error, until, now, f"scoped tokens are backing off; next attempt {iso_z(until)}")
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
