"""HTTP/1.1 server over anyio byte streams, driven by h11 (server side of httpcore's pattern).

Routes are plain `Request -> Response` functions (wlidd.api.messages); the server owns sockets, limits
and timeouts, in four modules:
  - this one: connections: accept-side limits, the TLS handshake, the timeout sweeper, shedding, drain;
  - wlidd.api.connection: one connection's request loop (head, read, handle, answer), the limits on a
    request: headers larger than `max_header_bytes` → 431, a body larger than `max_body_bytes` → 413, a
    request head with bare-LF line endings → 400 at once (RFC 9112 §2.2: we do not guess), an HTTP
    major version other than 1 (`GET / HTTP/9.9`) → 505 (RFC 9110 §15.6.6), a protocol error → h11's
    status hint (400, 431 …), a handler crash → 500;
  - wlidd.api.request_head: the hot path's parser, and absolute-form targets (`GET http://host/path?q
    HTTP/1.1`, RFC 9112 §3.2.2: served as its path and query, the target's authority as the Host);
  - wlidd.api.plain_stream: plain connections read by an asyncio protocol (the hot path's socket).
The limits this module enforces:
  - a request not complete within `request_timeout` → 408 (slowloris);
  - a new connection that sends nothing (or does not finish its TLS handshake) within
    `first_byte_timeout` is closed; an idle keep-alive connection is closed after `idle_timeout`;
  - connections beyond `max_connections` get 503 and are closed (the daemon counts them earlier, at
    accept, per listener and per caller: wlidd.api.accept);
  - the status line names every status (RFC 9110 §15 reason phrases; wlidd.api.messages.status_text).

A handler may hold a request for long (a long poll: the metadata API's wait_for_change), which it says by
a `holds(request) -> bool` method (wlidd.api.connection). A held request is "busy": no idle or request
deadline applies to it, and it is never shed. `close()` calls the handler's `release_holds()` (if it has
one), so held requests are answered at once when the server stops rather than cut at the drain deadline.

Routing and the metrics label: a handler that routes has a `route(request) -> (template, handler)`
method (wlidd.api.messages.Router); the server asks it once per request, answers with the handler it
returns, and hands the template to `on_response` as the request's route label ("other" when no route
matched). A handler without `route` is labelled by its `route_template(path)`, else "other".

Every answer of a server, this layer's own (400, 408, 413, 431, 500, 503, 505) included, carries the
handler's `response_headers` (if it has that attribute) unless the answer sets that header itself: the
metadata API's `Metadata-Flavor: Google`, which the real metadata server puts on every response and
clients check (gcp-metadata rejects any answer without it).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketStream, UNIXSocketStream
from anyio.streams.tls import TLSStream

from wlidd.api.connection import Connection, RequestLoop, ServerLimits, quiet
from wlidd.api.messages import Handler, Request, Response, serialize_response, with_headers
from wlidd.api.peers import Peer, stream_peer
from wlidd.api.plain_stream import ProtocolStream

_TIMED_OUT = Response.error(408, "request_timeout", "request not received in time")
_BUSY = Response.error(503, "too_many_connections", "connection limit reached; retry later")
TOO_MANY_CONNECTIONS = serialize_response(_BUSY, close=True)


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
        self.limits = limits or ServerLimits()
        self._loop = RequestLoop(handler, name=name, limits=self.limits, on_response=on_response)
        self._release_holds: Callable[[], None] | None = getattr(handler, "release_holds", None)  # long polls
        self.headers = self._loop.headers  # put on every answer, this layer's own included (module docstring)
        self._request_timeout = serialize_response(with_headers(_TIMED_OUT, self.headers), close=True)
        self._too_many_connections = serialize_response(with_headers(_BUSY, self.headers), close=True)
        self._slots = anyio.CapacityLimiter(self.limits.max_connections)
        self._open: set[Connection] = set()
        self._arrived = anyio.Event()

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
        self._loop.closing = True
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
        (wlidd.api.tcp_owner), recorded on the Peer; Unix peers are identified from the socket itself.
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
                if not c.timed_out and (c.deadline <= now or (self._loop.closing and c.phase == "idle"))
            ]
            for connection in expired:
                connection.timed_out = True
                if connection.phase == "request":
                    with anyio.move_on_after(1.0), quiet():
                        await connection.stream.send(self._request_timeout)
                with anyio.CancelScope(shield=True), quiet():
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
        with anyio.CancelScope(shield=True), quiet():
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
        connection = Connection(stream, time.monotonic() + self.limits.first_byte_timeout, owner)
        self._open.add(connection)
        self._arrived.set()
        try:
            await self._loop.serve(connection, peer if peer is not None else stream_peer(stream))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass
        finally:
            self._open.discard(connection)
            if not counted:
                self._slots.release()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _reject_busy(self, stream: ByteStream) -> None:
        with anyio.move_on_after(1.0), quiet():
            await stream.send(self._too_many_connections)
        with anyio.CancelScope(shield=True):
            await stream.aclose()
