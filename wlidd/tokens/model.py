"""Token values. The secret never appears in a repr or str."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Token:
    """An access token with its expiry; `value` is hidden from reprs."""

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
        return (self.expire_time - self.issued_at).total_seconds()

    def seconds_left(self, now: dt.datetime) -> float:
        return (self.expire_time - now).total_seconds()

    def usable_at(self, now: dt.datetime, skew: float) -> bool:
        """True when it may be served: more than `skew` seconds before its expiry (wall clock)."""
        return self.seconds_left(now) > skew
