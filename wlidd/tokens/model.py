"""Token values. The secret never appears in a repr or str.

Serving margin: a token is served while more than `serve_margin(skew)` seconds are left, which is
`skew` (default 60 s) — or, for a short-lived token, a quarter of its lifetime when that is less
(SHORT_LIFETIME_FRACTION): a token granted for `skew` seconds or less would otherwise never be served,
and its source would call the upstream again and again for nothing.

The token layer reads identities through two small protocols (IdentitySnapshot, IdentityChanges) that
wlidd.watch's IdentityState and CredentialWatcher satisfy, so it depends on no module above it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from wlidd.svid.model import Identity

SHORT_LIFETIME_FRACTION = 0.25  # the serving margin never exceeds this share of the lifetime


@dataclass(frozen=True)
class Token:
    """An access token with its expiry; `value` is hidden from reprs.

    `issued_at` is the local time the request for it was sent and `expire_time` its expiry on the local
    clock (providers bound what the upstream says; see wlidd.tokens.providers.expiry)."""

    value: str = field(repr=False)
    expire_time: dt.datetime
    issued_at: dt.datetime
    source: str
    token_type: str = "Bearer"
    identity_version: int | None = None  # the SVID version a certificate-bound token was obtained with

    def __str__(self) -> str:
        return f"Token(source={self.source!r}, expires {self.expire_time.isoformat()})"

    @property
    def lifetime(self) -> float:
        """Seconds from `issued_at` to `expire_time`."""
        return (self.expire_time - self.issued_at).total_seconds()

    def seconds_left(self, now: dt.datetime) -> float:
        return (self.expire_time - now).total_seconds()

    def serve_margin(self, skew: float) -> float:
        """Seconds before expiry at which this token stops being served: `skew`, or a quarter of the
        lifetime when that is less (a 30 s token is served for 22.5 s rather than never)."""
        return max(0.0, min(skew, SHORT_LIFETIME_FRACTION * self.lifetime))

    def usable_at(self, now: dt.datetime, skew: float) -> bool:
        """True when it may be served: more than `serve_margin(skew)` seconds before its expiry (wall clock)."""
        return self.seconds_left(now) > self.serve_margin(skew)


class IdentitySnapshot(Protocol):
    """One published state of an identity, as flows read it (wlidd.watch.IdentityState is one): the validated
    identity (its SVID signs Entra ID assertions and is presented in mTLS handshakes) and its `version`, which
    rises with every rotation (an mTLS client and a certificate-bound token belong to one version)."""

    @property
    def identity(self) -> Identity: ...

    @property
    def version(self) -> int: ...


class IdentityChanges(Protocol):
    """A publisher of identity states (wlidd.watch.CredentialWatcher is one): `changes()` yields the current
    state (if any), then every newer one."""

    def changes(self) -> AsyncIterator[IdentitySnapshot]: ...


CurrentIdentity = Callable[[], IdentitySnapshot | None]
"""The identity state a flow uses now (None: none loaded yet)."""
