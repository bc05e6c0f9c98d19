"""TokenSource: one named token, kept fresh in the background and served from memory (its own token, the
refresh loop and the pace of its upstream calls: wlidd.tokens.source.RefreshingSource), and the tokens it
mints for callers:

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
"""

from __future__ import annotations

import jwt

from wlidd.clock import iso_z
from wlidd.errors import ApiError, RateLimited, TokenUnavailable, UpstreamError, WlidError
from wlidd.logs import get_logger
from wlidd.tokens.limits import Flight, TokenBucket, charge, in_flight, seconds_until
from wlidd.tokens.model import Token
from wlidd.tokens.providers.expiry import id_token_expiry
from wlidd.tokens.scoped import ScopedTokens
from wlidd.tokens.source import RefreshingSource

log = get_logger("wlidd.tokens")


class TokenSource(RefreshingSource):
    """One configured token: its own (RefreshingSource), and the ID tokens and scoped tokens it mints for callers."""

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
            return await flight.outcome(self.name, "ID token")
        if (last := self._id_backoff.answer(audience, self.clock())) is not None:
            raise last
        probe = self._id_probe
        if self._id_backoff.hold is not None and probe is not None:  # another mint probes the upstream first
            await probe.done.wait()
            return await self.id_token(audience, caller=caller)
        limits = self.id_limits
        if len(self._id_flights) >= limits.max_inflight:
            raise RateLimited(
                f"token {self.name!r} is already minting {len(self._id_flights)} ID tokens; retry shortly", 1
            )
        charged = self._charge_id_token(audience, caller)
        with in_flight(self._id_flights, audience, charged, self.monotonic) as flight:
            if self._id_backoff.hold is not None:  # the hold has passed: this mint probes the upstream
                self._id_probe = flight
            try:
                flight.value = await self._mint_id_token(audience, flight)
            finally:
                if self._id_probe is flight:
                    self._id_probe = None
            return flight.value

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
        served = "audiences already fetched are still served"
        buckets: list[tuple[TokenBucket, str]] = []
        if caller is not None:
            buckets.append(self._id_callers.share(caller, now, self.name, "ID tokens for new audiences", served))
        if audience not in self._id_cache:
            why = (
                f"token {self.name!r} minted ID tokens for more new audiences than "
                f"{limits.new_audiences_per_minute:g} per minute (all callers together); {served}"
            )
            buckets.append((self._id_new_audiences, why))
        return charge(buckets, now)

    async def _mint_id_token(self, audience: str, flight: Flight[str]) -> str:
        """One upstream ID-token call (after an STS exchange through `refresh` when the flow needs one:
        single-flight, counted, its token kept as the source's, its failure backing off the source). Its
        turn given up, nothing sent, when a backoff holds the audience by then (`_paced`)."""
        await self._federated("id_token")
        minter = self.flow.id_token_minter
        async with self._paced("id_token", lambda: self._id_backoff.answer(audience, self.clock())) as call:
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
        self._id_backoff.succeeded(audience)
        self._store_id_token(audience, Token(value, expiry, sent, self.name))
        self._log.info("id token fetched", audience=audience, expire_time=iso_z(expiry))
        return value

    async def _federated(self, trigger: str) -> None:
        """The federated token a mint needs, renewed through `refresh` (its trigger `trigger`) when the flow
        needs one now; `_no_federated_token` raised when it cannot be had (a backoff holds it, the refresh
        failed)."""
        if self.flow.needs_federated(self.clock()):
            if not self._may_fetch_now(self.clock()):  # do not bypass the backoff (as `get`)
                raise self._no_federated_token()
            await self.refresh(trigger)
            if self.flow.needs_federated(self.clock()):  # joined a refresh that failed (it served the last good)
                raise self._no_federated_token()

    def _no_federated_token(self) -> WlidError:
        """Why no token can be minted now: the STS exchange it needs failed and backs off (its error, with
        the seconds until the next attempt)."""
        note = "the federated token that mints need could not be renewed"
        now, until = self.clock(), self.next_refresh
        if until is not None:
            note += f"; next attempt {iso_z(until)}"
        if self.last_error is None:
            return TokenUnavailable(self.name, note, seconds_until(until, now))
        answer = self.last_error.again(note)
        answer.retry_after = seconds_until(until, now)
        return answer

    def _id_token_failed(self, audience: str, exc: UpstreamError) -> None:
        """Back ID tokens off: a transient failure holds every mint for the next backoff step (at least
        Retry-After); a permanent one holds `audience` for backoff_max (at least Retry-After)."""
        now = self.clock()
        until = self._id_backoff.failed(audience, exc, now, self.rng)
        self._signal_hold()
        retry_in = round((until - now).total_seconds(), 3)
        self._count_failure("id token fetch failed", exc, audience=audience, permanent=exc.permanent, retry_in=retry_in)

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

    # ---- access tokens with the scopes a caller names (the metadata API's token?scopes=) ---------
    # Self-contained (its state, wlidd.tokens.scoped.ScopedTokens, is made on first use), so the rest of the
    # class is untouched by it.
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
            return await flight.outcome(self.name, "scoped token")
        if (last := state.backoff.answer(key, self.clock())) is not None:
            raise last
        if len(state.flights) >= state.limits.max_inflight:
            raise RateLimited(
                f"token {self.name!r} is already minting {len(state.flights)} scoped tokens; retry shortly", 1
            )
        charged = state.charge(self.name, caller, self.monotonic())
        with in_flight(state.flights, key, charged, self.monotonic) as flight:
            flight.value = await self._mint_scoped(state, key, flight)
            state.succeeded(key, flight.value, self.clock())
            return flight.value

    async def _mint_scoped(self, state: ScopedTokens, key: frozenset[str], flight: Flight[Token]) -> Token:
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
        await self._federated("scoped_token")
        async with self._paced("scoped_token", lambda: state.backoff.answer(key, self.clock())) as call:
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
        state.backoff.failed(key, exc, self.clock(), self.rng)
        self._signal_hold()
        self._count_failure("scoped token mint failed", exc)
