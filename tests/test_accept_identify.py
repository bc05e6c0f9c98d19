"""The accept loop (wlidd.api.accept) when a caller cannot be identified: out of descriptors (EMFILE) while
asking the kernel who owns a loopback client's socket, the caller is refused with an answer, counted as
`out_of_resources` and logged once for the episode, and the loop goes on. EMFILE is injected into the
lookup, never provoked by exhausting the process's descriptors."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable

import anyio
import pytest
from structlog.testing import capture_logs

from wlidd.api import peers, tcp_owner
from wlidd.api.accept import AcceptLoop, Refusal
from wlidd.api.peers import CallerKey
from wlidd.metrics import Metrics


def out_of_descriptors(*args: object) -> None:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def refusal_answer(conn: socket.socket, refusal: Refusal) -> bytes:
    return f"refused: {refusal.reason}\n".encode()


async def answer_of_a_new_connection(address: tuple[str, int]) -> bytes:
    """What a new client connection gets before the server closes it."""
    async with await anyio.connect_tcp(*address) as client:
        received = b""
        with anyio.fail_after(5):
            while True:
                try:
                    received += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


def refused(metrics: Metrics, reason: str) -> float:
    labels = {"listener": "metadata", "reason": reason}
    return metrics.registry.get_sample_value("wlidd_connections_refused_total", labels) or 0.0


async def run_loop(loop: AcceptLoop, body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` while `loop` accepts, then stop the loop."""
    async with anyio.create_task_group() as tg:
        await tg.start(loop.run)
        try:
            await body()
        finally:
            loop.close()


async def test_a_caller_whose_lookup_runs_out_of_descriptors_is_refused_counted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = Metrics()
    handled: list[CallerKey] = []

    async def handle(conn: socket.socket, key: CallerKey) -> None:
        handled.append(key)
        conn.sendall(b"served\n")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = listener.getsockname()
    loop = AcceptLoop(
        "metadata", listener, handle, max_connections=8, max_per_caller=8, refuse=refusal_answer, metrics=metrics
    )

    async def body() -> None:
        with monkeypatch.context() as patch:
            patch.setattr(peers, "lookup_tcp_peer", out_of_descriptors)  # the loopback owner lookup: EMFILE
            answers = [await answer_of_a_new_connection(address) for _ in range(3)]
        assert answers == [b"refused: out_of_resources\n"] * 3
        assert await answer_of_a_new_connection(address) == b"served\n"  # descriptors free again

    with capture_logs() as logs:
        await run_loop(loop, body)
    assert refused(metrics, "out_of_resources") == 3 and loop.refused == 3
    assert handled == [CallerKey(os.geteuid())] and loop.failure is None
    events = [(line["event"], line["log_level"]) for line in logs]
    started = ("cannot identify callers: out of resources; refusing them until resources are free", "error")
    assert events.count(started) == 1  # once for the episode, not once per caller
    assert ("identifying callers again", "warning") in events
    assert next(line for line in logs if line["event"] == started[0])["error"] == "EMFILE"
    assert next(line for line in logs if line["event"] == "identifying callers again")["refused"] == 3


async def test_a_caller_whose_identification_fails_otherwise_is_refused_as_unidentified() -> None:
    metrics = Metrics()

    async def unreadable_socket_table(conn: socket.socket) -> CallerKey:
        raise OSError(errno.ENOENT, "neither /proc/self/net/tcp nor /proc/self/net/tcp6 can be read")

    async def handle(conn: socket.socket, key: CallerKey) -> None:
        raise AssertionError("an unidentified caller was served")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = listener.getsockname()
    loop = AcceptLoop(
        "metadata",
        listener,
        handle,
        max_connections=8,
        max_per_caller=8,
        identify=unreadable_socket_table,
        refuse=refusal_answer,
        metrics=metrics,
    )

    async def body() -> None:
        assert await answer_of_a_new_connection(address) == b"refused: unidentified\n"

    await run_loop(loop, body)
    assert refused(metrics, "unidentified") == 1 and loop.alive is False and loop.failure is None


def test_running_out_of_descriptors_does_not_make_the_owner_lookup_give_up_sock_diag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EMFILE from the netlink socket says nothing about netlink: the next lookup tries sock_diag again
    (only a refusal, EAFNOSUPPORT or EPERM, sends every later lookup to /proc, in a worker thread)."""
    monkeypatch.setattr(tcp_owner, "_sock_diag", tcp_owner._SockDiag())  # no answer seen yet
    monkeypatch.setattr(tcp_owner._SockDiag, "_query", out_of_descriptors)
    monkeypatch.setattr(tcp_owner, "proc_lookup", out_of_descriptors)
    with pytest.raises(OSError) as raised:
        tcp_owner.lookup_tcp_peer(("127.0.0.1", 40000), ("127.0.0.1", 80))
    assert raised.value.errno == errno.EMFILE
    assert tcp_owner.lookup_is_cheap()


@pytest.mark.parametrize("tls", [False, True])
def test_an_out_of_resources_refusal_answers_503_out_of_resources_not_a_per_caller_cap(tls: bool) -> None:
    """The HTTP listeners' answer to a caller refused while the daemon is out of descriptors: a 503 with
    Retry-After and its own error code (it was answered as `too_many_connections_for_caller`, sending the
    operator after a cap that was not hit); nothing on TLS, as for every refusal before a handshake."""
    from wlidd.api.listener_set import refusal_bytes

    answer = refusal_bytes(Refusal("out_of_resources", "EMFILE while identifying the caller"), tls)
    if tls:
        assert answer == b""
        return
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1" in head.lower()
    assert b'"out_of_resources"' in body
    assert b"for_caller" not in body
