"""Structured logs (structlog) with secret redaction.

JSON when stderr is not a TTY (or when asked), a console format otherwise. Redaction is a pure
processor: values under secret-looking keys are replaced, and PEM private keys or JWT-shaped strings
anywhere in a value are masked. Tracebacks never include local variables.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

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
    reload changes the level or format."""

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: Any = None

    def __getattr__(self, method: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return getattr(self._bound, method)


def get_logger(name: str) -> Any:
    return Logger(name)


def reset_logging() -> None:
    """Back to structlog's defaults (tests), re-binding every cached logger."""
    global _generation
    _generation += 1
    structlog.reset_defaults()


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, *, journald: bool | None = None
) -> None:
    """Configure structlog once for the process. Under journald (stderr is the journal stream), lines
    carry no timestamp (the journal adds its own) and start with their syslog priority."""
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
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback, colors=not journald)
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
