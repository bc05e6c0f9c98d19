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
from structlog.testing import capture_logs

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


# ---- answers from the event loop's callback (wlidd.api.connection, ProtocolStream.answer_in_callback) ----
class Answering:
    """A handler whose `answer_now` answers GETs of /now/… at once, route "/now/{x}" (the body names the
    path); everything else it leaves to its async `__call__`, which answers the same way, route "other".
    It counts the requests each side answered."""

    def __init__(self) -> None:
        self.now: list[str] = []
        self.called: list[str] = []

    def answer_now(self, request: Request) -> tuple[str, Response] | None:
        if request.method != "GET" or not request.path.startswith("/now/"):
            return None
        self.now.append(request.path)
        return "/now/{x}", Response.text(200, request.path)

    async def __call__(self, request: Request) -> Response:
        self.called.append(request.path)
        return Response.text(200, request.path)


async def ask(sock: socket.socket, raw: bytes, answers: int = 1) -> bytes:
    """Send `raw`, return once `answers` whole answers (text bodies naming their path) arrived."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, raw)
    data = b""
    while data.count(b"HTTP/1.1 ") < answers or not _complete(data):
        data += await loop.sock_recv(sock, 65536)
    return data


def _complete(data: bytes) -> bool:
    head, _, body = data.rpartition(b"\r\n\r\n")
    length = int(head.rsplit(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    return len(body) >= length


async def serving(
    handler: Any, client: Callable[[socket.socket, HttpServer], Any], responses: list[tuple[str, int]] | None = None
) -> Any:
    """Serve one Unix connection with `handler`; run `client(sock, server)` against it; its result.
    `responses` collects the (route, status) of every answer (`on_response`)."""

    def counted(request: Request, response: Response, route: str) -> None:
        if responses is not None:
            responses.append((route, response.status))

    server = HttpServer(handler, name="unix", on_response=counted)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve_socket, ours)
        with anyio.fail_after(10):
            result = await client(theirs, server)
        theirs.close()
    return result


async def test_a_request_the_handler_answers_now_is_answered_from_the_callback_not_by_the_connection_task() -> None:
    """50 keep-alive GETs the handler can answer at once: each is answered by `answer_now`, from the event
    loop's callback, with the route it names counted (`on_response`); the handler's async path is never
    called (the first request of a connection included)."""
    handler = Answering()
    responses: list[tuple[str, int]] = []

    async def client(sock: socket.socket, server: HttpServer) -> list[bytes]:
        return [await ask(sock, b"GET /now/1 HTTP/1.1\r\nHost: wlidd\r\n\r\n") for _ in range(50)]

    answers = await serving(handler, client, responses)
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(b"\r\n\r\n/now/1") for a in answers)
    assert handler.called == [] and handler.now == ["/now/1"] * 50
    assert responses == [("/now/{x}", 200)] * 50


async def test_an_answer_from_the_callback_has_the_bytes_of_the_same_answer_from_the_task() -> None:
    """The same response, once answered at once and once through the handler's async path (a path
    `answer_now` leaves): the same bytes but for the body naming the path."""
    handler = Answering()

    async def client(sock: socket.socket, server: HttpServer) -> tuple[bytes, bytes]:
        now = await ask(sock, b"GET /now/abc HTTP/1.1\r\nHost: wlidd\r\n\r\n")
        later = await ask(sock, b"GET /not/abc HTTP/1.1\r\nHost: wlidd\r\n\r\n")
        return now, later

    now, later = await serving(handler, client)
    assert handler.now == ["/now/abc"] and handler.called == ["/not/abc"]
    assert now == later.replace(b"/not/abc", b"/now/abc")


@pytest.mark.parametrize(
    ("raw", "answers"),
    [
        (b"GET /now/1 HTTP/1.1\r\nHost: wlidd\r\n\r\nGET /now/2 HTTP/1.1\r\nHost: wlidd\r\n\r\n", 2),  # pipelined
        (b"GET /now/1 HTTP/1.1\r\nHost: wlidd\r\nConnection: close\r\n\r\n", 1),  # closes after
        (b"HEAD /now/1 HTTP/1.1\r\nHost: wlidd\r\n\r\n", 1),  # no body
        (b"GET /now/1 HTTP/1.0\r\nHost: wlidd\r\n\r\n", 1),  # not the hot path's head
        (b"GET /now/1 HTTP/1.1\r\nHost: wl", 1),  # a head in two reads
    ],
    ids=["pipelined", "connection-close", "head", "http-1.0", "split-head"],
)
async def test_requests_that_are_not_one_simple_keep_alive_get_go_to_the_connection_task(
    raw: bytes, answers: int
) -> None:
    """After a simple GET answered from the callback, on the same connection: two requests in one read, a
    request asking to close, a HEAD, an HTTP/1.0 head, a head arriving in two reads are not answered from
    the callback; the connection's task answers them as before (in order; `connection: close` when asked;
    no body to a HEAD)."""
    handler = Answering()

    async def client(sock: socket.socket, server: HttpServer) -> bytes:
        loop = asyncio.get_running_loop()
        await ask(sock, b"GET /now/0 HTTP/1.1\r\nHost: wlidd\r\n\r\n")
        await loop.sock_sendall(sock, raw)
        if raw.endswith(b"wl"):  # the rest once the server holds the first part
            await wait_until(lambda: any(c.pending for c in server._open), what="the first part read")
            await loop.sock_sendall(sock, b"idd\r\n\r\n")
        data = b""
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
            if data.count(b"HTTP/1.") == answers and (b"HEAD" in raw or _complete(data)):
                break
        return data

    data = await serving(handler, client)
    assert handler.now == ["/now/0"]
    assert data.count(b"HTTP/1.1 200 OK\r\n") == answers
    if b"close" in raw:
        assert b"connection: close\r\n" in data
    if raw.startswith(b"HEAD"):
        assert data.endswith(b"\r\n\r\n")


async def test_a_connection_asking_different_paths_in_turn_gets_the_answer_of_each() -> None:
    """A connection's last request head is remembered (not parsed again when repeated): a client changing
    paths back and forth gets each path's own answer."""
    handler = Answering()

    async def client(sock: socket.socket, server: HttpServer) -> list[bytes]:
        paths = [b"/now/a", b"/now/b", b"/now/b", b"/now/a", b"/not/a", b"/now/a"]
        return [await ask(sock, b"GET " + p + b" HTTP/1.1\r\nHost: wlidd\r\n\r\n") for p in paths]

    answers = await serving(handler, client)
    assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [
        b"/now/a",
        b"/now/b",
        b"/now/b",
        b"/now/a",
        b"/not/a",
        b"/now/a",
    ]
    assert handler.called == ["/not/a"]


async def test_an_answer_now_that_raises_leaves_the_request_to_the_connection_task() -> None:
    """A bug in `answer_now` neither breaks the connection nor loses the request: the connection's task
    answers it (here through the handler's async path), and the failure is logged (at error, through the
    repeat limiter)."""

    class Broken(Answering):
        def answer_now(self, request: Request) -> tuple[str, Response] | None:
            raise RuntimeError("a bug")

    handler = Broken()

    async def client(sock: socket.socket, server: HttpServer) -> bytes:
        return await ask(sock, b"GET /now/1 HTTP/1.1\r\nHost: wlidd\r\n\r\n")

    with capture_logs() as logs:
        answer = await serving(handler, client)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and handler.called == ["/now/1"]
    failed = [line for line in logs if line["event"] == "answering from the event loop's callback failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error" and failed[0]["error_type"] == "RuntimeError"
