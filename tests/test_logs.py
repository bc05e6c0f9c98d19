"""Redaction is a pure structlog processor: no secret leaves through a log line."""

from __future__ import annotations

import io
import json

import structlog

from wlidd.emulator.ca import CertificateAuthority
from wlidd.logs import REDACTED, configure_logging, redact

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
