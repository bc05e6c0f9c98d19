"""Sans-IO refresh policy: when to refresh, how to back off. Clock values and randomness come in.

next_refresh(token, rng)        issued_at + lifetime × (refresh_at ± jitter), pulled earlier by
                                  - the client rule: refresh while ≥ `keep_left` (300 s) + a random
                                    0…jitter × lifetime are left, so a served token never looks stale to
                                    the client libraries that refresh early (Node < 300 s left, Python
                                    < 225 s; the metadata server hands a token out with ≥ 4–5 min left);
                                  - the margin: at the latest `margin(token)` before expiry;
                                but neither pulls it before half the lifetime (MIN_REFRESH_FRACTION):
                                an upstream that grants short lifetimes is called at most twice per
                                lifetime (and never more often than `min_interval`).
Backoff.next(rng, retry_after)  full-jitter exponential: uniform(min, min(max, min·2^n)), at least
                                Retry-After; `reset()` after a success
retry_at(...)                   the next attempt after a failure, bounded so that a still-valid
                                last good token gets at least one more try before it stops being served
start_delay(rng, spread)        a random delay before a source's first fetch (fleet boot storms)
TRIGGERS                        why a source fetches: the `trigger` of its "token refreshed" and
                                "token refresh failed" log lines

keep(token), fresh(token, now)  the same rule for tokens a source caches for callers (ID tokens, scoped
                                tokens), which it re-mints on request instead of on a schedule: a
                                cached token is served as is while more than min(keep_left, L/2)
                                (never less than its serving margin) is left, and re-minted below that
What follows for a token of lifetime L refreshed in time (defaults; proof in tests/test_schedule.py):
  - it is replaced while at least min(keep_left, L/2) seconds are left: ≥ 300 s for every L ≥ 600 s;
  - steady-state refreshes are at least min(refresh_at − jitter, 1/2) × L apart (L/2 by default);
  - it is served until serve_margin = min(skew, L/4) before its expiry (wlidd.tokens.model.Token).

Client thresholds: google-auth-library-nodejs src/auth/authclient.ts
DEFAULT_EAGER_REFRESH_THRESHOLD_MILLIS = 5 * 60 * 1000, used by oauth2client.ts isTokenExpiring();
google-auth-library-python google/auth/_helpers.py REFRESH_THRESHOLD = 3 min 45 s, used by
credentials.py `expired`; the metadata server's own cache keeps a token until 5 min before its expiry
(google-auth-library-java PR #749), 4 min at the least (golang/oauth2 commit "google: update compute token
refresh", v0.21.0).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

from wlidd.tokens.model import Token

MAX_RETRY_AFTER = 3600.0
FIRST_REFRESH_FLOOR = 0.1  # the earliest first refresh, as a fraction of the lifetime
CLIENT_REFRESH_THRESHOLD = 300.0  # seconds: Node's eager refresh threshold, the strictest client's
MIN_REFRESH_FRACTION = 0.5  # the margins never pull a refresh earlier than this share of the lifetime

# Why a token source fetches its own token (TokenSource.refresh's `reason`, logged as `trigger`). The
# refresh loop fires with the trigger that planned its next attempt: "start" (or "config") for the first
# fetch, "scheduled" after a success, "retry" after a failure, or the reason a `TokenSource.trigger`
# call gave ("svid_rotated"); callers fetch with "cold", "id_token" or "scoped_token". A caller that
# joins a fetch in flight adds no line: the line names what started the upstream call.
TRIGGERS: dict[str, str] = {
    "start": "the source's first fetch after the daemon started (after start_delay)",
    "config": "the first fetch of a source a config reload added or changed",
    "scheduled": "the planned refresh: next_refresh after the last success",
    "retry": "the next attempt after a failed fetch (backoff, at least Retry-After)",
    "svid_rotated": "the SVID an x509-sts token is bound to rotated: refreshed at once",
    "identity_loaded": "the identity a source needs loaded after its fetches failed without it: fetched at once",
    "cold": "a caller found no servable token (none fetched yet, or an on-demand source woken from idle)",
    "id_token": "an ID-token mint needed the federated token, which was missing or near its expiry",
    "scoped_token": "a scoped-token mint needed the federated token, which was missing or near its expiry",
}


@dataclass(frozen=True)
class RefreshPolicy:
    refresh_at: float = 0.8
    jitter: float = 0.1
    skew: float = 60.0
    min_interval: float = 1.0
    keep_left: float = CLIENT_REFRESH_THRESHOLD

    def margin(self, token: Token) -> float:
        """Seconds before expiry by which the refresh is due: the serving margin or 10 % of the lifetime,
        whichever is more — so a failed refresh has time for retries while the token is still served."""
        return max(token.serve_margin(self.skew), 0.1 * token.lifetime)

    def keep(self, token: Token) -> float:
        """Seconds left below which a cached token (an ID token, a scoped token) is replaced before it is
        served again: `keep_left` (300 s), or half the lifetime when that is less (MIN_REFRESH_FRACTION),
        as `next_refresh` keeps a source's own token; never less than the serving margin."""
        return max(min(self.keep_left, MIN_REFRESH_FRACTION * token.lifetime), token.serve_margin(self.skew))

    def fresh(self, token: Token, now: dt.datetime) -> bool:
        """True when a cached token may be served without trying for a new one first (`keep`)."""
        return token.seconds_left(now) > self.keep(token)

    def short_lifetime(self, token: Token) -> bool:
        """True when the lifetime is too short for the configured `skew` (≤ 4 × skew), so the serving
        margin is a quarter of the lifetime instead: worth a warning, once per source."""
        return token.serve_margin(self.skew) < self.skew

    def next_refresh(self, token: Token, rng: random.Random, *, first: bool = False) -> dt.datetime:
        """When to refresh `token`. For the first token a source obtains, the fraction is drawn from
        the whole window [FIRST_REFRESH_FLOOR, refresh_at + jitter]: nodes that booted together (and
        so fetched together) leave each other's phase in one cycle instead of drifting apart slowly."""
        lifetime = token.lifetime
        if first:
            fraction = rng.uniform(min(FIRST_REFRESH_FLOOR, self.refresh_at), self.refresh_at + self.jitter)
        else:
            fraction = self.refresh_at + rng.uniform(-self.jitter, self.jitter)
        planned = lifetime * fraction
        keep = lifetime - self.keep_left - rng.uniform(0.0, self.jitter * lifetime)
        latest = lifetime - self.margin(token)
        bound = max(min(keep, latest), MIN_REFRESH_FRACTION * lifetime)
        offset = max(self.min_interval, min(planned, bound))
        return token.issued_at + dt.timedelta(seconds=offset)


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

    def after_permanent(self, retry_after: float | None) -> float:
        """Seconds to wait after a permanent refusal (trying again soon cannot help): the maximum at once,
        longer when the server's Retry-After asks for it (within MAX_RETRY_AFTER)."""
        return max(self.maximum, min(retry_after or 0.0, MAX_RETRY_AFTER))


def retry_at(now: dt.datetime, delay: float, last_good: Token | None, skew: float) -> dt.datetime:
    """When to try again after a failure. While the last good token is still servable, never wait
    past the point where it stops being servable (minus a second), so recovery has a chance
    before callers see 503s; once it is unusable, the backoff alone decides."""
    planned = now + dt.timedelta(seconds=delay)
    if last_good is not None and last_good.usable_at(now, skew):
        deadline = last_good.expire_time - dt.timedelta(seconds=last_good.serve_margin(skew) + 1)
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
