"""HTTP messages as the routes see them: `Request` in, `Response` out, the route table, the status line.

Routes are plain `Request -> Response` functions (`Handler`), testable without a socket; the server
(wlidd.api.server) owns sockets, limits and timeouts. A handler that routes has a `route(request) ->
(template, handler)` method: `Router` matches a table of path templates such as "/v1/token/{name}", and
the matched template is the request's metrics label ("other" when no route matched), so a label is
always a template of the table, never the path.

`serialize_response` writes a Response as HTTP/1.1 bytes: the status line names every status (RFC 9110
§15 reason phrases; `status_text`), and every answer carries `content-length` and `cache-control:
no-store`.
"""

from __future__ import annotations

import dataclasses
import http
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wlidd.api.peers import Peer


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: tuple[tuple[str, str], ...]
    body: bytes
    peer: Peer
    listener: str

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def json(cls, status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, json.dumps(document, indent=None, separators=(",", ":")).encode() + b"\n", headers=headers)

    @classmethod
    def text(cls, status: int, text: str | bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
        return cls(status, text.encode() if isinstance(text, str) else text, content_type)

    @classmethod
    def error(cls, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls.json(status, {"error": code, "message": message}, headers)


Handler = Callable[[Request], Awaitable[Response]]
Endpoint = Callable[[Request, dict[str, str]], Awaitable[Response]]  # a route's function: request, path params
OTHER_ROUTE = "other"  # the route label of a request no route matched
MATCH_CACHE_ENTRIES = 256  # paths whose match a Router keeps (then it starts again)
MATCH_CACHE_PATH = 256  # characters of the longest path kept (at most 64 KiB of paths per Router)


class Router:
    """A route table: (template, endpoint) rows, matched in order against the whole path. A template is a
    path whose `{name}` segments match one non-empty segment ("/v1/token/{name}"); the matched row's
    template is the request's metrics label, so the label set is the table's templates plus "other"."""

    def __init__(self, routes: Iterable[tuple[str, Endpoint]]) -> None:
        self.routes = tuple(routes)
        self.templates = frozenset(template for template, _ in self.routes)
        # Each row with its literal text up to the first `{`: a path without it cannot match the row.
        self._patterns = [
            (template.partition("{")[0], _template_pattern(template), template, endpoint)
            for template, endpoint in self.routes
        ]
        # path → its match, for paths asked before (clients ask the same few again and again); bounded.
        self._matched: dict[str, tuple[str, Endpoint, dict[str, str]] | None] = {}

    def match(self, path: str) -> tuple[str, Endpoint, dict[str, str]] | None:
        """(template, endpoint, {name: segment}) of the first route matching `path`, else None."""
        try:
            found = self._matched[path]
        except KeyError:
            found = self._match(path)
            if len(path) <= MATCH_CACHE_PATH:
                if len(self._matched) >= MATCH_CACHE_ENTRIES:
                    self._matched.clear()
                self._matched[path] = found
        return None if found is None else (found[0], found[1], dict(found[2]))

    def _match(self, path: str) -> tuple[str, Endpoint, dict[str, str]] | None:
        for prefix, pattern, template, endpoint in self._patterns:
            if path.startswith(prefix) and (found := pattern.fullmatch(path)) is not None:
                return template, endpoint, found.groupdict()
        return None


def _template_pattern(template: str) -> re.Pattern[str]:
    """The regex of a route template: literal text, each `{name}` one non-empty path segment."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts)))


def labelled(handler: Handler) -> Callable[[Request], tuple[str, Handler]]:
    """The `route` of a handler: its own `route` method, else one labelling every request by the handler's
    `route_template(path)`, else "other"."""
    route: Callable[[Request], tuple[str, Handler]] | None = getattr(handler, "route", None)
    if route is not None:
        return route
    template: Callable[[str], str] | None = getattr(handler, "route_template", None)
    if template is None:
        return lambda _request: (OTHER_ROUTE, handler)
    return lambda request: (template(request.path), handler)


# The error code of this layer's own answers, by status (a protocol error's status hint names its code).
ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    505: "http_version_not_supported",
}

# RFC 9110 §15's reason phrases where they differ from Python's http.HTTPStatus (3.11 still says
# "Request Entity Too Large"); every other status takes HTTPStatus's phrase (`status_text`).
_STATUS_TEXT = {
    413: "Content Too Large",
    422: "Unprocessable Content",
}
_STATUS_CLASS = {1: "Informational", 2: "Success", 3: "Redirection", 4: "Client Error", 5: "Server Error"}


def status_text(status: int) -> str:
    """The reason phrase of `status` (RFC 9110 §15; Python's http.HTTPStatus), else its class's name
    (`Client Error` for an unregistered 4xx): never empty, never "Unknown"."""
    if status in _STATUS_TEXT:
        return _STATUS_TEXT[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return _STATUS_CLASS.get(status // 100, "Status")


_STATUS_LINES: dict[int, str] = {}  # status → its status line, for 100-599 (one entry per status served)


def serialize_response(response: Response, *, close: bool, head: bool = False) -> bytes:
    """HTTP/1.1 bytes of a response. Every header is ours (no caller input); CR/LF are refused anyway."""
    status = response.status
    status_line = _STATUS_LINES.get(status)
    if status_line is None:
        status_line = f"HTTP/1.1 {status} {status_text(status)}"
        if 100 <= status <= 599:
            _STATUS_LINES[status] = status_line
    fields = [("content-type", response.content_type), *response.headers]
    if any("\r" in part or "\n" in part for field in fields for part in field):
        raise ValueError("response header with a line break")
    head_text = (
        f"{status_line}\r\ncontent-type: {response.content_type}\r\ncontent-length: {len(response.body)}\r\n"
        "cache-control: no-store\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        + ("connection: close\r\n\r\n" if close else "\r\n")
    )
    return head_text.encode("latin-1") + (b"" if head else response.body)


def with_headers(response: Response, headers: tuple[tuple[str, str], ...]) -> Response:
    """`response` with each of `headers` it does not set itself (names compared case-insensitively)."""
    if not headers:
        return response
    present = {name.lower() for name, _ in response.headers}
    missing = tuple((name, value) for name, value in headers if name.lower() not in present)
    return dataclasses.replace(response, headers=response.headers + missing) if missing else response
