"""Structured logs (structlog) with secret redaction.

JSON when stderr is not a TTY (or when asked), a console format otherwise, coloured only on a
terminal (NO_COLOR and FORCE_COLOR respected: `use_colors`). Redaction is a pure
processor: values under secret-looking keys are replaced, and PEM private keys or JWT-shaped strings
anywhere in a value are masked. Tracebacks never include local variables.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

REDACTED = "[redacted]"
SECRET_KEYS = re.compile(r"(token|secret|password|assertion|private_key|key_pem|authorization)", re.I)
_PRIVATE_KEY_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")


def scrub(text: str) -> str:
    """Mask private keys, JWTs and bearer tokens inside free text."""
    text = _PRIVATE_KEY_PEM.sub(REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    return _BEARER.sub("Bearer " + REDACTED, text)


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no secret leaves through a log line."""
    for key, value in list(event_dict.items()):
        if SECRET_KEYS.search(key) and value is not None and not isinstance(value, bool | int | float):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = scrub(value)
        elif isinstance(value, BaseException):
            event_dict[key] = scrub(f"{type(value).__name__}: {value}")
    return event_dict


SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}


def journald_priority(_: Any, method: str, rendered: Any) -> Any:
    """Last processor under journald: prefix the rendered line with its syslog priority (`<4>...`)."""
    return f"<{SYSLOG_PRIORITY.get(method, 6)}>{rendered}"


_generation = 0  # bumped by every configure_logging: cached loggers re-bind once after it


class Logger:
    """A module's logger: bound once per logging configuration instead of on every call (structlog's
    lazy proxy re-binds on each call, a real cost on the token hot path), and re-bound after a
    reload changes the level or format. Its methods are structlog's (`FilteringBoundLogger`: an event
    string and key-value fields), typed so that mypy checks every call site."""

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: FilteringBoundLogger | None = None

    def _current(self) -> FilteringBoundLogger:
        bound = self._bound
        if bound is None or self._generation != _generation:
            bound = self._bound = cast(FilteringBoundLogger, structlog.get_logger(self._name).bind())
            self._generation = _generation
        return bound

    def bind(self, **fields: Any) -> FilteringBoundLogger:
        """A logger that adds `fields` to every line (bound to the current configuration)."""
        return self._current().bind(**fields)

    def debug(self, event: str, *args: Any, **fields: Any) -> Any:
        return self._current().debug(event, *args, **fields)

    def info(self, event: str, *args: Any, **fields: Any) -> Any:
        return self._current().info(event, *args, **fields)

    def warning(self, event: str, *args: Any, **fields: Any) -> Any:
        return self._current().warning(event, *args, **fields)

    def error(self, event: str, *args: Any, **fields: Any) -> Any:
        return self._current().error(event, *args, **fields)

    def exception(self, event: str, *args: Any, **fields: Any) -> Any:
        return self._current().exception(event, *args, **fields)

    def critical(self, event: str, *args: Any, **fields: Any) -> Any:
        return self._current().critical(event, *args, **fields)

    def limited(self, level: str, event: str, *, key: Mapping[str, Hashable], **fields: Any) -> bool:
        """Log `event` at `level` through the process's `RepeatLimiter` (see `repeat_limiter`):
        lines that repeat `key` at a caller's rate are counted instead of written. `key` names what
        repeats (a reason, a listener and a caller) and is written with the line; True if written."""
        return _repeats.log(self, level, event, key=key, **fields)


def get_logger(name: str) -> Logger:
    """The logger of module `name` (e.g. "wlidd.tokens")."""
    return Logger(name)


@dataclass
class _Window:
    """One key's current window: when it opened (clock seconds), lines written, lines counted."""

    opened: float
    written: int
    suppressed: int
    logger: Any
    level: str
    event: str
    key: dict[str, Hashable]


_OVERFLOW = ("key_table_full", True)


class AuditOnce:
    """Which hand-outs were audited already: `changed(key, marker)` is True (log it) the first time a
    key — (caller, what) — is seen with a marker (a token's expiry, a certificate's serial, a set of
    versions), and False while the same caller keeps getting the same thing. So the audit trail names
    every caller and every new secret it received, and a caller asking in a loop adds nothing to it.

    Bounded: at most `max_keys` keys, the least recently changed dropped first (a dropped key is just
    logged again on its next hand-out).
    """

    def __init__(self, max_keys: int = 4096) -> None:
        from collections import OrderedDict

        self.max_keys = max_keys
        self._seen: OrderedDict[Hashable, Hashable] = OrderedDict()

    def changed(self, key: Hashable, marker: Hashable) -> bool:
        if key in self._seen and self._seen[key] == marker:
            return False
        self._seen[key] = marker
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class RepeatLimiter:
    """At most `burst` lines per key per `window` seconds; further lines with that key are counted,
    and one summary line (the same event and key fields, plus `repeated=<count>` and
    `window_seconds`) is written when the window ends. The first line of every key is written, so an
    audit still names each denied caller.

    A key is the event plus a few fields naming what repeats (a TLS failure reason; a listener and a
    caller): bounded sets, never free text a caller chooses. Still, the table holds at most
    `max_keys` windows, plus one overflow window per event (events are code constants): when the
    table is full, lines with new keys share their event's overflow window, so the number of lines
    per window is bounded whatever a caller varies.

    Summaries are written lazily, by the next `log` call after a window ends, or by `flush()` (call
    it from a periodic task, and with `everything=True` at shutdown, to have them on time). `clock`
    is monotonic seconds. Not thread-safe: use it from one thread (the event loop's).
    """

    def __init__(
        self,
        *,
        burst: int = 3,
        window: float = 60.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window <= 0 or max_keys < 1:
            raise ValueError("RepeatLimiter needs burst >= 1, window > 0 and max_keys >= 1")
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._windows: OrderedDict[tuple[str, tuple[tuple[str, Hashable], ...]], _Window] = OrderedDict()
        self._overflowing = 0  # overflow windows in the table
        self.seen: Counter[str] = Counter()  # lines asked for, per event
        self.suppressed: Counter[str] = Counter()  # lines counted instead of written, per event

    def __len__(self) -> int:
        """Windows in the table (at most max_keys + one overflow window per event)."""
        return len(self._windows)

    def log(self, logger: Any, level: str, event: str, *, key: Mapping[str, Hashable], **fields: Any) -> bool:
        """Write `event` with `key` and `fields` through `logger.<level>` unless its key already had
        `burst` lines in the current window; True if written. Raises TypeError for unhashable key
        values."""
        now = self.clock()
        self._expire(now)
        self.seen[event] += 1
        ident = (event, tuple(key.items()))
        window = self._windows.get(ident)
        if window is None and len(self._windows) - self._overflowing >= self.max_keys:
            ident = (event, (_OVERFLOW,))
            window = self._windows.get(ident)
            if window is None:
                self._overflowing += 1
        if window is None:
            window = _Window(now, 0, 0, logger, level, event, dict(ident[1]))
            self._windows[ident] = window
        if window.written >= self.burst:
            window.suppressed += 1
            self.suppressed[event] += 1
            return False
        window.written += 1
        getattr(logger, level)(event, **{**fields, **key})
        return True

    def flush(self, *, everything: bool = False) -> None:
        """Write the summaries of windows that ended (of all windows, with `everything`)."""
        self._expire(float("inf") if everything else self.clock())

    def _expire(self, now: float) -> None:
        while self._windows:
            ident, window = next(iter(self._windows.items()))  # the oldest window
            if window.opened + self.window > now:
                return
            del self._windows[ident]
            if _OVERFLOW in ident[1]:
                self._overflowing -= 1
            if window.suppressed:
                summary = {**window.key, "repeated": window.suppressed, "window_seconds": self.window}
                getattr(window.logger, window.level)(window.event, **summary)


_repeats = RepeatLimiter()


def repeat_limiter() -> RepeatLimiter:
    """The process's limiter behind `Logger.limited`."""
    return _repeats


def use_repeat_limiter(limiter: RepeatLimiter) -> None:
    """Replace the process's limiter (tests: a fake clock, a short window)."""
    global _repeats
    _repeats = limiter


def reset_logging() -> None:
    """Back to structlog's defaults (tests), re-binding every cached logger; a fresh limiter."""
    global _generation
    _generation += 1
    structlog.reset_defaults()
    use_repeat_limiter(RepeatLimiter())


def use_colors(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether console lines written to `stream` get ANSI colours: never when NO_COLOR is set and not
    empty (https://no-color.org), always when FORCE_COLOR is set and not empty (https://force-color.org),
    never when TERM is "dumb", else only when `stream` is a terminal. NO_COLOR wins over FORCE_COLOR,
    the order of structlog's own defaults and of CPython's `_colorize.can_colorize`."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR", ""):
        return False
    if env.get("FORCE_COLOR", ""):
        return True
    if env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    journald: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Configure structlog once for the process. Under journald (stderr is the journal stream), lines
    carry no timestamp (the journal adds its own) and start with their syslog priority. The console
    format is coloured only as `use_colors(stream, environ)` says (never under journald), so a pipe,
    a file or a log collector gets no escape codes."""
    out = stream or sys.stderr
    if journald is None:
        from wlidd.systemd import journald_stderr

        journald = stream is None and journald_stderr()
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    if not journald:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(redact)
    if use_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback, colors=not journald and use_colors(out, environ)
        )
        processors.append(renderer)
    if journald:
        processors.append(journald_priority)
    global _generation
    _generation += 1
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
