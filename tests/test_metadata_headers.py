"""Every answer on the metadata listener carries `Metadata-Flavor: Google`, those of the HTTP layer
included (issue 15 item 3): the real server puts it on every response and clients check it (gcp-metadata
rejects an answer without it). Over real sockets, one request per error class."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.conftest import FileSet, in_background
from tests.test_tokens import metadata_token_config
from wlidd.api.connection import ServerLimits
from wlidd.api.messages import Request, Response
from wlidd.api.server import HttpServer
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

EMAIL = "app@demo-project.iam.gserviceaccount.com"
HEAD_LIMIT = 16 * 1024  # ServerLimits.max_header_bytes
BODY_LIMIT = 64 * 1024  # ServerLimits.max_body_bytes


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a new connection and read until the server closes it: (status, headers, body)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        received = b""
        with anyio.fail_after(15):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                if b"\r\n\r\n" in received and b"connection: close" in received.lower():
                    head, _, rest = received.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        None,
                    )
                    if length is not None and len(rest) >= length:
                        break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# One request per error class the HTTP layer answers itself, and the handler's own refusals.
ERRORS: dict[str, tuple[bytes, int]] = {
    "bare LF": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "bad request line": (b"GET\x00 / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "headers too large": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEAD_LIMIT + 16), 431),
    "body too large": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"b" * (BODY_LIMIT + 1),
        413,
    ),
}


# ---- the HTTP layer, for any handler with response_headers -----------------------------------------
class Handler:
    response_headers = (("metadata-flavor", "Google"), ("server", "Metadata Server for VM"))

    async def __call__(self, request: Request) -> Response:
        if request.path == "/crash":
            raise RuntimeError("a handler bug")
        if request.path == "/own":
            return Response(200, b"", "text/plain", (("metadata-flavor", "Mine"),))
        return Response.text(200, "ok")


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, int]]:
    limits = ServerLimits(request_timeout=0.3, idle_timeout=5, max_connections=2, first_byte_timeout=5)
    http = HttpServer(Handler(), name="test", limits=limits)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    stopped = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(http.serve, listener)  # returns once the listener is closed and connections are done
            task_status.started()
            await stopped.wait()
            await listener.aclose()

    async with in_background(run, stopped.set):
        yield http, listener.extra(anyio.abc.SocketAttribute.local_port)


@pytest.mark.parametrize("kind", sorted(ERRORS))
async def test_the_http_layers_own_answers_carry_the_handlers_headers(
    server: tuple[HttpServer, int], kind: str
) -> None:
    data, status = ERRORS[kind]
    seen, headers, _ = await exchange(server[1], data)
    assert seen == status
    assert headers["metadata-flavor"] == "Google" and headers["server"] == "Metadata Server for VM"


async def test_a_timeout_and_a_handler_crash_carry_the_handlers_headers(server: tuple[HttpServer, int]) -> None:
    timeout = await exchange(server[1], b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    crash = await exchange(server[1], b"GET /crash HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (timeout[0], timeout[1]["metadata-flavor"]) == (408, "Google")
    assert (crash[0], crash[1]["metadata-flavor"]) == (500, "Google")


async def test_the_busy_answer_carries_the_handlers_headers(server: tuple[HttpServer, int]) -> None:
    held = [await anyio.connect_tcp("127.0.0.1", server[1]) for _ in range(2)]  # max_connections = 2
    try:
        for stream in held:
            await stream.send(b"GET / HTTP/1.1\r\n")  # requests in progress
        status, headers, _ = await exchange(server[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        for stream in held:
            await stream.aclose()
    assert (status, headers["metadata-flavor"]) == (503, "Google")


async def test_an_answer_keeps_a_header_it_sets_and_gets_the_others(server: tuple[HttpServer, int]) -> None:
    status, headers, _ = await exchange(server[1], b"GET /own HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (status, headers["metadata-flavor"], headers["server"]) == (200, "Mine", "Metadata Server for VM")


async def test_a_handler_without_response_headers_adds_none() -> None:
    async def plain(request: Request) -> Response:
        raise AssertionError("not reached")

    assert HttpServer(plain, name="plain").headers == ()


# ---- the daemon's metadata listener -------------------------------------------------------------
def _daemon(tmp_path: Path, files: FileSet, upstreams: Upstreams, **listener: Any) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config()},
                "tokens": {"gcp": metadata_token_config(upstreams)},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "metadata": {"address": "127.0.0.1:0", "token": "gcp", "email": EMAIL, **listener},
                },
            }
        )
    )


@pytest.fixture
def upstreams(upstreams: Upstreams, files: FileSet, ca: CertificateAuthority) -> Upstreams:
    """The shared emulator (conftest), and a valid identity in `files` for every daemon here."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    return upstreams


async def test_every_error_class_on_the_metadata_listener_carries_the_flavor(
    tmp_path: Path, files: FileSet, upstreams: Upstreams
) -> None:
    d = _daemon(tmp_path, files, upstreams, request_timeout=0.3)
    requests = {
        **ERRORS,
        "timeout": (b"GET / HTTP/1.1\r\nHost: x\r\n", 408),
        "unknown path": (b"GET /nope HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n", 404),
        "method": (
            b"DELETE / HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            405,
        ),
        "no flavor": (b"GET /computeMetadata/v1/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 403),
    }
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        for kind, (data, status) in requests.items():
            seen, headers, _ = await exchange(d.metadata_port, data)
            assert (seen, headers.get("metadata-flavor")) == (status, "Google"), kind


@pytest.mark.parametrize(
    ("caps", "refusal"),
    [
        ({"max_connections": 1}, b"too_many_connections"),
        ({"max_connections_per_caller": 1}, b"too_many_connections_for_caller"),
    ],
)
async def test_the_connection_limit_answers_of_the_metadata_listener_carry_the_flavor(
    tmp_path: Path, files: FileSet, upstreams: Upstreams, caps: dict[str, int], refusal: bytes
) -> None:
    d = _daemon(tmp_path, files, upstreams, **caps)
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        async with await anyio.connect_tcp("127.0.0.1", d.metadata_port) as held:
            await held.send(b"GET / HTTP/1.1\r\n")  # a request in progress is never shed
            with anyio.fail_after(5):
                while not any(loop.counter.total for loop in d.listeners.accept_loops if loop.name == "metadata"):
                    await anyio.sleep(0.01)
            status, headers, body = await exchange(d.metadata_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, headers["metadata-flavor"]) == (503, "Google") and refusal in body
