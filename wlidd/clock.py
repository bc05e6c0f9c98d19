"""Wall-clock time as every layer takes it: an injected `Clock`, the real one, and one way to write a time.

A `Clock` is a zero-argument callable returning an aware UTC datetime. Everything that reads the time for
a decision (validity windows, token expiry, refresh schedules, status ages) takes one, so tests pass a
fixed or stepped clock instead of waiting. Times leave wlidd (JSON answers, files, logs) as RFC 3339 in
UTC with a 'Z' suffix (RFC 3339 §5.6; the form Google's APIs and certificate_config.json readers expect).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import overload

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    """The real clock: now, as an aware datetime in UTC."""
    return dt.datetime.now(dt.UTC)


@overload
def iso_z(value: dt.datetime) -> str: ...
@overload
def iso_z(value: None) -> None: ...
def iso_z(value: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC with a 'Z' suffix, as every wlidd answer and file writes times."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None
