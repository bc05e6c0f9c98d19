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

The hot path's answers need no task at all: a handler with an `answer_now(request) -> (route, Response) |
None` method answers what it can without waiting (a cached token for a known caller); on a plain connection
(wlidd.api.plain_stream) a request it answers is answered from the event loop's callback as its bytes arrive
(`_answer_in_callback`), with what step 4 does (headers, `on_response`, the deadlines), and the
connection's task keeps waiting for the next. Everything else (None, a request that is not one whole simple
head, the server closing) goes through the four steps.

A handler may hold a request for long (a long poll: the metadata API's wait_for_change). It says which by
a `holds(request) -> bool` method; while such a request is handled, the connection is watched: a client
that closes it ends the handler (cancelled, no answer), and bytes it sends meanwhile (a pipelined request)
are kept for after the answer.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream

from wlidd.api.messages import ERROR_CODES, Handler, Request, Response, labelled, serialize_response, with_headers
from wlidd.api.peers import Peer
from wlidd.api.request_head import BARE_LF, keep_alive, make_request, parse_simple_request
from wlidd.errors import ApiError
from wlidd.logs import get_logger

if TYPE_CHECKING:  # h11 is imported by the first request the hot path's parser leaves to it
    import h11

log = get_logger("wlidd.api")

HELD_PIPELINE_LIMIT = 16 * 1024  # bytes a client may pipeline behind a held request (one request head's cap)
REMEMBERED_HEAD = 1024  # bytes of a connection's last request head kept to skip parsing it again


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

    __slots__ = ("deadline", "head", "owner", "parsed", "pending", "phase", "requests", "since", "stream", "timed_out")

    def __init__(self, stream: ByteStream, deadline: float, owner: object = None) -> None:
        self.stream = stream
        self.deadline = deadline
        self.pending = b""  # received, not yet read (pipelined requests included)
        self.phase = "idle"  # idle (between requests) | request (partly received) | busy (handling)
        self.timed_out = False
        self.requests = 0  # answered so far: before the first, the first-byte deadline applies
        self.owner = owner  # who it is counted against (the accept loop's caller key), for shedding
        self.since = time.monotonic()
        # The last request head the hot path's parser took, and what it gave: a client asking the same again
        # on this connection (a token poller) is not parsed again (`RequestLoop._simple_request`).
        self.head = b""
        self.parsed: tuple[Request, bool] | None = None


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
        self.answer_now: Callable[[Request], tuple[str, Response] | None] | None = getattr(handler, "answer_now", None)
        self._serialized: tuple[Response, bytes] | None = None  # the last keep-alive answer and its bytes

    async def serve(self, connection: Connection, peer: Peer) -> None:
        """Read and answer the connection's requests, one per turn, until either side closes it (raises the
        stream's errors, EndOfStream for a client gone while its request was held: the server catches them)."""
        answer_in_callback = getattr(connection.stream, "answer_in_callback", None) if self.answer_now else None
        if answer_in_callback is not None:
            answer_in_callback(functools.partial(self._answer_in_callback, connection, peer))
        try:
            await self._serve(connection, peer)
        finally:
            if answer_in_callback is not None:
                answer_in_callback(None)

    async def _serve(self, connection: Connection, peer: Peer) -> None:
        while True:
            head_end = await self._await_head(connection)
            if head_end is None:
                return  # closed between requests, or a bare-LF head refused
            simple = self._simple_request(connection, connection.pending[:head_end], peer) if head_end >= 0 else None
            if simple is not None:  # the hot path
                request, close = simple
                connection.pending = connection.pending[head_end + 4 :]
                connection.phase, connection.deadline = "busy", float("inf")
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

    def _simple_request(self, connection: Connection, head: bytes, peer: Peer) -> tuple[Request, bool] | None:
        """The Request of a head the hot path's parser takes (wlidd.api.request_head) and whether the client
        asks to close after its answer; None for a head it leaves to h11. The same head as the connection's
        last gives the same Request again (same peer, same listener), unparsed."""
        if head == connection.head:
            return connection.parsed
        simple = parse_simple_request(head)
        parsed = None
        if simple is not None:
            method, target, headers, close = simple
            parsed = make_request(method, target, headers, b"", peer, self.name), close
        if len(head) <= REMEMBERED_HEAD:
            connection.head, connection.parsed = head, parsed
        return parsed

    def _answer_in_callback(self, connection: Connection, peer: Peer, data: bytes) -> bytes | None:
        """The bytes answering `data`, the first bytes of a request on an idle connection, when they are one
        whole request head of the hot path that the handler's `answer_now` answers and the client keeps the
        connection open: step 4 done here (headers, `on_response`, the idle deadline). None leaves `data` to
        the connection's task (the module docstring). Called from the event loop's callback
        (wlidd.api.plain_stream.ProtocolStream.answer_in_callback); an `answer_now` that raises leaves the
        request to the task too (logged, through the repeat limiter)."""
        if connection.phase != "idle" or connection.pending or self.closing or connection.timed_out:
            return None
        head_end = data.find(b"\r\n\r\n", 0, self.limits.max_header_bytes)
        if head_end != len(data) - 4:
            return None  # part of a head, or more than one request: the task answers as always
        # A head with a bare LF is not simple (the parser takes CRLF lines of printable ASCII only): the task
        # refuses it.
        simple = self._simple_request(connection, data[:head_end], peer)
        if simple is None or simple[1]:
            return None
        request = simple[0]
        if self.holds is not None and self.holds(request):
            return None
        assert self.answer_now is not None  # installed only for a handler that has one
        try:
            found = self.answer_now(request)
        except Exception as exc:  # a bug: the connection's task answers instead (a crash there is a 500)
            error = type(exc).__name__
            log.limited("error", "answering from the event loop's callback failed", key={"error_type": error})
            return None
        if found is None:
            return None
        route, answered = found
        response = with_headers(answered, self.headers)
        if self.on_response is not None:
            self.on_response(request, response, route)
        connection.requests += 1
        connection.deadline = time.monotonic() + self.limits.idle_timeout
        return self._serialize(response, request)

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
        import h11  # here, not at start: a daemon whose clients send only simple heads never loads it

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
        import h11

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
        if close:
            await connection.stream.send(serialize_response(response, close=True, head=request.method == "HEAD"))
            return False
        await connection.stream.send(self._serialize(response, request))
        return True

    def _serialize(self, response: Response, request: Request) -> bytes:
        """The bytes of a keep-alive answer to `request`. The same Response as the last one (a cached token's
        answer, until the token or its whole second of expires_in changes) gives the same bytes again,
        unserialized."""
        last = self._serialized
        if last is not None and last[0] is response and request.method != "HEAD":
            return last[1]
        data = serialize_response(response, close=False, head=request.method == "HEAD")
        if request.method != "HEAD":
            self._serialized = (response, data)
        return data

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
        if kind is None:
            return False
        h11 = sys.modules.get("h11")  # only h11's own code raises its errors: not loaded, none to swallow
        gone = anyio.BrokenResourceError | anyio.ClosedResourceError | OSError
        return issubclass(kind, gone) or (h11 is not None and issubclass(kind, h11.LocalProtocolError))
