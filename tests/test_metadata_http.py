"""The HTTP layer under the metadata API (wlidd.api.server): status lines name every status the server
sends (a redirect said `301 Unknown`), an HTTP major version other than 1 is a 505 (RFC 9110 §15.6.6), and
absolute-form request targets are served as their path (RFC 9112 §3.2.2: a server MUST accept them)."""

from __future__ import annotations

import http
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.clients.harness import PROJECT, metadata_daemon
from wlidd.api.messages import Response, serialize_response
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority

PROJECT_ID = "/computeMetadata/v1/project/project-id"


@pytest.fixture
async def port(tmp_path: Path, ca: CertificateAuthority) -> AsyncIterator[int]:
    daemon: Daemon
    async with metadata_daemon(tmp_path, ca) as (daemon, _):
        assert daemon.metadata_port is not None
        yield daemon.metadata_port


async def exchange(port: int, data: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send `data` on a new connection and read until the server closes it: (status line, headers, body)."""
    received = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.fail_after(15):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def get(target: str, version: str = "1.1", host: str | None = "169.254.169.254") -> bytes:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    return f"GET {target} HTTP/{version}\r\n{host_line}Metadata-Flavor: Google\r\nConnection: close\r\n\r\n".encode()


async def test_a_redirect_says_301_moved_permanently(port: int) -> None:
    status, headers, _ = await exchange(port, get("/computeMetadata/v1/instance"))
    assert status == "HTTP/1.1 301 Moved Permanently"
    assert headers["location"] == "http://169.254.169.254/computeMetadata/v1/instance/"


STATUSES = (200, 301, 400, 401, 403, 404, 405, 408, 409, 412, 413, 415, 425, 429, 431, 500, 501, 502, 503, 504, 505)


def test_every_status_the_server_sends_has_its_reason_phrase() -> None:
    lines = {status: serialize_response(Response(status), close=True).split(b"\r\n")[0].decode() for status in STATUSES}
    phrases = {s: "Content Too Large" if s == 413 else http.HTTPStatus(s).phrase for s in STATUSES}  # RFC 9110 §15
    assert lines == {status: f"HTTP/1.1 {status} {phrase}" for status, phrase in phrases.items()}
    assert serialize_response(Response(499), close=True).startswith(b"HTTP/1.1 499 Client Error\r\n")


async def test_only_http_major_version_1_is_served_the_others_get_505(port: int) -> None:
    for version in ("9.9", "2.0", "0.9", "3.1"):
        status, headers, body = await exchange(port, get(PROJECT_ID, version))
        assert status == "HTTP/1.1 505 HTTP Version Not Supported", version
        assert headers["metadata-flavor"] == "Google" and f"HTTP/{version} is not supported".encode() in body
    for version in ("1.0", "1.1"):
        status, _, body = await exchange(port, get(PROJECT_ID, version))
        assert (status, body) == ("HTTP/1.1 200 OK", PROJECT.encode()), version


async def test_an_absolute_form_target_is_served_as_its_path_with_its_authority_as_host(port: int) -> None:
    value = await exchange(port, get(f"http://metadata.google.internal{PROJECT_ID}?alt=json", host="ignored"))
    directory = await exchange(port, get("HTTP://metadata.google.internal/computeMetadata/v1/instance?x=1"))
    root = await exchange(port, get("http://metadata.google.internal"))
    no_host = await exchange(port, get(f"http://metadata.google.internal{PROJECT_ID}", host=None))
    assert (value[0], value[2]) == ("HTTP/1.1 200 OK", f'"{PROJECT}"\n'.encode())
    assert directory[0] == "HTTP/1.1 301 Moved Permanently"  # RFC 9112 §3.2.2: the target's host, not Host's
    assert directory[1]["location"] == "http://metadata.google.internal/computeMetadata/v1/instance/?x=1"
    assert (root[0], root[2]) == ("HTTP/1.1 200 OK", b"computeMetadata/\n")
    assert no_host[0] == "HTTP/1.1 400 Bad Request"  # HTTP/1.1 still requires Host (h11), as for any target
