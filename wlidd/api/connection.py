"""One connection's requests, read and answered in turn: the HTTP server's request loop (wlidd.api.server
owns the sockets, the connection limits, the sweeper that enforces the deadlines, and the drain).

Each turn of the loop goes through four states, each its own step:
  1. head: wait until the bytes received hold a whole request head (`_await_head`); a head with bare-LF
     line endings is answered 400 at once (RFC 9112 §2.2: we do not guess);
  2. read: the hot path's parser takes the head (wlidd.api.request_head), else h11 reads the request
     (`_read_h11`: bodies, unusual syntax, protocol errors, a peer that closed mid-request), with the
     limits: headers larger than `max_header_bytes` → 431, a body larger than `max_body_bytes` → 413, an
     HTTP major version other than 1 → 505 (RFC 9110 §15.6.6), a protocol error → h11's status hint;
  3. handle: the handler's answer (`_dispatch`: a handler crash becomes 500), or for a request the handler
     may hold, the answer while the connection is watched (`_dispatch_held`, below);
  4. answer: the server's headers added, `on_response` told, the bytes sent (`_answer`).
The connection's `phase` and `deadline` say what the sweeper enforces: `first_byte_timeout` before the
first request, `idle_timeout` between requests, `request_timeout` for a request being received, none
while one is handled ("busy").

A handler may hold a request for long (a long poll: the metadata API's wait_for_change). It says which by
a `holds(request) -> bool` method; while such a request is handled, the connection is watched: a client
that closes it ends the handler (cancelled, no answer), and bytes it sends meanwhile (a pipelined request)
are kept for after the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import h11
from anyio.abc import ByteStream

from wlidd.api.messages import ERROR_CODES, Handler, Request, Response, labelled, serialize_response, with_headers
from wlidd.api.peers import Peer
from wlidd.api.request_head import BARE_LF, keep_alive, make_request, parse_simple_request
from wlidd.errors import ApiError
from wlidd.logs import get_logger

log = get_logger("wlidd.api")

HELD_PIPELINE_LIMIT = 16 * 1024  # bytes a client may pipeline behind a held request (one request head's cap)


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 256
    first_byte_timeout: float = 5.0  # seconds from accept to the first request byte (TLS handshake included)


class Connection:
    """One open connection's state: the bytes received and not yet read, and the timeout bookkeeping the
    sweeper reads."""

    __slots__ = ("deadline", "owner", "pending", "phase", "requests", "since", "stream", "timed_out")

    def __init__(self, stream: ByteStream, deadline: float, owner: object = None) -> None:
        self.stream = stream
        self.deadline = deadline
        self.pending = b""  # received, not yet read (pipelined requests included)
        self.phase = "idle"  # idle (between requests) | request (partly received) | busy (handling)
        self.timed_out = False
        self.requests = 0  # answered so far: before the first, the first-byte deadline applies
        self.owner = owner  # who it is counted against (the accept loop's caller key), for shedding
        self.since = time.monotonic()


class RequestLoop:
    """How a server reads and answers the requests of each of its connections (the module docstring).

    `closing`: the server is stopping; every answer from now on closes its connection."""

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        limits: ServerLimits,
        on_response: Callable[[Request, Response, str], None] | None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.on_response = on_response
        self.closing = False
        self.route = labelled(handler)
        # Put on every answer, this layer's own included (wlidd.api.server).
        self.headers: tuple[tuple[str, str], ...] = tuple(getattr(handler, "response_headers", ()))
        self.holds: Callable[[Request], bool] | None = getattr(handler, "holds", None)

    async def serve(self, connection: Connection, peer: Peer) -> None:
        """Read and answer the connection's requests, one per turn, until either side closes it (raises the
        stream's errors, EndOfStream for a client gone while its request was held: the server catches them)."""
        while True:
            head_end = await self._await_head(connection)
            if head_end is None:
                return  # closed between requests, or a bare-LF head refused
            simple = parse_simple_request(connection.pending[:head_end]) if head_end >= 0 else None
            if simple is not None:  # the hot path
                method, target, headers, close = simple
                connection.pending = connection.pending[head_end + 4 :]
                connection.phase, connection.deadline = "busy", float("inf")
                request = make_request(method, target, headers, b"", peer, self.name)
            else:
                received = await self._read_h11(connection, peer, head_end)
                if received is None:
                    return
                request, close = received
            route, handler = self.route(request)
            if self.holds is not None and self.holds(request):
                answered = await self._dispatch_held(connection, request, handler)
            else:
                answered = await self._dispatch(request, handler)
            if not await self._answer(connection, request, answered, route, close):
                return

    async def _await_head(self, connection: Connection) -> int | None:
        """Receive until `connection.pending` holds a whole request head: the index of its CRLF CRLF; -1 when
        it never will (the peer closed mid-request, or `max_header_bytes` came without one: h11 answers
        those); None when the connection ends (closed between requests, or a bare-LF head answered 400)."""
        limit = self.limits.max_header_bytes
        while True:
            pending = connection.pending
            head_end = pending.find(b"\r\n\r\n", 0, limit)
            if BARE_LF.search(pending, 0, head_end if head_end >= 0 else limit) is not None:
                # RFC 9112 §2.2 lets a server accept bare LF; we refuse it at once rather than wait for a
                # CRLF CRLF that a bare-LF client never sends (it would hang until the 408).
                await self._send_error(connection, 400, "bad_request", "request line endings must be CRLF, not bare LF")
                return None
            if head_end >= 0 or len(pending) >= limit:
                return head_end
            data = await self._receive(connection, mid_request=bool(pending))  # the common case waits here
            if not data:
                return -1 if pending else None
            connection.pending = pending + data

    async def _read_h11(self, connection: Connection, peer: Peer, head_end: int) -> tuple[Request, bool] | None:
        """A request the hot path does not take, read by h11: (the request, whether the connection closes
        after its answer); None when the connection ends (the peer closed, or the request was refused
        with its error answered). `head_end` as `_await_head` gave it."""
        limit = self.limits.max_header_bytes
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        conn.receive_data(connection.pending)
        if head_end < 0 and len(connection.pending) < limit:
            conn.receive_data(b"")  # the peer closed mid-request
        try:
            received = await self._read_request(conn, connection)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            await self._send_error(connection, status, ERROR_CODES.get(status, "bad_request"), str(exc))
            return None
        except ApiError as exc:
            await self._send_error(connection, exc.http_status, exc.reason, exc.message)
            return None
        if received is None:
            return None
        event, body = received
        request = make_request(event.method, event.target, event.headers, body, peer, self.name)
        close = conn.their_state is h11.MUST_CLOSE or not keep_alive(event)
        connection.pending = conn.trailing_data[0]
        return request, close

    async def _read_request(self, conn: h11.Connection, connection: Connection) -> tuple[h11.Request, bytes] | None:
        """The rest of a request h11 already holds the start of (`_read_h11` fed it), or None when the
        peer closed. Raises ApiError for a request over the limits or of another HTTP major version."""
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

    async def _receive(self, connection: Connection, *, mid_request: bool) -> bytes:
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

    async def _dispatch(self, request: Request, handler: Handler) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return Response.error(exc.http_status, exc.reason, exc.message)
        except Exception as exc:  # a handler bug must not kill the connection loop or leak details
            log.error("request handler failed", path=request.path, error_type=type(exc).__name__)
            return Response.error(500, "internal_error", "internal error; see the daemon log")

    async def _dispatch_held(self, connection: Connection, request: Request, handler: Handler) -> Response:
        """Handle a request the handler may hold, watching the connection meanwhile: the answer (bytes the
        client sent meanwhile are added to `connection.pending`); raises anyio.EndOfStream when the client
        closed the connection first (the server ends it, unanswered). The connection is watched for its
        close until the answer, pipelined bytes included (a client that sent one byte and left kept its
        hold, and its slot, until `timeout_sec`); more than HELD_PIPELINE_LIMIT bytes sent meanwhile end
        the hold like a close (no client needs to queue that much behind a wait)."""
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
        if not answered:
            raise anyio.EndOfStream  # the client went away while its request was held
        connection.pending += bytes(received)
        return answered[0]

    async def _answer(
        self, connection: Connection, request: Request, answered: Response, route: str, close: bool
    ) -> bool:
        """Send the handler's answer with the server's headers and report it (`on_response`, labelled by
        `route`): False when the connection closes after it (the client asked, or the server stops)."""
        response = with_headers(answered, self.headers)
        if self.on_response is not None:
            self.on_response(request, response, route)
        close = close or self.closing
        connection.requests += 1
        # A client that never reads (pipelining without reading answers) would hold this send, and
        # the connection, forever: the sweeper closes it once idle_timeout passes.
        connection.deadline = time.monotonic() + self.limits.idle_timeout
        await connection.stream.send(serialize_response(response, close=close, head=request.method == "HEAD"))
        return not close

    async def _send_error(self, connection: Connection, status: int, code: str, message: str) -> None:
        with anyio.move_on_after(2.0), quiet():
            await connection.stream.send(
                serialize_response(with_headers(Response.error(status, code, message), self.headers), close=True)
            )


class quiet:
    """Swallow the errors of writing to a peer that already went away."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(
            kind, anyio.BrokenResourceError | anyio.ClosedResourceError | OSError | h11.LocalProtocolError
        )
