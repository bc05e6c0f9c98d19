"""HTTP/1.1 server over anyio byte streams, driven by h11 (server side of httpcore's pattern).
Long: the HTTP/1.1 server whole: fast path, h11 fallback, limits, held requests and drain share each connection.

Routes are plain `Request -> Response` functions; this module owns sockets, limits and timeouts:
  - headers larger than `max_header_bytes` → 431; a body larger than `max_body_bytes` → 413;
  - a request not complete within `request_timeout` → 408 (slowloris);
  - a new connection that sends nothing (or does not finish its TLS handshake) within
    `first_byte_timeout` is closed; an idle keep-alive connection is closed after `idle_timeout`;
  - a request head with bare-LF line endings → 400 at once (RFC 9112 §2.2: we do not guess);
  - connections beyond `max_connections` get 503 and are closed (the daemon counts them earlier, at
    accept, per listener and per caller: wlidd.api.accept);
  - a protocol error becomes h11's status hint (400, 431 …); a handler crash becomes 500;
  - an HTTP major version other than 1 (`GET / HTTP/9.9`) → 505 (RFC 9110 §15.6.6);
  - an absolute-form target (`GET http://host/path?q HTTP/1.1`, RFC 9112 §3.2.2: a server MUST accept
    it) is served as its path and query, with the target's authority as the request's Host (the RFC:
    the Host header, still required of HTTP/1.1 clients, is then ignored);
  - the status line names every status (RFC 9110 §15 reason phrases; `status_text`).

A handler may hold a request for long (a long poll: the metadata API's wait_for_change). It says which by
a `holds(request) -> bool` method; while such a request is handled, the connection is watched: a client
that closes it ends the handler (cancelled, no answer), and bytes it sends meanwhile (a pipelined request)
are kept for after the answer. A held request is "busy": no idle or request deadline applies to it, and
it is never shed. `close()` calls the handler's `release_holds()` (if it has one), so held requests are
answered at once when the server stops rather than cut at the drain deadline.

Routing and the metrics label: a handler that routes has a `route(request) -> (template, handler)`
method (`Router` matches a table of path templates such as "/v1/token/{name}"); the server asks it once
per request, answers with the handler it returns, and hands the template to `on_response` as the
request's route label ("other" when no route matched), so a label is always a template of the table,
never the path. A handler without `route` is labelled by its `route_template(path)`, else "other".

Every answer of a server, this layer's own (400, 408, 413, 431, 500, 503, 505) included, carries the
handler's `response_headers` (if it has that attribute) unless the answer sets that header itself: the
metadata API's `Metadata-Flavor: Google`, which the real metadata server puts on every response and
clients check (gcp-metadata rejects any answer without it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import json
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import h11
from anyio.abc import ByteStream, SocketStream, UNIXSocketStream
from anyio.streams.tls import TLSStream

from wlidd.api.peers import Peer, stream_peer
from wlidd.errors import ApiError
from wlidd.logs import get_logger

log = get_logger("wlidd.api")


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

    def match(self, path: str) -> tuple[str, Endpoint, dict[str, str]] | None:
        """(template, endpoint, {name: segment}) of the first route matching `path`, else None."""
        for prefix, pattern, template, endpoint in self._patterns:
            if path.startswith(prefix) and (found := pattern.fullmatch(path)) is not None:
                return template, endpoint, found.groupdict()
        return None


def _template_pattern(template: str) -> re.Pattern[str]:
    """The regex of a route template: literal text, each `{name}` one non-empty path segment."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts)))


_REASONS = {
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


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 256
    first_byte_timeout: float = 5.0  # seconds from accept to the first request byte (TLS handshake included)


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


class _Connection:
    """One open connection's timeout bookkeeping, read by the sweeper."""

    __slots__ = ("deadline", "owner", "phase", "requests", "since", "stream", "timed_out")

    def __init__(self, stream: ByteStream, deadline: float, owner: object = None) -> None:
        self.stream = stream
        self.deadline = deadline
        self.phase = "idle"  # idle (between requests) | request (partly received) | busy (handling)
        self.timed_out = False
        self.requests = 0  # answered so far: before the first, the first-byte deadline applies
        self.owner = owner  # who it is counted against (the accept loop's caller key), for shedding
        self.since = time.monotonic()


def with_headers(response: Response, headers: tuple[tuple[str, str], ...]) -> Response:
    """`response` with each of `headers` it does not set itself (names compared case-insensitively)."""
    if not headers:
        return response
    present = {name.lower() for name, _ in response.headers}
    missing = tuple((name, value) for name, value in headers if name.lower() not in present)
    return dataclasses.replace(response, headers=response.headers + missing) if missing else response


_TIMED_OUT = Response.error(408, "request_timeout", "request not received in time")
_BUSY = Response.error(503, "too_many_connections", "connection limit reached; retry later")
REQUEST_TIMEOUT = serialize_response(_TIMED_OUT, close=True)
TOO_MANY_CONNECTIONS = serialize_response(_BUSY, close=True)
_BARE_LF = re.compile(rb"(?<!\r)\n")


READ_AHEAD = 64 * 1024  # bytes a plain connection buffers ahead of the server; then reading pauses
_STREAK = 16  # requests served from buffered bytes in a row before the connection yields to the others
_scratch = memoryview(bytearray(READ_AHEAD))  # every plain connection reads into this, then keeps what came


class _Reader(asyncio.BufferedProtocol):
    """The event loop's side of a plain (non-TLS) connection. It reads whenever bytes arrive, the socket
    registered with the loop once for the connection's life: anyio's socket streams add and remove the
    socket's reader around every wait (bench/PROFILES.md), this is the cost it removes. At most READ_AHEAD
    bytes wait here for the server (a client pipelining more finds reading paused, as it would find a
    server that is not reading); they are read into one shared scratch buffer, as the loop reads one
    socket at a time, and only what arrived is kept. Writes are not buffered (limits 0): `ProtocolStream.send`
    waits until the kernel took every byte, as a socket send does."""

    __slots__ = ("buffered", "chunks", "eof", "error", "lost", "paused", "readable", "transport", "writable")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes in `chunks`
        self.eof = False  # the peer shut its writing half (its last bytes may still be in `chunks`)
        self.lost = False  # the transport is gone (closed by us, reset or broken); `error` says why, if known
        self.error: BaseException | None = None
        self.paused = False  # reading paused: READ_AHEAD bytes are waiting
        self.readable: asyncio.Future[None] | None = None  # a receive waiting for bytes
        self.writable: asyncio.Future[None] | None = None  # a send waiting for the kernel to take its bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(0)  # pause_writing as soon as a write is not taken whole

    def get_buffer(self, sizehint: int) -> memoryview:
        return _scratch[: max(READ_AHEAD - self.buffered, 1)]  # reading pauses at READ_AHEAD anyway

    def buffer_updated(self, nbytes: int) -> None:
        self.chunks.append(bytes(_scratch[:nbytes]))
        self.buffered += nbytes
        if self.buffered >= READ_AHEAD and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        _wake(self.readable)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.readable)
        return True  # keep the writing half open: an answer may still go out (a 400 for a cut request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.error = True, exc
        _wake(self.readable)
        _wake(self.writable)

    def pause_writing(self) -> None:
        return None  # `send` waits on the transport's buffer itself

    def resume_writing(self) -> None:
        _wake(self.writable)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class ProtocolStream(SocketStream):
    """A plain accepted socket as an anyio socket stream, served from an asyncio protocol (`_Reader`).

    The same contract as anyio's socket streams: `receive` returns the bytes that arrived (at most
    `max_bytes`) or raises EndOfStream when the peer shut its side, BrokenResourceError when the
    connection broke, ClosedResourceError once `aclose` was called (from any task: a receive or send
    waiting meanwhile is woken with it); `send` returns when the kernel took every byte. Unlike them,
    a receive of bytes already buffered does not go through the event loop, except once every _STREAK
    in a row, so a client pipelining many requests cannot hold the loop."""

    def __init__(self, sock: socket.socket, transport: asyncio.Transport, reader: _Reader) -> None:
        self._sock = sock
        self._transport = transport
        self._reader = reader
        self._closed = False
        self._streak = 0  # receives in a row answered from buffered bytes
        self._receiving = self._sending = False

    @classmethod
    async def from_accepted(cls, sock: socket.socket) -> ProtocolStream:
        """Serve an accepted, connected socket (it belongs to the stream from now on)."""
        loop = asyncio.get_running_loop()
        transport, reader = await loop.connect_accepted_socket(_Reader, sock)
        return cls(sock, transport, reader)

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by `receive` (at most READ_AHEAD)."""
        return self._reader.buffered

    @property
    def reading(self) -> bool:
        """Whether the event loop reads the socket now: False while READ_AHEAD bytes wait, and once the
        connection is closed."""
        return self._transport.is_reading()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._receiving:  # as anyio's streams: one receiver at a time
            raise anyio.BusyResourceError("reading from")
        self._receiving = True
        try:
            return await self._receive(max_bytes)
        finally:
            self._receiving = False

    async def _receive(self, max_bytes: int) -> bytes:
        reader = self._reader
        if reader.chunks and not self._closed:
            self._streak += 1
            if self._streak >= _STREAK:
                self._streak = 0
                await asyncio.sleep(0)
        while not reader.chunks or self._closed:
            self._streak = 0
            if self._closed:
                raise anyio.ClosedResourceError
            if reader.lost and reader.error is not None:
                raise anyio.BrokenResourceError from reader.error
            if reader.eof or reader.lost:
                raise anyio.EndOfStream
            reader.readable = asyncio.get_running_loop().create_future()
            try:
                await reader.readable
            finally:
                reader.readable = None
        chunk = reader.chunks.popleft()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            reader.chunks.appendleft(rest)
        reader.buffered -= len(chunk)
        if reader.paused and reader.buffered <= READ_AHEAD // 2:
            reader.paused = False
            self._transport.resume_reading()
        return chunk

    async def send(self, item: bytes) -> None:
        if self._sending:  # as anyio's streams: one sender at a time
            raise anyio.BusyResourceError("writing to")
        self._sending = True
        try:
            await self._send(item)
        finally:
            self._sending = False

    async def _send(self, item: bytes) -> None:
        reader = self._reader
        if self._closed:
            raise anyio.ClosedResourceError
        if reader.lost or self._transport.is_closing():
            raise anyio.BrokenResourceError from reader.error
        self._transport.write(item)  # sends at once; what the kernel does not take waits in the transport
        while self._transport.get_write_buffer_size() and not self._transport.is_closing():
            reader.writable = asyncio.get_running_loop().create_future()
            try:
                await reader.writable
            finally:
                reader.writable = None
        if self._closed:
            raise anyio.ClosedResourceError
        if self._transport.is_closing():  # the write failed (the peer went away), or it was aborted
            raise anyio.BrokenResourceError from reader.error

    async def send_eof(self) -> None:
        if not self._transport.is_closing():
            self._transport.write_eof()

    async def aclose(self) -> None:
        """Close now: the socket is closed when this returns (bytes the kernel did not take yet are
        dropped, as anyio's aclose does); a receive or send waiting in another task gets
        ClosedResourceError."""
        if not self._closed:
            self._closed = True
            self._transport.abort()  # unregisters the socket from the loop at once
            self._sock.close()  # the transport's own close, a moment later, finds it closed
            _wake(self._reader.readable)
            _wake(self._reader.writable)


class HttpServer:
    """Serves one handler on any number of listeners; one instance per listener kind.

    Timeouts cost nothing per request: each connection records a deadline, and one sweeper task
    (running only while connections are open) answers 408 to requests that stall and closes idle
    keep-alive connections.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        limits: ServerLimits | None = None,
        on_response: Callable[[Request, Response, str], None] | None = None,
    ) -> None:
        """`on_response(request, response, route)` after every answer a handler gave; `route` is the label
        of the route that answered (module docstring)."""
        self.handler = handler
        self.name = name
        self._route: Callable[[Request], tuple[str, Handler]] = getattr(handler, "route", None) or _labelled(handler)
        # Put on every answer, this layer's own included (module docstring).
        self.headers: tuple[tuple[str, str], ...] = tuple(getattr(handler, "response_headers", ()))
        # Long polls (module docstring): which requests the handler may hold, and how to end the holds.
        self._holds: Callable[[Request], bool] | None = getattr(handler, "holds", None)
        self._release_holds: Callable[[], None] | None = getattr(handler, "release_holds", None)
        self._request_timeout = serialize_response(with_headers(_TIMED_OUT, self.headers), close=True)
        self._too_many_connections = serialize_response(with_headers(_BUSY, self.headers), close=True)
        self.limits = limits or ServerLimits()
        self.on_response = on_response
        self._slots = anyio.CapacityLimiter(self.limits.max_connections)
        self._open: set[_Connection] = set()
        self._arrived = anyio.Event()
        self._closing = False

    async def serve(self, listener: anyio.abc.Listener[Any]) -> None:
        """Accept from `listener` until cancelled, with the timeout sweeper."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._sweep)
            try:
                # Connections run in our task group, so closing the listener does not cut them off.
                await listener.serve(self.serve_stream, task_group=tg)
            except* (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the listener was closed: stop accepting (graceful stop)
            self.close()
            while self._open:  # requests in flight finish; idle connections are closed by the sweeper
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()

    async def run_sweeper(self) -> None:
        """The timeout sweeper, for a server fed by `serve_socket` (an accept loop of the daemon's) rather
        than by `serve`; runs until cancelled."""
        await self._sweep()

    def close(self) -> None:
        """Stop keeping connections alive: idle ones are closed, requests in flight finish, held ones
        (long polls) are answered now (the handler's `release_holds`)."""
        self._closing = True
        self._arrived.set()
        if self._release_holds is not None:
            self._release_holds()

    async def serve_socket(
        self,
        conn: socket.socket,
        uid: int | None = None,
        inode: int | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        on_handshake_error: Callable[[BaseException, ByteStream], Awaitable[None]] | None = None,
        owner: object = None,
    ) -> None:
        """Serve one accepted, connected socket (it is closed when this returns).

        With `tls`, the TLS handshake must finish within `first_byte_timeout` seconds (a peer that opens
        connections and never speaks holds nothing for long); `on_handshake_error(exc, stream)` reports a
        failed one. `uid` and `inode` are the owner of a loopback TCP peer's socket found at accept
        (wlidd.api.peers), recorded on the Peer; Unix peers are identified from the socket itself.
        """
        try:
            if tls is None:  # the hot path: read by an asyncio protocol (ProtocolStream)
                stream: ByteStream = await ProtocolStream.from_accepted(conn)
            elif conn.family == socket.AF_UNIX:
                stream = await UNIXSocketStream.from_socket(conn)
            else:
                stream = await SocketStream.from_socket(conn)
        except (OSError, ValueError):  # anyio: ValueError "the socket must be connected" (a reset peer)
            conn.close()  # the peer went away between accept and now
            return
        if tls is not None:
            try:
                with anyio.fail_after(self.limits.first_byte_timeout):
                    stream = await TLSStream.wrap(stream, server_side=True, ssl_context=tls, standard_compatible=False)
            except (TimeoutError, ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                if on_handshake_error is not None:
                    await on_handshake_error(exc, stream)
                await anyio.aclose_forcefully(stream)
                return
        try:
            peer = stream_peer(stream)
        except OSError:  # the peer went away (ENOTCONN) during the handshake or just after accept
            await anyio.aclose_forcefully(stream)
            return
        if uid is not None and peer.uid is None and peer.tcp_remote is not None:
            peer = dataclasses.replace(peer, uid=uid, inode=inode)
        await self.serve_stream(stream, peer, owner, counted=True)

    async def drain(self) -> None:
        """Wait until no request is being handled (idle keep-alive connections do not count)."""
        while any(c.phase == "busy" for c in self._open):
            await anyio.sleep(0.02)

    async def _sweep(self) -> None:
        tick = max(0.02, min(self.limits.request_timeout, self.limits.idle_timeout, self.limits.first_byte_timeout) / 4)
        while True:
            if not self._open:
                await self._arrived.wait()
                self._arrived = anyio.Event()
            await anyio.sleep(tick)
            now = time.monotonic()
            expired = [
                c
                for c in self._open
                if not c.timed_out and (c.deadline <= now or (self._closing and c.phase == "idle"))
            ]
            for connection in expired:
                connection.timed_out = True
                if connection.phase == "request":
                    with anyio.move_on_after(1.0), _quiet():
                        await connection.stream.send(self._request_timeout)
                with anyio.CancelScope(shield=True), _quiet():
                    await connection.stream.aclose()

    async def shed_idle(self, owner: object = None) -> bool:
        """Close one idle connection (between requests, or silent since accept) to make room for a new
        one: `owner`'s oldest idle one (at that caller's cap), or with no owner (at the listener's cap)
        the oldest idle one of the caller holding the most. False when there is none.

        So idle and silent connections — whoever holds them — can never lock a listener: only requests
        in progress (each bounded by request_timeout) and per-caller caps bound who gets in."""
        idle = [c for c in self._open if c.phase == "idle" and not c.timed_out and (owner is None or c.owner == owner)]
        if not idle:
            return False
        held: dict[object, int] = {}
        for connection in self._open:
            held[connection.owner] = held.get(connection.owner, 0) + 1
        victim = min(idle, key=lambda c: (-held[c.owner], c.since))
        victim.timed_out = True
        with anyio.CancelScope(shield=True), _quiet():
            await victim.stream.aclose()
        return True

    async def serve_stream(
        self, stream: ByteStream, peer: Peer | None = None, owner: object = None, *, counted: bool = False
    ) -> None:
        """Serve one accepted connection until it closes; never raises. `owner` is who the connection is
        counted against (for `shed_idle`); `counted`: an accept loop already admitted it under its caps
        (wlidd.api.accept), so this server's own `max_connections` limiter is not applied again."""
        if not counted:
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                await self._reject_busy(stream)
                return
        connection = _Connection(stream, time.monotonic() + self.limits.first_byte_timeout, owner)
        self._open.add(connection)
        self._arrived.set()
        try:
            await self._serve(connection, peer if peer is not None else stream_peer(stream))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass
        finally:
            self._open.discard(connection)
            if not counted:
                self._slots.release()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _reject_busy(self, stream: ByteStream) -> None:
        with anyio.move_on_after(1.0), _quiet():
            await stream.send(self._too_many_connections)
        with anyio.CancelScope(shield=True):
            await stream.aclose()

    async def _read_request(self, conn: h11.Connection, connection: _Connection) -> tuple[h11.Request, bytes] | None:
        """The rest of a request h11 already holds the start of (`_serve` fed it), or None when the
        peer closed."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._receive(connection, mid_request=True))
            elif isinstance(event, h11.Request):
                if not event.http_version.startswith(b"1."):
                    version = event.http_version.decode("ascii", "replace")
                    raise ApiError(
                        505,
                        "http_version_not_supported",
                        f"HTTP/{version} is not supported; this server speaks HTTP/1.1",
                    )
                header_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if header_bytes > self.limits.max_header_bytes:
                    raise ApiError(
                        431, "headers_too_large", f"request headers over {self.limits.max_header_bytes} bytes"
                    )
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise ApiError(413, "payload_too_large", f"request body over {self.limits.max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                connection.phase, connection.deadline = "busy", float("inf")
                return request, bytes(body)
            else:  # ConnectionClosed, or a closed peer between requests
                return None

    async def _send_error(self, stream: ByteStream, status: int, code: str, message: str) -> None:
        with anyio.move_on_after(2.0), _quiet():
            await stream.send(
                serialize_response(with_headers(Response.error(status, code, message), self.headers), close=True)
            )

    # long: one connection's request loop: the pending bytes, the fast path and the h11 fallback share its state
    async def _serve(self, connection: _Connection, peer: Peer) -> None:
        stream = connection.stream
        limit = self.limits.max_header_bytes
        pending = b""  # received, not yet parsed (pipelined requests included)
        while True:
            head_end = pending.find(b"\r\n\r\n", 0, limit)
            if _BARE_LF.search(pending, 0, head_end if head_end >= 0 else limit) is not None:
                # RFC 9112 §2.2 lets a server accept bare LF; we refuse it at once rather than wait for a
                # CRLF CRLF that a bare-LF client never sends (it would hang until the 408).
                await self._send_error(stream, 400, "bad_request", "request line endings must be CRLF, not bare LF")
                return
            if head_end < 0 and len(pending) < limit:
                # The common case waits here: no complete head yet.
                data = await self._receive(connection, mid_request=bool(pending))
                if data:
                    pending += data
                    continue
                if not pending:
                    return  # closed between requests
            simple = parse_simple_request(pending[:head_end]) if head_end >= 0 else None
            if simple is not None:
                method, target, headers, close = simple
                pending = pending[head_end + 4 :]
                connection.phase, connection.deadline = "busy", float("inf")
                request = self._request(method, target, headers, b"", peer)
            else:
                # Anything else (bodies, unusual syntax, errors, a peer that closed mid-request): h11.
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
                conn.receive_data(pending)
                if head_end < 0 and len(pending) < limit:
                    conn.receive_data(b"")  # the peer closed mid-request
                try:
                    received = await self._read_request(conn, connection)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    await self._send_error(stream, status, _REASONS.get(status, "bad_request"), str(exc))
                    return
                except ApiError as exc:
                    await self._send_error(stream, exc.http_status, exc.reason, exc.message)
                    return
                if received is None:
                    return
                event, body = received
                request = self._request(event.method, event.target, event.headers, body, peer)
                close = conn.their_state is h11.MUST_CLOSE or not _keep_alive(event)
                pending = conn.trailing_data[0]
            route, handler = self._route(request)
            if self._holds is not None and self._holds(request):
                answered, meanwhile = await self._dispatch_held(connection, request, handler)
                pending += meanwhile
                if answered is None:
                    return  # the client went away while its request was held
            else:
                answered = await self._dispatch(request, handler)
            response = with_headers(answered, self.headers)
            if self.on_response is not None:
                self.on_response(request, response, route)
            close = close or self._closing
            connection.requests += 1
            # A client that never reads (pipelining without reading answers) would hold this send, and
            # the connection, forever: the sweeper closes it once idle_timeout passes.
            connection.deadline = time.monotonic() + self.limits.idle_timeout
            await stream.send(serialize_response(response, close=close, head=request.method == "HEAD"))
            if close:
                return

    async def _receive(self, connection: _Connection, *, mid_request: bool) -> bytes:
        """More bytes (b"" when the peer closed), under the connection's deadlines: idle_timeout for
        the first byte of a request, then request_timeout for the whole of it."""
        now = time.monotonic()
        if not mid_request:
            wait = self.limits.idle_timeout if connection.requests else self.limits.first_byte_timeout
            connection.phase, connection.deadline = "idle", now + wait
        elif connection.phase != "request":
            connection.phase, connection.deadline = "request", now + self.limits.request_timeout
        try:
            data = await connection.stream.receive(65536)
        except anyio.EndOfStream:
            return b""
        if connection.phase == "idle" and data:
            connection.phase, connection.deadline = "request", time.monotonic() + self.limits.request_timeout
        return data

    async def _dispatch_held(
        self, connection: _Connection, request: Request, handler: Handler
    ) -> tuple[Response | None, bytes]:
        """Handle a request the handler may hold, watching the connection meanwhile: (the answer, or None
        when the client closed the connection first; bytes the client sent meanwhile). The connection is
        watched for its close until the answer, pipelined bytes included (a client that sent one byte and
        left kept its hold, and its slot, until `timeout_sec`); more than HELD_PIPELINE_LIMIT bytes sent
        meanwhile end the hold like a close (no client needs to queue that much behind a wait)."""
        answered: list[Response] = []
        received = bytearray()
        async with anyio.create_task_group() as tg:

            async def answer() -> None:
                answered.append(await self._dispatch(request, handler))
                tg.cancel_scope.cancel()

            async def watch() -> None:
                while True:
                    try:
                        data = await connection.stream.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        data = b""
                    received.extend(data)
                    if not data or len(received) > HELD_PIPELINE_LIMIT:
                        answered.clear()
                        tg.cancel_scope.cancel()  # gone: the handler is cancelled, nothing is sent
                        return

            tg.start_soon(answer)
            tg.start_soon(watch)
        return (answered[0] if answered else None), bytes(received)

    def _request(
        self, method: bytes, target_bytes: bytes, raw_headers: Iterable[tuple[bytes, bytes]], body: bytes, peer: Peer
    ) -> Request:
        target = target_bytes.decode("latin-1")
        headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw_headers)
        absolute = None if target.startswith("/") else _ABSOLUTE_FORM.fullmatch(target)  # origin form: no match
        if absolute is not None:  # RFC 9112 §3.2.2: the target's authority replaces the Host header
            authority = absolute["authority"].rpartition("@")[2]
            target = absolute["rest"] if absolute["rest"].startswith("/") else "/" + absolute["rest"]
            headers = tuple((k, authority if k == "host" else v) for k, v in headers)
        path, _, query = target.partition("?")
        return Request(
            method=method.decode("ascii", "replace"),
            path=unquote(path) or "/",
            query=parse_qs(query, keep_blank_values=True) if query else {},
            headers=headers,
            body=body,
            peer=peer,
            listener=self.name,
        )

    async def _dispatch(self, request: Request, handler: Handler) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return Response.error(exc.http_status, exc.reason, exc.message)
        except Exception as exc:  # a handler bug must not kill the connection loop or leak details
            log.error("request handler failed", path=request.path, error_type=type(exc).__name__)
            return Response.error(500, "internal_error", "internal error; see the daemon log")


def _labelled(handler: Handler) -> Callable[[Request], tuple[str, Handler]]:
    """The `route` of a handler that does not route: its `route_template(path)` as the label, else "other"."""
    template: Callable[[str], str] | None = getattr(handler, "route_template", None)
    if template is None:
        return lambda _request: (OTHER_ROUTE, handler)
    return lambda request: (template(request.path), handler)


HELD_PIPELINE_LIMIT = 16 * 1024  # bytes a client may pipeline behind a held request (one request head's cap)
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://(?P<authority>[^/?#]*)(?P<rest>[^#]*)")
_SIMPLE_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1")
_SIMPLE_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[!-~](?:[ -~\t]*[!-~])?)?)[ \t]*")


def parse_simple_request(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bool] | None:
    """The request head of the hot path (GET or HEAD, HTTP/1.1, printable ASCII, exactly one Host, no
    body headers) as (method, target, headers with lower-case names, close); None for anything else,
    which goes to h11 unchanged. Stricter than h11 everywhere, so it accepts nothing h11 would refuse."""
    lines = head.split(b"\r\n")
    first = _SIMPLE_REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    for line in lines[1:]:
        field = _SIMPLE_FIELD.fullmatch(line)
        if field is None:
            return None
        name, value = field.group(1).lower(), field.group(2)
        if name == b"content-length" or name == b"transfer-encoding":
            return None
        if name == b"host":
            hosts += 1
        headers.append((name, value))
    if hosts != 1:
        return None
    return first.group(1), first.group(2), headers, _asks_to_close(headers)


def _asks_to_close(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def _keep_alive(event: h11.Request) -> bool:
    return not _asks_to_close(event.headers) and event.http_version != b"1.0"


class _quiet:
    """Swallow the errors of writing to a peer that already went away."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(
            kind, anyio.BrokenResourceError | anyio.ClosedResourceError | OSError | h11.LocalProtocolError
        )
