"""The boundary to upstream HTTP: requests, and every failure mapped to an UpstreamError.

Upstream error shapes (SPECS.md §2–§5, §7):
  Entra ID   {"error", "error_description": "AADSTS700027: …", "error_codes": [700027], …}
  STS        {"error", "error_description"}
  Google     {"error": {"code", "message", "status", "details"}}
Messages are cut short and scrubbed: no token, assertion or key ever lands in one.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from typing import Any

import anyio
import httpx

from wlidd.errors import UpstreamError
from wlidd.logs import scrub

_AADSTS = re.compile(r"\b(AADSTS\d+)\b")
MAX_MESSAGE = 300
MAX_SECONDS = 7 * 86400  # the longest lifetime believed (real ones: ≤ 1 h STS and metadata, ≤ 24 h Entra ID)


def _short(text: str) -> str:
    text = scrub(" ".join(text.split()))
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def retry_after_seconds(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def error_from_response(kind: str, response: httpx.Response) -> UpstreamError:
    status = response.status_code
    code, message = f"http_{status}", f"HTTP {status}"
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # Google API error (AIP-193)
            code = str(error.get("status") or error.get("code") or code)
            message = str(error.get("message") or message)
        elif isinstance(error, str):  # OAuth style: Entra ID, STS
            description = str(body.get("error_description") or "")
            aadsts = _AADSTS.search(description)
            code = aadsts.group(1) if aadsts else error
            message = f"{error}: {description}" if description else error
    elif response.text.strip():
        message = f"HTTP {status}: {response.text.strip()}"
    return UpstreamError(
        kind,
        f"{kind} answered {status}: {_short(message)}",
        status=status,
        code=code,
        retry_after=retry_after_seconds(response.headers.get("retry-after")),
    )


MAX_BODY = 1 << 20  # bytes of an upstream answer read (real ones: a few KB); more is refused, not buffered


def _deadline(client: httpx.AsyncClient) -> float:
    """The whole request's budget, seconds: the client's configured timeout (httpx applies it per read,
    so a server trickling one byte at a time would otherwise hold the request forever)."""
    timeout = client.timeout
    budget = max((t for t in (timeout.connect, timeout.read, timeout.write, timeout.pool) if t is not None), default=0)
    return budget or 30.0


async def send(client: httpx.AsyncClient, kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Send one request and read its answer within the client's timeout for the whole exchange (headers
    and body together) and at most MAX_BODY bytes: the answer, whatever its status, or an UpstreamError
    (`timeout`, `connect`, `bad_response` for an oversized body)."""
    try:
        with anyio.fail_after(_deadline(client)):
            async with client.stream(method, url, **kwargs) as streamed:
                body = bytearray()
                async for chunk in streamed.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise UpstreamError(
                            kind,
                            f"{kind} answered with more than {MAX_BODY} bytes ({_host(url)})",
                            code="bad_response",
                            status=streamed.status_code,
                        )
                return httpx.Response(
                    streamed.status_code, headers=streamed.headers, content=bytes(body), request=streamed.request
                )
    except (TimeoutError, httpx.TimeoutException):
        raise UpstreamError(kind, f"{kind} did not answer in time ({_host(url)})", code="timeout") from None
    except httpx.TransportError as exc:
        raise UpstreamError(
            kind, f"{kind} unreachable ({_host(url)}): {_short(str(exc)) or type(exc).__name__}", code="connect"
        ) from None


async def request_json(
    client: httpx.AsyncClient,
    kind: str,
    method: str,
    url: str,
    **kwargs: Any,
) -> tuple[dict[str, Any], httpx.Response]:
    """Send one request (`send`: bounded in time and size); a 200 JSON object or an UpstreamError."""
    response = await send(client, kind, method, url, **kwargs)
    if response.status_code != 200:
        raise error_from_response(kind, response)
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise UpstreamError(kind, f"{kind} answered 200 without a JSON object", code="bad_response", status=200)
    return document, response


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host or url
    except httpx.InvalidURL:
        return "invalid URL"


def require_str(document: dict[str, Any], key: str, kind: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise UpstreamError(kind, f"{kind} response lacks {key!r}", code="bad_response", status=200, retryable=True)
    return value


def require_seconds(document: dict[str, Any], key: str, kind: str) -> float:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UpstreamError(kind, f"{kind} response lacks {key!r}", code="bad_response", status=200)
    try:
        seconds = float(value)
    except ValueError:
        raise UpstreamError(
            kind, f"{kind} response has a non-numeric {key!r}", code="bad_response", status=200
        ) from None
    if not 0 < seconds <= MAX_SECONDS:  # also NaN and ±Infinity, which float() and JSON accept
        raise UpstreamError(
            kind, f"{kind} response has {key!r} outside (0, {MAX_SECONDS}]", code="bad_response", status=200
        )
    return seconds


def parse_rfc3339(value: str, kind: str) -> dt.datetime:
    """RFC 3339 timestamps as IAM Credentials sends them (fractional seconds accepted)."""
    normalized = re.sub(r"(\.\d{6})\d+", r"\1", value.strip().replace("Z", "+00:00"))  # ns → µs
    try:
        parsed = dt.datetime.fromisoformat(normalized)
    except ValueError:
        raise UpstreamError(
            kind, f"{kind} sent an unreadable time {value[:40]!r}", code="bad_response", status=200
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
