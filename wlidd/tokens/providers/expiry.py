"""Upstream expiries on the local clock. Pure functions; times are aware UTC datetimes, durations seconds.

A relative expiry (`expires_in` from Entra ID, STS, the metadata server) counts from the moment the
upstream issued the token, which is after wlidd sent the request: `sent_at + expires_in` is never
late (flows.py adds it to the time the request was sent).

An absolute expiry comes from the upstream's clock, which may be minutes off ours. IAM Credentials
generateAccessToken answers `expireTime` (SPECS.md §4); with IAM's clock 15 min ahead, a 30 s token read
as an absolute time would look valid for 15 min 30 s. So (`absolute_expiry`):

    with a Date header:   sent_at + min(requested, expireTime − Date − 1 s)
    without one:          min(expireTime, sent_at + requested)

`Date` (RFC 9110 §6.6.1) is the upstream's clock when it answered, in whole seconds (truncated, so the
true instant is up to 1 s later, hence the second taken off); the answer was made after `sent_at`, so
counting the remaining time from `sent_at` is never late. The lifetime asked for bounds it either way:
IAM never grants more than it was asked.

An ID token carries `iat` and `exp` from its issuer's clock (IAM generateIdToken, the metadata identity
endpoint; both one hour): `id_token_expiry` = sent_at + min(exp − iat, ID_TOKEN_MAX_LIFETIME), which
no clock skew can stretch; without `iat`, exp is taken as an absolute time, still capped at one hour.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
from typing import Any

import jwt

from wlidd.errors import UpstreamError

DATE_RESOLUTION = 1.0  # seconds: an HTTP-date has whole seconds
ID_TOKEN_MAX_LIFETIME = 3600.0  # Google ID tokens last one hour; nothing served longer than that


def response_date(value: str | None) -> dt.datetime | None:
    """The upstream's clock from a `Date` header value (IMF-fixdate or the obsolete forms); None when
    absent or unreadable, so the caller falls back to the bound without it."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _bad(kind: str, message: str) -> UpstreamError:
    return UpstreamError(kind, f"{kind} {message}", code="bad_response", status=200)


def absolute_expiry(
    kind: str,
    expire_time: dt.datetime,
    *,
    sent_at: dt.datetime,
    requested: float,
    upstream_now: dt.datetime | None = None,
) -> dt.datetime:
    """The local expiry of a token the upstream says expires at `expire_time` (its clock), for a request
    sent at `sent_at` (local clock) asking for `requested` seconds; `upstream_now` from the answer's Date
    header. UpstreamError (bad_response) when the upstream's own times say it has already expired."""
    if upstream_now is not None:
        remaining = (expire_time - upstream_now).total_seconds() - DATE_RESOLUTION
        remaining = min(requested, remaining)
        if not remaining > 0:
            raise _bad(kind, "answered a token that expires before its own Date")
        return sent_at + dt.timedelta(seconds=remaining)
    expiry = min(expire_time, sent_at + dt.timedelta(seconds=requested))
    if expiry <= sent_at:
        raise _bad(kind, f"answered a token that has already expired ({expire_time.isoformat()})")
    return expiry


def _claim_seconds(claims: dict[str, Any], name: str, kind: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(kind, f"ID token has an unreadable {name} claim")
    return float(value)


def id_token_expiry(token: str, *, sent_at: dt.datetime, kind: str) -> dt.datetime:
    """The local expiry of an ID token (JWT) obtained with a request sent at `sent_at`: its lifetime as its
    issuer stated it (exp − iat), at most ID_TOKEN_MAX_LIFETIME, counted from `sent_at`. The signature is
    not checked (the audience's verifier does that). UpstreamError (bad_response) for an unreadable token,
    no exp, or a lifetime ≤ 0."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _bad(kind, "ID token is not a readable JWT") from None
    if not isinstance(claims, dict):
        raise _bad(kind, "ID token has no claims")
    exp = _claim_seconds(claims, "exp", kind)
    if exp is None:
        raise _bad(kind, "ID token has no exp claim")
    iat = _claim_seconds(claims, "iat", kind)
    lifetime = exp - iat if iat is not None else exp - sent_at.timestamp()
    lifetime = min(lifetime, ID_TOKEN_MAX_LIFETIME)
    if not lifetime > 0:
        raise _bad(kind, "answered an ID token that has already expired")
    return sent_at + dt.timedelta(seconds=lifetime)
