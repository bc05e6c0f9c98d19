"""The Unix socket API: its routes' answers asked directly (a Request in, a Response out, no socket), then
over a real socket: errors, limits and peer credentials."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import pytest_asyncio

from tests.conftest import FileSet, in_background
from wlidd.api.listeners import ListenerError, bind_unix_socket
from wlidd.api.messages import Request, Response
from wlidd.api.peers import Peer
from wlidd.config import Config, IdentityConfig, parse_identity_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority


def make_config(tmp_path: Path, identities: dict[str, IdentityConfig], **unix: object) -> Config:
    listener = {"path": str(tmp_path / "wlidd.sock"), "mode": "0660", "request_timeout": 0.5, "idle_timeout": 2}
    listener.update(unix)  # type: ignore[arg-type]
    return Config.model_validate({"identities": identities, "listeners": {"unix": listener}})


@pytest_asyncio.fixture
async def daemon(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    missing = files.config(cert=tmp_path / "nope.pem", key=tmp_path / "nope.key", mismatch_retries=1, required=False)
    d = Daemon(make_config(tmp_path, {"default": files.config(), "spare": missing}))
    async with in_background(d.run, d.stop):
        yield d


def client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path)), base_url="http://wlidd")


# ---- the routes, without a socket ---------------------------------------------------------------------------
# The daemon is built (its wiring: the Api the Unix listener serves) but not run; its identities are loaded by
# a reload, and each request goes straight to the handler as the HTTP server would hand it over.


@pytest_asyncio.fixture
async def offline(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Daemon]:
    """The `daemon` fixture's daemon, not running: "default" loaded, "spare" never."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    missing = files.config(cert=tmp_path / "nope.pem", key=tmp_path / "nope.key", mismatch_retries=1, required=False)
    d = Daemon(make_config(tmp_path, {"default": files.config(), "spare": missing}))
    assert await d.watchers["default"].reload("test")
    yield d
    for watcher in d.watchers.values():
        watcher.close()


def request(method: str, path: str) -> Request:
    """A request from this process over the Unix socket, as the HTTP server hands it to the handler."""
    return Request(method, path, {}, (), b"", Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()), "unix")


def document(response: Response) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(response.body)
    return loaded


async def test_unknown_path_is_404_json(offline: Daemon) -> None:
    response = await offline.api(request("GET", "/v2/whatever"))
    assert (response.status, response.content_type) == (404, "application/json")
    assert document(response)["error"] == "not_found"


async def test_other_methods_are_405_with_allow(offline: Daemon) -> None:
    response = await offline.api(request("POST", "/v1/status"))
    assert response.status == 405
    assert ("allow", "GET, HEAD") in response.headers
    assert document(response)["error"] == "method_not_allowed"


async def test_ready_per_identity(offline: Daemon) -> None:
    assert (await offline.api(request("GET", "/v1/ready/default"))).status == 200
    spare = await offline.api(request("GET", "/v1/ready/spare"))
    assert spare.status == 503 and document(spare) == {
        "ready": False,
        "name": "spare",
        "reason": "no valid SVID loaded yet",
    }
    unknown = await offline.api(request("GET", "/v1/ready/nope"))
    assert unknown.status == 404 and document(unknown)["error"] == "unknown_identity"


async def test_head_answers_as_get_without_the_body(offline: Daemon) -> None:
    get = await offline.api(request("GET", "/v1/identity/default"))
    head = await offline.api(request("HEAD", "/v1/identity/default"))
    assert (head.status, head.content_type, head.body) == (get.status, get.content_type, b"")
    assert get.status == 200 and get.body


async def test_a_route_with_a_name_matches_one_whole_path_segment(offline: Daemon) -> None:
    """/v1/identity/{name}: not an empty name, not a name with a slash, not a path that only starts there."""
    for path in ("/v1/identity/", "/v1/identity/default/extra", "/v1/identityx/default", "/v1/status/"):
        response = await offline.api(request("GET", path))
        assert (response.status, document(response)["error"]) == (404, "not_found"), path


async def test_status_reports_every_identity_with_freshness(daemon: Daemon, ca: CertificateAuthority) -> None:
    async with client(daemon) as c:
        response = await c.get("/v1/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["daemon"]["state"] == "running"
    default = document["identities"]["default"]
    assert default["valid"] is True
    assert default["spiffe_id"] == "spiffe://example.org/ns/default/sa/app"
    assert default["seconds_left"] > 3000
    assert default["reloads"] == 1 and default["rejections"] == 0 and default["last_error"] is None
    assert default["last_loaded"].endswith("Z")
    spare = document["identities"]["spare"]
    assert spare["valid"] is False and spare["last_error"]["reason"] == "file_missing"


async def test_identity_returns_public_data_and_never_the_key(daemon: Daemon) -> None:
    async with client(daemon) as c:
        response = await c.get("/v1/identity/default")
    assert response.status_code == 200
    document = response.json()
    assert document["chain_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert "BEGIN CERTIFICATE" in document["bundle_pem"]
    assert "PRIVATE KEY" not in response.text
    assert document["serial"] == daemon.watchers["default"].current.identity.svid.serial  # type: ignore[union-attr]


async def test_health_is_ok_when_required_identities_are_valid(daemon: Daemon) -> None:
    async with client(daemon) as c:
        assert (await c.get("/v1/health")).json() == {"status": "ok"}


async def test_health_is_503_with_the_reason_when_a_required_identity_is_missing(tmp_path: Path) -> None:
    cfg = parse_identity_config(
        {
            "source": "files",
            "cert": tmp_path / "c",
            "key": tmp_path / "k",
            "bundle": tmp_path / "b",
            "mismatch_retries": 1,
        }
    )
    d = Daemon(make_config(tmp_path, {"default": cfg}))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        async with client(d) as c:
            response = await c.get("/v1/health")
            ready = await c.get("/v1/ready/default")
            identity = await c.get("/v1/identity/default")
        d.stop()
    assert response.status_code == 503
    assert "identity/default" in response.json()["problems"]
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert identity.status_code == 503 and identity.json()["error"] == "identity_unavailable"


async def test_metrics_exposes_reload_counters(daemon: Daemon) -> None:
    async with client(daemon) as c:
        await c.get("/v1/status")
        text = (await c.get("/metrics")).text
    assert 'wlidd_identity_reloads_total{identity="default",result="updated"} 1.0' in text
    assert 'wlidd_identity_valid{identity="default"} 1.0' in text
    # the spare identity's directory also holds the socket, so file events may add re-reads
    assert re.search(r'wlidd_identity_rejections_total\{identity="spare",reason="file_missing"\} [1-9]', text)
    assert "wlidd_http_requests_total" in text


async def test_keep_alive_serves_many_requests_on_one_connection(daemon: Daemon) -> None:
    async with client(daemon) as c:
        for _ in range(20):
            assert (await c.get("/v1/health")).status_code == 200


async def raw_exchange(path: Path, data: bytes, *, wait: float = 3.0) -> bytes:
    async with await anyio.connect_unix(path) as stream:
        await stream.send(data)
        chunks = b""
        with anyio.move_on_after(wait):
            try:
                while True:
                    chunks += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        return chunks


async def test_malformed_request_gets_400_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    answer = await raw_exchange(daemon.socket_path, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"error":"bad_request"' in answer
    async with client(daemon) as c:
        assert (await c.get("/v1/health")).status_code == 200


async def test_oversized_headers_get_431(daemon: Daemon) -> None:
    request = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    answer = await raw_exchange(daemon.socket_path, request)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_slow_request_gets_408(daemon: Daemon) -> None:
    answer = await raw_exchange(daemon.socket_path, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_connection_limit_answers_503_when_no_connection_is_idle(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(make_config(tmp_path, {"default": files.config()}, max_connections=1))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        async with await anyio.connect_unix(d.socket_path) as holder:
            await holder.send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # mid-request: not idle
            with anyio.fail_after(5):
                while not any(c.phase == "request" for c in d.listeners.unix_server._open):
                    await anyio.sleep(0.01)
            answer = await raw_exchange(d.socket_path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"too_many_connections" in answer
        d.stop()


async def test_an_idle_connection_is_closed_to_make_room_at_the_connection_limit(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Idle keep-alive (or silent) connections never lock a full listener: the oldest idle one of the
    caller holding the most is closed, and the newcomer is served."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(make_config(tmp_path, {"default": files.config()}, max_connections=1))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        async with await anyio.connect_unix(d.socket_path) as holder:
            await holder.send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await holder.receive()).startswith(b"HTTP/1.1 200 ")  # now idle, keep-alive
            answer = await raw_exchange(d.socket_path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)), anyio.fail_after(5):
                await holder.receive()
        assert d.metrics.registry.get_sample_value("wlidd_connections_shed_total", {"listener": "unix"}) == 1
        d.stop()


async def test_socket_has_the_configured_mode(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o660
    assert stat.S_ISSOCK(os.stat(daemon.socket_path).st_mode)


async def test_socket_is_removed_on_stop(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(make_config(tmp_path, {"default": files.config()}))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        assert d.socket_path.exists()
        d.stop()
    assert not d.socket_path.exists()


def test_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    live = bind_unix_socket(path, 0o600)
    try:
        with pytest.raises(ListenerError, match="in use"):
            bind_unix_socket(path, 0o600)
    finally:
        live.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ListenerError, match="not a socket"):
        bind_unix_socket(regular, 0o600)


async def test_peer_credentials_of_the_caller_reach_the_handler(tmp_path: Path) -> None:
    from wlidd.api.server import HttpServer

    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response.json(200, {"uid": request.peer.uid})

    server = HttpServer(handler, name="unix")
    sock = bind_unix_socket(tmp_path / "p.sock", 0o600)
    listener = await anyio.abc.SocketListener.from_socket(sock)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.serve_stream)
        answer = await raw_exchange(tmp_path / "p.sock", b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        tg.cancel_scope.cancel()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"uid": os.getuid()}
    assert seen[0].peer.pid == os.getpid() and seen[0].peer.gid == os.getgid()


async def test_expiry_is_judged_by_the_wall_clock_on_every_request(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    import datetime as dt

    svid = ca.issue_svid(ttl=dt.timedelta(minutes=5))
    files.put(svid, ca.bundle_pem)
    wall = [dt.datetime.now(dt.UTC)]
    d = Daemon(make_config(tmp_path, {"default": files.config()}), clock=lambda: wall[0])
    async with in_background(d.run, d.stop), client(d) as c:
        assert (await c.get("/v1/health")).status_code == 200
        wall[0] = svid.leaf.not_valid_after_utc + dt.timedelta(seconds=1)  # a suspended VM wakes up later
        health = await c.get("/v1/health")
        ready = await c.get("/v1/ready/default")
        document = (await c.get("/v1/status")).json()
        identity = (await c.get("/v1/identity/default")).json()
    assert health.status_code == 503 and "outside its validity window" in health.json()["problems"]["identity/default"]
    assert ready.status_code == 503
    assert (
        document["identities"]["default"]["valid"] is False and document["identities"]["default"]["seconds_left"] == 0
    )
    assert document["daemon"]["state"] == "degraded"
    assert identity["valid"] is False


def test_socket_owner_and_group_are_applied(tmp_path: Path) -> None:
    import grp
    import pwd

    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    nobody, nogroup = pwd.getpwuid(65534).pw_name, grp.getgrgid(65534).gr_name
    sock = bind_unix_socket(tmp_path / "o.sock", 0o660, group=nogroup, owner=nobody)
    try:
        st = os.stat(tmp_path / "o.sock")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o660)
    finally:
        sock.close()
    with pytest.raises(ListenerError, match="user 'no-such-user' does not exist"):
        bind_unix_socket(tmp_path / "p.sock", 0o660, owner="no-such-user")
