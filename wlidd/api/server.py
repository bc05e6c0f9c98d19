"""HTTP/1.1 server over anyio byte streams, driven by h11 (server side of httpcore's pattern).

Routes are plain `Request -> Response` functions; this module owns sockets, limits and timeouts:
  - headers larger than `max_header_bytes` → 431; a body larger than `max_body_bytes` → 413;
  - a request not complete within `request_timeout` → 408 (slowloris);
  - an idle keep-alive connection is closed after `idle_timeout`;
  - connections beyond `max_connections` get 503 and are closed;
  - a protocol error becomes h11's status hint (400, 431 …); a handler crash becomes 500.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import h11
import structlog
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSAttribute

from wlidd.errors import ApiError

log = structlog.get_logger("wlidd.api")

SERVER_NAME = b"wlidd"


@dataclass(frozen=True)
class Peer:
    """Who is calling: Unix peer credentials (SO_PEERCRED) and/or a TLS peer's SPIFFE ID."""

    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    address: str = ""
    spiffe_id: str | None = None
    certificate: bytes | None = field(default=None, repr=False)  # a TLS peer's leaf, DER


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

_REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    431: "headers_too_large",
    500: "internal_error",
    503: "unavailable",
}


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 256


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix socket peer, from SO_PEERCRED; None for other families."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def stream_peer(stream: ByteStream) -> Peer:
    """Who is on the other end: SO_PEERCRED for Unix sockets, the certificate for TLS."""
    try:
        der = stream.extra(TLSAttribute.peer_certificate_binary)
    except anyio.TypedAttributeLookupError:
        return unix_peer(stream)
    try:
        address = str(stream.extra(SocketAttribute.remote_address))
    except anyio.TypedAttributeLookupError:
        address = ""
    return Peer(address=address, certificate=der)


def unix_peer(stream: ByteStream) -> Peer:
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return Peer()
    creds = peer_credentials(sock)
    if creds is None:
        return Peer()
    pid, uid, gid = creds
    return Peer(uid=uid, gid=gid, pid=pid, address=f"pid={pid},uid={uid}")


class HttpServer:
    """Serves one handler on any number of listeners; one instance per listener kind."""

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        limits: ServerLimits | None = None,
        on_response: Callable[[Request, Response], None] | None = None,
    ) -> None:
        self.handler = handler
        self.name = name
        self.limits = limits or ServerLimits()
        self.on_response = on_response
        self._slots = anyio.CapacityLimiter(self.limits.max_connections)

    async def serve_stream(self, stream: ByteStream, peer: Peer | None = None) -> None:
        """Serve one accepted connection until it closes; never raises."""
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._reject_busy(stream)
            return
        try:
            await self._serve(stream, peer if peer is not None else stream_peer(stream))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass
        finally:
            self._slots.release()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _reject_busy(self, stream: ByteStream) -> None:
        response = Response.error(503, "too_many_connections", "connection limit reached; retry later")
        conn = h11.Connection(h11.SERVER)
        with anyio.move_on_after(1.0), _quiet():
            await stream.send(
                conn.send(h11.Response(status_code=503, headers=self._headers(response, close=True)))
                + conn.send(h11.Data(data=response.body))
                + conn.send(h11.EndOfMessage())
            )
        with anyio.CancelScope(shield=True):
            await stream.aclose()

    def _headers(self, response: Response, *, close: bool) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            (b"server", SERVER_NAME),
            (b"cache-control", b"no-store"),
        ]
        headers += [(k.encode(), v.encode()) for k, v in response.headers]
        if close:
            headers.append((b"connection", b"close"))
        return headers

    async def _receive_into(self, conn: h11.Connection, stream: ByteStream) -> None:
        try:
            data = await stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            data = b""
        conn.receive_data(data)

    async def _next_event(self, conn: h11.Connection, stream: ByteStream) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                await self._receive_into(conn, stream)
                continue
            return event

    async def _read_request(self, conn: h11.Connection, stream: ByteStream) -> tuple[h11.Request, bytes] | None:
        # Wait for the first byte up to idle_timeout; then the whole request within request_timeout.
        if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
            with anyio.move_on_after(self.limits.idle_timeout) as idle:
                await self._receive_into(conn, stream)
            if idle.cancelled_caught:
                return None
        with anyio.fail_after(self.limits.request_timeout):
            event = await self._next_event(conn, stream)
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request), event
            header_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if header_bytes > self.limits.max_header_bytes:
                raise ApiError(431, "headers_too_large", f"request headers over {self.limits.max_header_bytes} bytes")
            body = bytearray()
            while True:
                part = await self._next_event(conn, stream)
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > self.limits.max_body_bytes:
                        raise ApiError(
                            413, "payload_too_large", f"request body over {self.limits.max_body_bytes} bytes"
                        )
                elif isinstance(part, h11.EndOfMessage):
                    return event, bytes(body)
                else:
                    return None

    async def _send(self, conn: h11.Connection, stream: ByteStream, response: Response, *, close: bool) -> None:
        data = conn.send(h11.Response(status_code=response.status, headers=self._headers(response, close=close)))
        data += conn.send(h11.Data(data=response.body)) if response.body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send(data)

    async def _send_error(self, conn: h11.Connection, stream: ByteStream, status: int, code: str, message: str) -> None:
        if conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
            return
        response = Response.error(status, code, message)
        with anyio.move_on_after(2.0), _quiet():
            await self._send(conn, stream, response, close=True)

    async def _serve(self, stream: ByteStream, peer: Peer) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        while True:
            try:
                received = await self._read_request(conn, stream)
            except TimeoutError:
                await self._send_error(conn, stream, 408, "request_timeout", "request not received in time")
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._send_error(conn, stream, status, _REASONS.get(status, "bad_request"), str(exc))
                return
            except ApiError as exc:
                await self._send_error(conn, stream, exc.http_status, exc.reason, exc.message)
                return
            if received is None:
                return
            request = self._request(received[0], received[1], peer)
            response = await self._dispatch(request)
            if self.on_response is not None:
                self.on_response(request, response)
            close = conn.their_state is h11.MUST_CLOSE or not _keep_alive(received[0])
            await self._send(conn, stream, response, close=close)
            if conn.our_state is h11.MUST_CLOSE or close:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _request(self, event: h11.Request, body: bytes, peer: Peer) -> Request:
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers)
        return Request(
            method=event.method.decode("ascii", "replace"),
            path=unquote(parts.path) or "/",
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=headers,
            body=body,
            peer=peer,
            listener=self.name,
        )

    async def _dispatch(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except ApiError as exc:
            return Response.error(exc.http_status, exc.reason, exc.message)
        except Exception as exc:  # a handler bug must not kill the connection loop or leak details
            log.error("request handler failed", path=request.path, error_type=type(exc).__name__)
            return Response.error(500, "internal_error", "internal error; see the daemon log")


def _keep_alive(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name.lower() == b"connection" and b"close" in value.lower():
            return False
    return event.http_version != b"1.0"


class _quiet:
    """Swallow the errors of writing to a peer that already went away."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(
            kind, anyio.BrokenResourceError | anyio.ClosedResourceError | OSError | h11.LocalProtocolError
        )
