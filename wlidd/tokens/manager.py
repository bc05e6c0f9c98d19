"""TokenSource: one named token, kept fresh in the background and served from memory.

- Serving (`get`) reads the current token and judges its expiry by the wall clock on every call:
  nothing within `skew` of expiry is ever served; callers get TokenUnavailable (503) with the reason.
- One upstream fetch at a time per source (single-flight): concurrent callers share it.
- Refresh at `refresh_at` of the lifetime ± `jitter`; after a failure, full-jitter exponential
  backoff (at least Retry-After), bounded by what remains of the last good token.
- `min_interval` between upstream calls and a random `start_delay` protect a fleet's shared quota;
  `on_demand` sources fetch on first request and stop refreshing after `idle` without requests.
- x509-sts sources refresh at once when their SVID rotates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import jwt
from anyio.abc import TaskStatus

from wlidd.config import TokenConfig
from wlidd.errors import ApiError, UpstreamError, WlidError
from wlidd.logs import get_logger
from wlidd.metrics import Metrics
from wlidd.sinks import publish_token
from wlidd.svid.load import Clock, iso_z, utc_now
from wlidd.tokens.flows import Flow
from wlidd.tokens.model import Token
from wlidd.tokens.schedule import Backoff, RefreshPolicy, after_failure, start_delay
from wlidd.watch import CredentialWatcher

log = get_logger("wlidd.tokens")

MAX_SLEEP = 30.0  # the wall clock is re-checked at least this often (suspend/resume, clock jumps)


class TokenUnavailable(ApiError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(503, "token_unavailable", f"token {name!r} is not available: {message}")


class TokenSource:
    """One configured token: state, schedule, and the refresh loop."""

    def __init__(
        self,
        name: str,
        config: TokenConfig,
        flow: Flow,
        *,
        watcher: CredentialWatcher | None = None,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
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
        self.backoff = Backoff(config.backoff_min, config.backoff_max)
        self.current: Token | None = None
        self.failures = 0
        self.upstream_calls = 0
        self.last_error: UpstreamError | None = None
        self.last_error_at: dt.datetime | None = None
        self.last_refresh: dt.datetime | None = None
        self.next_refresh: dt.datetime | None = None
        self.last_request: float | None = None
        self._last_call: float | None = None
        self._inflight: anyio.Event | None = None
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._id_tokens: dict[str, tuple[str, dt.datetime]] = {}
        self._id_locks: dict[str, anyio.Lock] = {}
        self._log = log.bind(source=name, flow=config.flow)

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
            return f"{prefix}; last error: {self.last_error.message}{when}"
        return prefix

    async def get(self) -> Token:
        """The token to serve now, fetching it first when nothing was fetched yet or on demand."""
        self.last_request = self.monotonic()
        token = self.servable()
        if token is not None:
            return token
        if self.failures == 0 or self.config.on_demand:
            # Cold (never fetched, start delay pending, or on-demand idle): demand wins over the delay.
            # After failures, callers do not bypass the backoff: they get the reason instead.
            self._wake.set()
            with contextlib.suppress(UpstreamError):
                await self.refresh("request")
            token = self.servable()
            if token is not None:
                return token
        raise TokenUnavailable(self.name, self.not_servable_reason(self.clock()))

    async def id_token(self, audience: str) -> str:
        """An ID token for `audience`, cached until `skew` before its exp; one fetch per audience at a time."""
        lock = self._id_locks.setdefault(audience, anyio.Lock())
        async with lock:
            cached = self._id_tokens.get(audience)
            now = self.clock()
            if cached is not None and (cached[1] - now).total_seconds() > self.config.skew:
                return cached[0]
            value = await self.flow.fetch_id_token(audience, now)
            try:
                claims = jwt.decode(value, options={"verify_signature": False})
                expiry = dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)
            except (jwt.PyJWTError, KeyError, ValueError, TypeError):
                raise UpstreamError(
                    self.config.flow, "the ID token has no readable exp claim", code="bad_response"
                ) from None
            if len(self._id_tokens) > 256:
                self._id_tokens.clear()
            self._id_tokens[audience] = (value, expiry)
            self._log.info("id token fetched", audience=audience, expire_time=iso_z(expiry))
            return value

    # ---- refreshing ------------------------------------------------------------------------
    async def refresh(self, reason: str) -> Token:
        """Fetch a new token (single-flight: concurrent callers share one upstream call)."""
        inflight = self._inflight
        if inflight is not None:
            await inflight.wait()
            token = self.servable()
            if token is None:
                raise self.last_error or UpstreamError(self.config.flow, "refresh failed", code="unknown")
            return token
        self._inflight = anyio.Event()
        try:
            return await self._refresh(reason)
        finally:
            done, self._inflight = self._inflight, None
            done.set()

    async def _refresh(self, reason: str) -> Token:
        if self._last_call is not None:
            wait = self._last_call + self.config.min_interval - self.monotonic()
            if wait > 0:
                await self._sleep(wait)
        self._last_call = self.monotonic()
        self.upstream_calls += 1
        now = self.clock()
        try:
            token = await self.flow.fetch(now)
        except UpstreamError as exc:
            self._failed(exc, now, reason)
            raise
        except Exception as exc:  # a bug or an unexpected library error must not kill the loop
            error = UpstreamError(self.config.flow, f"unexpected {type(exc).__name__} while fetching", code="internal")
            self._failed(error, now, reason)
            raise error from None
        self._succeeded(token, reason)
        await publish_token(self.config.sinks, token, self.clock(), self.name)
        return token

    def _failed(self, exc: UpstreamError, now: dt.datetime, reason: str) -> None:
        self.failures += 1
        self.last_error, self.last_error_at = exc, now
        self.next_refresh = after_failure(self.backoff, now, self.rng, self.current, self.config.skew, exc.retry_after)
        if self.metrics is not None:
            self.metrics.token_refreshes.labels(self.name, "failure").inc()
            self.metrics.token_failures.labels(self.name, exc.reason).inc()
        self._log.warning(
            "token refresh failed",
            trigger=reason,
            reason=exc.reason,
            detail=exc.message,
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
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_until_servable(self, timeout: float) -> Token:
        """For require_at_start: the first servable token within `timeout`, else WlidError."""
        with anyio.move_on_after(timeout):
            while (token := self.servable()) is None:
                await self._changed.wait()
            return token
        detail = self.last_error.message if self.last_error else "no answer yet"
        raise WlidError(f"token {self.name!r} could not be obtained within {timeout:g}s: {detail}")

    def trigger(self, reason: str) -> None:
        """Refresh as soon as possible (e.g. the SVID the token depends on rotated)."""
        self._log.info("refresh requested", trigger=reason)
        self.next_refresh = self.clock()
        self._wake.set()

    async def _nap(self, seconds: float) -> None:
        with anyio.move_on_after(max(0.0, min(seconds, MAX_SLEEP))):
            await self._wake.wait()
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
                        await self.refresh("scheduled")
                    continue
                await self._nap((due - now).total_seconds())

    async def _follow_rotations(self, watcher: CredentialWatcher) -> None:
        async for state in watcher.changes():
            token = self.current
            if token is not None and token.identity_version is not None and token.identity_version < state.version:
                self.trigger("svid-rotated")

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
                    "at": iso_z(self.last_error_at),
                }
                if error
                else None
            ),
        }
