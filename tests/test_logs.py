"""Redaction is a pure structlog processor: no secret leaves through a log line."""

from __future__ import annotations

import io
import json
from typing import Any

import structlog

from wlidd.emulator.ca import CertificateAuthority
from wlidd.logs import (
    REDACTED,
    RepeatLimiter,
    configure_logging,
    get_logger,
    redact,
    repeat_limiter,
    reset_logging,
    use_repeat_limiter,
)

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"


def test_values_under_secret_keys_are_replaced() -> None:
    event = redact(
        None, "info", {"event": "x", "access_token": "ya29.abc", "client_assertion": JWT, "expires_in": 3599}
    )
    assert event["access_token"] == REDACTED and event["client_assertion"] == REDACTED
    assert event["expires_in"] == 3599


def test_private_keys_and_jwts_inside_free_text_are_masked() -> None:
    key = CertificateAuthority("example.org").issue_svid().key_pem.decode()
    event = redact(None, "info", {"event": "x", "detail": f"bad thing: {key} and {JWT} and Bearer ya29.a0AfB_byC"})
    assert "PRIVATE KEY" not in event["detail"] and JWT not in event["detail"] and "ya29" not in event["detail"]
    assert event["detail"].startswith("bad thing: ")


def test_exceptions_are_rendered_scrubbed() -> None:
    event = redact(None, "error", {"event": "x", "error": ValueError(f"upstream said {JWT}")})
    assert event["error"] == f"ValueError: upstream said {REDACTED}"


def test_configured_json_logger_redacts() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.get_logger("t").info("token fetched", token="secret-value", detail=f"x {JWT}")
    line = json.loads(out.getvalue())
    assert line["token"] == REDACTED and JWT not in out.getvalue() and line["level"] == "info"
    configure_logging("info", "console")


def test_under_journald_lines_carry_their_syslog_priority_and_no_timestamp() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out, journald=True)
    log = structlog.get_logger("t")
    log.info("hello")
    log.warning("careful")
    log.error("broken")
    configure_logging("info", "console")
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert all("timestamp" not in json.loads(line[3:]) for line in lines)


class Recorder:
    """A logger that keeps (level, event, fields) of each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_beyond_the_burst_are_counted_and_summarised_when_the_window_ends() -> None:
    clock, out = Clock(), Recorder()
    limiter = RepeatLimiter(burst=2, window=10.0, clock=clock)
    for i in range(100):
        limiter.log(out, "warning", "access denied", key={"uid": 1000}, route=f"/x/{i}")
    assert [f["route"] for _, _, f in out.lines] == ["/x/0", "/x/1"]
    assert limiter.seen["access denied"] == 100 and limiter.suppressed["access denied"] == 98
    clock.now = 10.0
    limiter.log(out, "warning", "access denied", key={"uid": 1000}, route="/y")  # the next line passes
    assert out.lines[2] == ("warning", "access denied", {"uid": 1000, "repeated": 98, "window_seconds": 10.0})
    assert out.lines[3] == ("warning", "access denied", {"uid": 1000, "route": "/y"})


def test_the_first_line_of_each_distinct_key_is_written() -> None:
    out = Recorder()
    limiter = RepeatLimiter(burst=1, window=10.0, clock=Clock())
    for uid in (1000, 1001, 1000, 1002, 1001):
        limiter.log(out, "warning", "access denied", key={"uid": uid})
    limiter.log(out, "info", "tls handshake failed", key={"uid": 1000})  # another event, another key
    assert [(e, f["uid"]) for _, e, f in out.lines] == [
        ("access denied", 1000),
        ("access denied", 1001),
        ("access denied", 1002),
        ("tls handshake failed", 1000),
    ]


def test_a_pending_count_is_written_by_flush_once_its_window_ended() -> None:
    clock, out = Clock(), Recorder()
    limiter = RepeatLimiter(burst=1, window=10.0, clock=clock)
    for _ in range(5):
        limiter.log(out, "info", "tls handshake failed", key={"reason": "HTTP_REQUEST"})
    limiter.flush()
    assert len(out.lines) == 1  # the window is still open
    clock.now = 10.0
    limiter.flush()
    assert out.lines[1] == (
        "info",
        "tls handshake failed",
        {"reason": "HTTP_REQUEST", "repeated": 4, "window_seconds": 10.0},
    )
    assert len(limiter) == 0
    limiter.log(out, "info", "tls handshake failed", key={"reason": "HTTP_REQUEST"})
    limiter.log(out, "info", "tls handshake failed", key={"reason": "HTTP_REQUEST"})
    limiter.flush(everything=True)  # at shutdown: every pending count, window over or not
    assert out.lines[-1][2]["repeated"] == 1


def test_the_key_table_stays_bounded_and_new_keys_share_an_overflow_window() -> None:
    clock, out = Clock(), Recorder()
    limiter = RepeatLimiter(burst=2, window=10.0, max_keys=8, clock=clock)
    for i in range(10_000):
        limiter.log(out, "warning", "access denied", key={"spiffe_id": f"spiffe://example.org/{i}"})
        assert len(limiter) <= 9
    assert len(out.lines) == 8 + 2  # the first line of each key that fitted, then the overflow window's burst
    assert limiter.suppressed["access denied"] == 10_000 - len(out.lines)
    clock.now = 10.0
    limiter.flush()
    assert out.lines[-1][2] == {"key_table_full": True, "repeated": 10_000 - 10, "window_seconds": 10.0}
    assert len(limiter) == 0


def test_limited_lines_go_through_the_configured_logger_and_its_redaction() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    use_repeat_limiter(RepeatLimiter(burst=1, clock=Clock()))
    try:
        log = get_logger("t")
        for _ in range(3):
            log.limited("warning", "access denied", key={"uid": 1000}, detail=f"presented {JWT}")
        assert repeat_limiter().suppressed["access denied"] == 2
    finally:
        configure_logging("info", "console")
        reset_logging()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1 and lines[0]["uid"] == 1000 and lines[0]["level"] == "warning"
    assert JWT not in out.getvalue()
    assert repeat_limiter().seen == {}  # reset_logging starts a fresh limiter
