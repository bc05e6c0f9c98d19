"""The config's value types: durations, file modes, expanded paths, host:port addresses, upstream URLs,
user and group names, SPIFFE ID matchers, and the strict model every table is.

Each refuses a bad value with a ValueError, the error pydantic reports against the key it was given for
(a validator that calls a parser raising InvalidValue turns it into one: pydantic turns only a ValueError
or an AssertionError raised in a validator into a validation error).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from wlidd.errors import InvalidValue
from wlidd.svid.spiffeid import parse_matcher

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"10m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '90s', '10m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration; use seconds or a string like '90s', '10m', '1h'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _expand_path(value: object) -> object:
    if isinstance(value, str | Path):
        return Path(os.path.expanduser(str(value)))
    return value


def _parse_mode(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value.strip()):
        mode = int(value.strip().replace("o", ""), 8)
    else:
        raise ValueError(f"{value!r} is not a file mode; use an octal string like '0660'")
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{value!r} is out of range for a file mode")
    return mode


Duration = Annotated[float, BeforeValidator(parse_duration)]
ExpandedPath = Annotated[Path, BeforeValidator(_expand_path)]
FileMode = Annotated[int, BeforeValidator(_parse_mode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_id(value: str | int) -> str | int:
    """A user or group as a sink reader: a name, or a number below the kernel's "no id" (2**32 - 1)."""
    number = value if isinstance(value, int) else int(value) if value.isascii() and value.isdigit() else None
    if number is not None and not 0 <= number < 0xFFFFFFFF:
        raise ValueError(f"{value} is not a uid or gid (0 to 4294967294)")
    if isinstance(value, str) and (not value or len(value) > 256 or any(c in value for c in ":/\n\0")):
        raise ValueError(f"{value!r} is not a user or group name")
    return value


def split_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8980' or '[::1]:8980' -> (host, port). InvalidValue ("address") for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise InvalidValue("address", f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def _address(address: str) -> tuple[str, int]:
    """`split_address` in a validator: its InvalidValue as the ValueError pydantic reports against the key
    (pydantic turns only a ValueError or an AssertionError raised in a validator into a validation error)."""
    try:
        return split_address(address)
    except InvalidValue as exc:
        raise ValueError(exc.message) from None


def _matcher(pattern: str) -> None:
    """`parse_matcher` in a validator: its InvalidValue as the ValueError pydantic reports (see `_address`)."""
    try:
        parse_matcher(pattern)
    except InvalidValue as exc:
        raise ValueError(exc.message) from None


SECRET_WORDS = ("token", "secret", "password", "passwd", "pass", "key", "auth", "credential", "signature", "sig")


def redact_url(url: str, mark: str = "<redacted>") -> str:
    """`url` with its userinfo (user and password: a token is often put as the user) and every query
    value replaced by `mark` (query names kept), for messages and `wlidd check --print`; text that is not
    a URL is returned as is."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{mark}@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{item.partition('=')[0]}={mark}" if "=" in item else item for item in parts.query.split("&") if item
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _check_url(key: str, url: str | None) -> None:
    """An upstream URL must be absolute http(s) with a host (RFC 3986): ValueError naming `key` otherwise
    (a relative or schemeless URL would fail at every refresh, far from its cause). None: not configured."""
    from urllib.parse import urlsplit

    if url is None:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"{key} {redact_url(url)!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} {redact_url(url)!r} must be an absolute http:// or https:// URL with a host")
