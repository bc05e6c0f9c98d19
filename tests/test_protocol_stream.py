"""Plain connections are served from an asyncio protocol (wlidd.api.plain_stream.ProtocolStream).

The socket is registered with the event loop once for the connection's life (anyio's socket streams add
and remove its reader around every wait: the cost bench/PROFILES.md found on the hot path), and the stream
keeps the contract of anyio's: bounded read-ahead, sends that wait for the kernel, EndOfStream after the
peer's last bytes, BrokenResourceError on a reset, ClosedResourceError for a waiter when another task
closes the stream. The HTTP behaviour on top (limits, timeouts, hostile input) is checked by test_api.py,
test_fuzz*.py and test_hostile_*.py through the daemon, which serves its Unix and plain TCP listeners this way.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from tests.conftest import wait_until
from wlidd.api.messages import Request, Response
from wlidd.api.plain_stream import READ_AHEAD, ProtocolStream
from wlidd.api.server import HttpServer


def count_registrations(monkeypatch: pytest.MonkeyPatch, fd: int) -> Counter[str]:
    """Count the event loop's selector calls (register, modify, unregister) for descriptor `fd`."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    counts: Counter[str] = Counter()
    for name in ("register", "modify", "unregister"):
        original: Callable[..., Any] = getattr(selector, name)

        def counted(fileobj: Any, *args: Any, _name: str = name, _original: Callable[..., Any] = original) -> Any:
            if (fileobj if isinstance(fileobj, int) else fileobj.fileno()) == fd:
                counts[_name] += 1
            return _original(fileobj, *args)

        monkeypatch.setattr(selector, name, counted)
    return counts


async def exchange(sock: socket.socket, requests: int) -> list[bytes]:
    """`requests` keep-alive GETs, each sent once the answer to the one before arrived (a client in the
    same event loop: the server has always read everything and waits for bytes when the next comes)."""
    loop = asyncio.get_running_loop()
    answers = []
    for _ in range(requests):
        await loop.sock_sendall(sock, b"GET /ping HTTP/1.1\r\nHost: wlidd\r\n\r\n")
        data = b""
        while not data.endswith(b"pong"):
            data += await loop.sock_recv(sock, 65536)
        answers.append(data)
    sock.close()
    return answers


async def test_a_keep_alive_connection_is_registered_with_the_event_loop_once_not_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """50 requests over one Unix connection: the server's socket is registered with the loop's selector
    once (and unregistered once at the end), not added and removed around every wait for bytes."""

    async def pong(request: Request) -> Response:
        return Response.text(200, "pong")

    server = HttpServer(pong, name="unix")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    counts = count_registrations(monkeypatch, ours.fileno())
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve_socket, ours)
        with anyio.fail_after(10):
            answers = await exchange(theirs, 50)
    assert len(answers) == 50 and all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
    assert sum(counts.values()) <= 3, counts


async def accepted_pair() -> tuple[ProtocolStream, socket.socket]:
    """A ProtocolStream over one end of a Unix socket pair, and the other end (blocking) for the peer."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return await ProtocolStream.from_accepted(ours), theirs


async def test_a_client_pipelining_more_than_read_ahead_is_read_up_to_it_then_paused_and_loses_nothing() -> None:
    """256 KiB sent while the server takes nothing: reading pauses at READ_AHEAD bytes held (the rest waits
    in the kernel, as it would for a server not reading); taken, every byte arrives, in order."""
    stream, peer = await accepted_pair()
    sent = bytes(range(256)) * 1024
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, peer.sendall, sent)
        await wait_until(lambda: not stream.reading, what="reading paused")
        assert stream.buffered == READ_AHEAD
        received = bytearray()
        while len(received) < len(sent):
            received += await stream.receive(65536)
    assert bytes(received) == sent
    assert stream.reading and stream.buffered == 0
    await stream.aclose()
    peer.close()


async def test_the_peers_last_bytes_come_before_end_of_stream_and_it_can_still_be_answered() -> None:
    """A peer that sends and shuts its writing half: its bytes, then EndOfStream; an answer still reaches
    it (a server answers a request cut short with a 400)."""
    stream, peer = await accepted_pair()
    peer.sendall(b"GET / HTTP/1.1\r\n")
    peer.shutdown(socket.SHUT_WR)
    assert await stream.receive() == b"GET / HTTP/1.1\r\n"
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    peer.settimeout(5)
    assert peer.recv(100) == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    await stream.aclose()
    peer.close()


async def test_closing_the_stream_wakes_a_waiting_receive_and_closes_the_socket_at_once() -> None:
    """The sweeper closes a stalled connection from its own task: the connection's waiting receive gets
    ClosedResourceError, and the socket is closed when aclose returns (its descriptor is free)."""
    stream, peer = await accepted_pair()
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    outcome: list[BaseException] = []

    async def wait_for_bytes() -> None:
        try:
            await stream.receive()
        except anyio.ClosedResourceError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_bytes)
        await wait_until(lambda: stream._reader.readable is not None, what="the receive waits")
        await stream.aclose()
        assert raw.fileno() < 0
    assert len(outcome) == 1
    peer.close()


async def test_a_send_to_a_client_that_does_not_read_waits_until_closed() -> None:
    """A client that never reads: send waits until the kernel took every byte (nothing piles up in the
    daemon beyond the socket's buffers); closing the stream ends the wait with ClosedResourceError."""
    stream, peer = await accepted_pair()
    outcome: list[BaseException] = []

    async def send_much() -> None:
        try:
            await stream.send(b"x" * (8 << 20))
        except anyio.ClosedResourceError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send_much)
        await wait_until(lambda: stream._reader.writable is not None, what="the send waits for the kernel")
        await stream.aclose()
    assert len(outcome) == 1
    peer.close()


async def test_a_peer_that_resets_the_connection_gives_broken_resource_error() -> None:
    """A TCP peer that resets (SO_LINGER 0): the next receive raises BrokenResourceError, the error anyio's
    streams raise and the server ends the connection on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
    conn.setblocking(False)
    stream = await ProtocolStream.from_accepted(conn)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with pytest.raises(anyio.BrokenResourceError):
        with anyio.fail_after(5):
            await stream.receive()
    await stream.aclose()
