"""Plain (non-TLS) connections served from an asyncio protocol: the HTTP server's hot path.

anyio's socket streams add and remove the socket's reader around every wait (bench/PROFILES.md); a
`ProtocolStream` registers the socket with the event loop once for the connection's life (`_Reader`, an
asyncio.BufferedProtocol) and keeps anyio's stream contract (`ProtocolStream`'s docstring), so the server
serves it like any other byte stream. A TLS connection keeps anyio's streams (a TLSStream over a socket
stream).

The hot path's answers go out from the protocol's callback (`ProtocolStream.answer_in_callback`): a request
the server can answer without waiting for anything (a cached token for a caller it knows) is answered as its
bytes arrive, without waking the connection's task: one pass of the event loop per request, not two.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

import anyio
from anyio.abc import SocketStream

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

    __slots__ = ("answer", "buffered", "chunks", "eof", "error", "lost", "paused", "readable", "transport", "writable")

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
        self.answer: Callable[[bytes], bytes | None] | None = None  # ProtocolStream.answer_in_callback

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(0)  # pause_writing as soon as a write is not taken whole

    def get_buffer(self, sizehint: int) -> memoryview:
        return _scratch[: max(READ_AHEAD - self.buffered, 1)]  # reading pauses at READ_AHEAD anyway

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(_scratch[:nbytes])
        if (
            self.answer is not None
            and self.readable is not None  # a receive waits, with nothing buffered before these bytes
            and not self.readable.done()
            and not self.chunks
            and self.transport is not None
            and not self.transport.get_write_buffer_size()  # the last answer went out whole (no send waits)
        ):
            reply = self.answer(data)
            if reply is not None:
                self.transport.write(reply)
                return
        self.chunks.append(data)
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

    def answer_in_callback(self, answer: Callable[[bytes], bytes | None] | None) -> None:
        """Let `answer(data)` take bytes as they arrive, in the event loop's callback: it returns the bytes
        of their answer, written at once (the kernel takes them, or the transport keeps the rest and the next
        `send` waits for it), or None, and the bytes go to `receive` as always. It is asked only while a
        receive waits with nothing buffered and the last answer went out whole, so `answer` sees each
        request's first bytes, in order, and never overtakes a request or an answer of the connection's
        task; it must not raise. None stops it."""
        self._reader.answer = answer

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
            self._reader.answer = None
            self._transport.abort()  # unregisters the socket from the loop at once
            self._sock.close()  # the transport's own close, a moment later, finds it closed
            _wake(self._reader.readable)
            _wake(self._reader.writable)
