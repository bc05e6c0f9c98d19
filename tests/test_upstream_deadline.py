"""An upstream cannot hold a token fetch: the configured `timeout` bounds the whole exchange (httpx
applies it per read, so a server trickling its headers or body a byte at a time held a fetch, a source's
refresh loop and `wlidd run --oneshot` forever), and an answer larger than MAX_BODY is refused, not
buffered."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from wlidd.errors import UpstreamError
from wlidd.tokens.providers import http
from wlidd.tokens.providers.metadata import fetch_metadata_identity, fetch_metadata_token

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMetadata-Flavor: Google\r\n"


def serve(answer: str) -> Iterator[int]:
    """A one-connection-at-a-time server on loopback: `trickle-body` sends the head then one body byte
    every 0.2 s; `trickle-head` one header byte every 0.2 s; `huge` a 2 MiB JSON body at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    if answer == "huge":
                        body = b'{"access_token": "' + b"a" * (2 << 20) + b'", "expires_in": 3600}'
                        conn.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                        continue
                    data = HEAD + b"Content-Length: 100000\r\n\r\n" if answer == "trickle-body" else HEAD
                    if answer == "trickle-body":
                        conn.sendall(data)
                    for byte in b"x" * 100 if answer == "trickle-body" else data:
                        if stop.is_set():
                            break
                        conn.sendall(bytes([byte]))
                        time.sleep(0.2)  # the trickle is the behaviour under test
                except OSError:
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.fixture(params=["trickle-body", "trickle-head"])
def trickling(request: pytest.FixtureRequest) -> Iterator[int]:
    yield from serve(request.param)


@pytest.fixture
def huge() -> Iterator[int]:
    yield from serve("huge")


async def test_a_trickling_upstream_is_cut_at_the_timeout_for_the_whole_exchange(trickling: int) -> None:
    async with httpx.AsyncClient(timeout=0.5) as client:
        with anyio.fail_after(10):  # bounds the test only; before the fix this hung for 20 s (100 bytes)
            with pytest.raises(UpstreamError) as caught:
                await fetch_metadata_token(client, f"http://127.0.0.1:{trickling}")
    assert caught.value.code == "timeout"


async def test_a_trickling_identity_endpoint_is_cut_too(trickling: int) -> None:
    async with httpx.AsyncClient(timeout=0.5) as client:
        with anyio.fail_after(10), pytest.raises(UpstreamError) as caught:
            await fetch_metadata_identity(client, f"http://127.0.0.1:{trickling}", audience="https://a.example")
    assert caught.value.code == "timeout"


async def test_an_answer_larger_than_the_cap_is_refused_not_buffered(huge: int) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(UpstreamError) as caught:
            await fetch_metadata_token(client, f"http://127.0.0.1:{huge}")
    assert caught.value.code == "bad_response" and str(http.MAX_BODY) in caught.value.message
