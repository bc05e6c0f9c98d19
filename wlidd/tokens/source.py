"""RefreshingSource: a token source's own token, kept fresh in the background and served from memory, and
the pace of all its upstream calls (wlidd.tokens.manager.TokenSource adds the tokens it mints for callers).

- Serving (`get`) reads the current token and judges its expiry by the wall clock on every call:
  nothing within `skew` of expiry is ever served; callers get TokenUnavailable (503) with the reason.
- One upstream fetch at a time per source (single-flight): concurrent callers share it.
- Refresh at `refresh_at` of the lifetime ± `jitter`; after a failure, full-jitter exponential
  backoff (at least Retry-After), bounded by what remains of the last good token.
- `min_interval` between upstream calls and a random `start_delay` protect a fleet's shared quota;
  `on_demand` sources fetch on first request and stop refreshing after `idle` without requests.
- Every upstream call, access-token chains and ID-token and scoped mints alike, goes through `_paced`:
  spaced by `min_interval` in arrival order, counted in `upstream_calls` and wlidd_token_upstream_calls
  when something was sent (a ca_file that cannot be loaded sends nothing: wlidd.tokens.flows.attempts.attempt).
  A mint waiting for its turn re-checks the backoff when the turn comes and whenever a failure sets one:
  held, it gives its turn up and answers from the last error, nothing sent and nothing charged.
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
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

from wlidd.clock import Clock, iso_z, utc_now
from wlidd.config import TokenConfig
from wlidd.errors import TokenUnavailable, UpstreamError, WlidError
from wlidd.logs import get_logger
from wlidd.metrics import Metrics
from wlidd.tokens.flows import Flow
from wlidd.tokens.flows.attempts import Attempt, attempt
from wlidd.tokens.limits import (
    CallerBuckets,
    Flight,
    IdTokenLimits,
    MintBackoff,
    ScopedLimits,
    TokenBucket,
    seconds_until,
)
from wlidd.tokens.model import IdentityChanges, Token
from wlidd.tokens.pacing import Pacer, sleep_or_wake
from wlidd.tokens.schedule import Backoff, RefreshPolicy, after_failure, retry_at, start_delay

log = get_logger("wlidd.tokens")

MAX_SLEEP = 30.0  # the wall clock is re-checked at least this often (suspend/resume, clock jumps)


class RefreshingSource:
    """One configured token: state, schedule, and the refresh loop. Its state includes that of the tokens
    TokenSource mints for callers (made here, with the rest, from the same arguments)."""

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
        self._serve_margin: tuple[Token | None, float, float] = (None, 0.0, 0.0)  # (token, skew, margin): serve_now
        self.failures = 0
        self.upstream_calls = 0
        self.last_error: UpstreamError | None = None
        self.last_error_at: dt.datetime | None = None
        self.last_refresh: dt.datetime | None = None
        self.next_refresh: dt.datetime | None = None
        self.last_request: float | None = None
        self._pacer = Pacer(lambda: self.config.min_interval, self.monotonic, self._sleep)  # upstream call turns
        self._inflight: anyio.Event | None = None
        self._wake = anyio.Event()
        self._changed = anyio.Event()  # set (and replaced) whenever a token is published
        self.published = 0  # tokens published so far (`current` is the latest)
        self.id_limits = id_limits or IdTokenLimits()
        self.scoped_limits = scoped_limits or ScopedLimits()
        self._id_cache: OrderedDict[str, Token] = OrderedDict()  # LRU, at most cache_size; Token.value: the JWT
        self._id_flights: dict[str, Flight[str]] = {}  # audiences being minted; an entry lives as long as its mint
        self._id_callers = CallerBuckets(
            self.id_limits.caller_burst, self.id_limits.caller_per_minute, self.id_limits.max_callers
        )
        self._id_new_audiences = TokenBucket(
            self.id_limits.new_audiences_burst, self.id_limits.new_audiences_per_minute / 60, self.monotonic()
        )
        # ID-token mints back off like refreshes: a transient failure holds every mint until its time (then
        # one probe mint goes first); a permanent refusal holds its audience for backoff_max.
        self._id_backoff = MintBackoff[str](
            config.backoff_min, config.backoff_max, self.id_limits.refused_audiences, "ID tokens", "this audience"
        )
        self._id_probe: Flight[str] | None = None  # the mint retrying the upstream after a hold passed
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

    def serve_now(self) -> Token | None:
        """`servable()` (the token to serve now, if one is at hand), recorded as a request as `get` records
        it; None when only `get` can answer (a fetch first, or its refusal). For a server answering without
        waiting: a token's serving margin is worked out once (per token and skew), not per request."""
        token, skew = self.current, self.config.skew
        if token is None:
            return None
        margin = self._serve_margin
        if margin[0] is not token or margin[1] != skew:
            margin = self._serve_margin = (token, skew, token.serve_margin(skew))
        if token.seconds_left(self.clock()) <= margin[2]:  # Token.usable_at, with the margin known
            return None
        self.last_request = self.monotonic()
        return token

    async def get(self) -> Token:
        """The token to serve now, fetching it first when nothing was fetched yet or on demand."""
        token = self.serve_now()
        if token is not None:
            return token
        self.last_request = self.monotonic()
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
        wait = seconds_until(planned, now) if planned is not None and planned > now else None
        raise TokenUnavailable(self.name, self.not_servable_reason(now), wait)

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
        """The guard around every upstream call: the block runs at its turn (Pacer.take_turn: `min_interval`
        after the previous call, in arrival order), and is counted in `upstream_calls` and
        wlidd_token_upstream_calls{kind} when it sent something (the Attempt it yields says). With `held`
        (the error to answer while a backoff holds the call, else None), a held call raises that error
        instead of running: its turn given up, nothing sent, nothing counted."""
        await self._pacer.take_turn(held)
        with attempt() as call:
            try:
                yield call
            finally:
                if call.went_upstream:
                    self.upstream_calls += 1
                    if self.metrics is not None:
                        self.metrics.token_upstream_calls.labels(self.name, kind).inc()

    def _signal_hold(self) -> None:
        """Wake the calls waiting for their turn: a backoff may hold them now."""
        self._pacer.signal_hold()

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
            self.next_refresh = retry_at(
                now, self.backoff.after_permanent(exc.retry_after), self.current, self.config.skew
            )
        else:
            self.next_refresh = after_failure(
                self.backoff, now, self.rng, self.current, self.config.skew, exc.retry_after
            )
        if self.metrics is not None:
            self.metrics.token_refreshes.labels(self.name, "failure").inc()
        self._count_failure(
            "token refresh failed",
            exc,
            trigger=reason,
            permanent=exc.permanent,
            failures=self.failures,
            retry_in=round((self.next_refresh - now).total_seconds(), 3),
            serving_last_good=self.servable(now) is not None,
        )

    def _count_failure(self, event: str, exc: UpstreamError, **fields: object) -> None:
        """An upstream call of this source failed (a refresh, a mint): counted in wlidd_token_failures by its
        reason, and logged as a warning `event` with the reason, the upstream's message (`detail`) and `fields`."""
        if self.metrics is not None:
            self.metrics.token_failures.labels(self.name, exc.reason).inc()
        self._log.warning(event, reason=exc.reason, detail=exc.message, **fields)

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
        await sleep_or_wake(self._sleep, max(0.0, min(seconds, MAX_SLEEP)), self._wake)
        self._wake = anyio.Event()

    def _idle(self) -> bool:
        if not self.config.on_demand:
            return False
        return self.last_request is None or self.monotonic() - self.last_request > self.config.idle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background refresh loop; never raises on upstream failures."""
        async with anyio.create_task_group() as tg:
            if self.watcher is not None and self.flow.bound_to_svid:
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
            if token is None:
                # the identity loaded at last (a node provisioned after wlidd started): fetch now, not when
                # the backoff of the failures "no valid SVID loaded" runs out (up to backoff_max)
                if self.last_error is not None and self.last_error.reason == "identity_unavailable":
                    self.trigger("identity_loaded")
            elif token.identity_version is not None and token.identity_version < state.version:
                self.trigger("svid_rotated")
