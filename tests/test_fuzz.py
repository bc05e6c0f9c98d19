"""Hostile input on the HTTP surface of every listener: the Unix socket API, the metadata API and the
mTLS listener, all in one real daemon, over real sockets.

Whatever arrives, each answer is a well-formed HTTP/1.1 response with a status (never a 500, never
a traceback), the listener keeps serving, and slow or flooding clients are cut at the configured
limits. `make test` runs a bounded budget; `make fuzz` multiplies it (FUZZ_SCALE).
"""

from __future__ import annotations

import datetime as dt
import re
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio.from_thread
import h11
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_SCALE, TD, FileSet, poll_until
from wlidd.api.request_head import parse_simple_request
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.produced import find_leak
from wlidd.emulator.upstreams import Upstreams
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.tlsctx import build_client_context

LIMITS = {"request_timeout": 0.5, "idle_timeout": 1.0, "max_connections": 16}
PATHS = [
    "/v1/token/gcp",
    "/v1/token/nope",
    "/v1/status",
    "/v1/health",
    "/v1/ready/default",
    "/v1/identity/default",
    "/v1/credentials/default",
    "/metrics",
    "/get_wif_token",
    "/computeMetadata/v1/instance/service-accounts/default/token",
    "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x&format=full",
    "/computeMetadata/v1/instance/service-accounts/?recursive=true",
    "/computeMetadata/v1/project/project-id",
    "/computeMetadata/v1/",
    "/",
]
HEADER_NAMES = [
    "Host",
    "Metadata-Flavor",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "X-Forwarded-For",
    "Expect",
    "Accept",
    "Authorization",
]
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) [^\r\n]*\r\n")


@dataclass
class Node:
    """The real daemon in its own process (as in production: signals, its own event loop)."""

    socket_path: Path
    metadata_port: int
    mtls_port: int
    client: ssl.SSLContext

    def connect(self, surface: str) -> socket.socket:
        if surface == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(str(self.socket_path))
            return s
        port = self.metadata_port if surface == "metadata" else self.mtls_port
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        return self.client.wrap_socket(raw) if surface == "mtls" else raw


def _ready(sock: Path) -> bool:
    """Whether the daemon on `sock` is past its start (its /v1/status no longer says "starting")."""
    if not sock.exists():  # (httpx leaves a socket unclosed when the path is missing)
        return False
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as client:
            return bool(client.get("http://wlidd/v1/status").json()["daemon"]["state"] != "starting")
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("fuzz")
    files = FileSet(base / "creds")
    files.put(ca.issue_svid(), ca.bundle_pem)
    files.key.chmod(0o600)
    client = ca.issue_svid("/ns/fuzz/sa/client")
    context = build_client_context(
        build_identity(
            CredentialFiles("c", client.chain_pem, client.key_pem, own_bundle=ca.bundle_pem), dt.datetime.now(dt.UTC)
        )
    )
    limits = "\n".join(f"{k} = {v}" for k, v in LIMITS.items())
    with anyio.from_thread.start_blocking_portal() as portal:
        upstreams = Upstreams(base / "emulator", seed=11)
        emulator_done, _ = portal.start_task(upstreams.run)
        node = Node(base / "wlidd.sock", _free_port(), _free_port(), context)
        config = base / "wlidd.toml"
        config.write_text(
            f"""
[daemon]
log_level = "warning"
log_format = "json"
[identities.default]
source = "files"
cert = "{files.cert}"
key = "{files.key}"
bundle = "{files.bundle}"
[tokens.gcp]
flow = "gce-metadata"
start_delay = 0
require_at_start = true
metadata.url = "{upstreams.metadata_url}"
[listeners.unix]
path = "{node.socket_path}"
{limits}
[listeners.metadata]
address = "127.0.0.1:{node.metadata_port}"
token = "gcp"
email = "app@demo-project.iam.gserviceaccount.com"
project_id = "demo-project"
{limits}
[listeners.mtls]
address = "127.0.0.1:{node.mtls_port}"
identity = "default"
allow = ["spiffe://{TD}"]
{limits}
[policy]
tokens = {{ users = ["root"], spiffe_ids = ["spiffe://{TD}/ns/fuzz/**"] }}
"""
        )
        log = open(base / "wlidd.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen([sys.executable, "-m", "wlidd", "run", "--config", str(config)], stderr=log)
        try:
            deadline = time.monotonic() + 30
            while not _ready(node.socket_path):  # the socket answers while starting: wait for READY's state
                assert daemon.poll() is None, (base / "wlidd.log").read_text()
                assert time.monotonic() < deadline, "the daemon never listened"
                time.sleep(0.05)
            yield node
        finally:
            daemon.terminate()
            daemon.wait(10)
            log.close()
            portal.call(upstreams.stop)
            emulator_done.result(30)
        logged = (base / "wlidd.log").read_text()
        tracebacks = [line for line in logged.splitlines() if "Traceback" in line]
        assert daemon.returncode == 0 and not tracebacks, tracebacks[:3]
        assert find_leak(logged) is None, f"a {find_leak(logged)} reached the daemon's log"


def exchange(node: Node, surface: str, data: bytes) -> bytes:
    """Send `data`, then read until the server closes (it must: the request times out at 0.5 s)."""
    with node.connect(surface) as s:
        try:
            s.sendall(data)
            if surface != "mtls":
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the server already answered and closed (e.g. 431 before the rest arrived)
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            except TimeoutError:
                pytest.fail(f"{surface}: the server neither answered nor closed within 5 s")
            if not chunk:
                break
            answer += chunk
        return answer


def assert_proper_answers(answer: bytes, *, first_is_head: bool = False) -> list[int]:
    """Every response in `answer` is a status line, headers, and exactly Content-Length of body."""
    statuses = []
    rest = answer
    while rest:
        match = STATUS_LINE.match(rest)
        assert match, f"not an HTTP/1.1 status line: {rest[:80]!r}"
        head, sep, after = rest.partition(b"\r\n\r\n")
        assert sep, f"response head never ends: {rest[:200]!r}"
        lengths = [
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ]
        assert len(lengths) == 1, head
        if first_is_head and not statuses:
            if int(match.group(1)) >= 400 and b"connection: close" in head:
                return [int(match.group(1))]  # a refused request: whether it was a HEAD is moot, the body ends it
            lengths[0] = 0  # the answer to HEAD: Content-Length of the GET, no body
        assert len(after) >= lengths[0], "body shorter than its Content-Length"
        status = int(match.group(1))
        assert status != 500 and b"Traceback" not in after[: lengths[0]], rest[:300]
        statuses.append(status)
        rest = after[lengths[0] :]
    return statuses


def open_connections(node: Node, surface: str) -> float:
    """The daemon's count of open connections on `surface`'s listener (wlidd_connections_open), read on the
    Unix socket, less the connection that reads it."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.socket_path)), timeout=5) as client:
        text = client.get("http://wlidd/metrics").text
    match = re.search(rf'^wlidd_connections_open{{listener="{surface}"}} (\S+)$', text, re.M)
    assert match is not None, f"no wlidd_connections_open for {surface}"
    return float(match.group(1)) - (1 if surface == "unix" else 0)


def assert_still_serving(node: Node, surface: str) -> None:
    probe = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    if surface == "metadata":
        probe = probe.replace(b"/v1/health", b"/computeMetadata/v1/project/project-id")
    statuses = assert_proper_answers(exchange(node, surface, probe))
    assert statuses and statuses[0] in (200, 404), statuses  # the metadata API may not know the project


def header_value() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from([b"Google", b"0", b"-1", b"5", b"99999999999999999999", b"chunked", b"close", b"100-continue"]),
        st.binary(max_size=64),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"CONNECT", b"TRACE"])
        | st.binary(max_size=12)
    )
    path = draw(
        st.sampled_from([p.encode() for p in PATHS]) | st.binary(max_size=200) | st.text(max_size=80).map(str.encode)
    )
    if draw(st.booleans()):
        path += draw(st.sampled_from([b"/../../etc/shadow", b"%00", b"%2e%2e/", b"?" + b"a=" * 50, b"#frag", b"//"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"", b"http/1.1"]))
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from([h.encode() for h in HEADER_NAMES]) | st.binary(min_size=1, max_size=20), header_value()
            ),
            max_size=8,
        )
    )
    body = draw(st.binary(max_size=300))
    lines = [method + b" " + path + (b" " + version if version else b"")]
    lines += [name + b": " + value for name, value in headers]
    request = b"\r\n".join(lines) + b"\r\n\r\n" + body
    if draw(st.booleans()):
        request += b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"  # pipelined after whatever came first
    return request


FUZZ = settings(
    max_examples=120 * FUZZ_SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("surface", ["unix", "metadata", "mtls"])
@FUZZ
@given(request=http_requests())
def test_any_request_gets_proper_answers_and_the_listener_keeps_serving(
    node: Node, surface: str, request: bytes
) -> None:
    assert_proper_answers(exchange(node, surface, request), first_is_head=request.startswith(b"HEAD "))
    assert_still_serving(node, surface)


@pytest.mark.parametrize("surface", ["unix", "metadata"])
@FUZZ
@given(data=st.binary(max_size=4096))
def test_any_bytes_get_proper_answers_or_a_close(node: Node, surface: str, data: bytes) -> None:
    assert_proper_answers(exchange(node, surface, data), first_is_head=data.startswith(b"HEAD "))
    assert_still_serving(node, surface)


@pytest.mark.parametrize("surface", ["unix", "metadata", "mtls"])
def test_a_huge_request_is_cut_at_the_header_limit_not_buffered(node: Node, surface: str) -> None:
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Fill: "
    answer = exchange(node, surface, head + b"a" * (4 << 20))  # 4 MiB of one header line
    assert assert_proper_answers(answer) in ([431], [400])
    assert_still_serving(node, surface)


def _early_answer(s: socket.socket) -> bytes | None:
    """What the server sent before the client finished its request (b"" when it closed), or None when it
    sent nothing yet (a TLS 1.3 session ticket alone is nothing)."""
    if not select.select([s], [], [], 0)[0]:
        return None
    s.setblocking(False)
    try:
        return s.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except OSError:
        return b""
    finally:
        s.setblocking(True)


@pytest.mark.parametrize("surface", ["unix", "metadata", "mtls"])
def test_slowloris_dripping_bytes_is_cut_at_the_request_timeout(node: Node, surface: str) -> None:
    """A byte every 50 ms does not extend the deadline: the request is cut at request_timeout (0.5 s), long
    before the client has dripped its whole request (12 s at this pace)."""
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200
    sent = 0
    answer = b""
    with node.connect(surface) as s:
        try:
            for byte in request:
                if (early := _early_answer(s)) is not None:  # cut while dripping
                    answer += early
                    break
                s.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.05)  # the drip is the behaviour under test
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        s.settimeout(5)
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    assert assert_proper_answers(answer) in ([408], [])
    assert 0 < sent < len(request), "the dripping client was never cut (or cut before it sent anything)"
    assert_still_serving(node, surface)


@pytest.mark.parametrize("surface", ["unix", "metadata", "mtls"])
def test_a_connection_flood_beyond_the_limit_is_refused_and_then_recovers(node: Node, surface: str) -> None:
    """More silent connections than max_connections (16): the extra ones are refused at once (503 or
    a close), the silent ones are cut at the request timeout, and then the listener serves again."""
    flood: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(40):
            try:
                flood.append(node.connect(surface))
            except (ConnectionResetError, ssl.SSLError, OSError):
                refused += 1  # the TLS handshake of an over-limit connection may be cut
        for s in flood[16:]:
            s.settimeout(2)
            try:
                answer = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError, TimeoutError):
                answer = b""
            if answer.startswith(b"HTTP/1.1 503") or answer == b"":
                refused += 1
        assert refused >= 40 - 16 - 2  # accepts racing with the first ones' timeouts may admit one or two
    finally:
        for s in flood:
            s.close()
    poll_until(lambda: open_connections(node, surface) == 0, 10, f"the flood's connections to {surface} were let go")
    assert_still_serving(node, surface)


def test_client_certificates_of_the_wrong_domain_are_refused_not_answered(
    node: Node, foreign_ca: CertificateAuthority
) -> None:
    svid = foreign_ca.issue_svid("/ns/fuzz/sa/client")
    context = build_client_context(
        build_identity(
            CredentialFiles("x", svid.chain_pem, svid.key_pem, own_bundle=foreign_ca.bundle_pem),
            dt.datetime.now(dt.UTC),
        )
    )
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only want to see the server refuse our certificate
    with (
        socket.create_connection(("127.0.0.1", node.mtls_port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert tls.recv(65536) == b""
        raise ConnectionResetError("closed without an answer")
    assert_still_serving(node, "mtls")


def _h11_parse(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bool] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    close = any(n == b"connection" and b"close" in v.lower() for n, v in event.headers)
    return event.method, event.target, list(event.headers), close


GOOD_FIELDS = [
    (b"Accept", b" */*"),
    (b"Connection", b" close"),
    (b"Connection", b"keep-alive, Close"),
    (b"X-A", b"\tv\t"),
]
ODD_FIELDS = [(b"Content-Length", b" 0"), (b"Bad Name", b" x"), (b"X-B", b" a\x80"), (b"host", b" y"), (b" X-C", b"x")]


@st.composite
def simple_heads(draw: st.DrawFn) -> bytes:
    """Mostly well-formed GET heads with small twists, so both outcomes of the fast path are reached."""
    method = draw(st.sampled_from([b"GET"] * 6 + [b"HEAD", b"POST", b"get"]))
    target = draw(st.sampled_from([p.encode() for p in PATHS] + [b"/x y", b"/\x7f", b"*", b"/%00"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/1.1 "]))
    fields = draw(st.lists(st.sampled_from(GOOD_FIELDS * 6 + ODD_FIELDS), max_size=3))
    if draw(st.integers(0, 5)):  # usually exactly one Host, somewhere
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b" wlidd"))
    return b"\r\n".join([method + b" " + target + b" " + version] + [n + b":" + v for n, v in fields])


@settings(max_examples=400 * FUZZ_SCALE, deadline=None)
@given(head=st.one_of(simple_heads(), simple_heads(), http_requests().map(lambda r: r.split(b"\r\n\r\n")[0])))
def test_the_fast_path_accepts_nothing_h11_refuses_and_reads_what_h11_reads(head: bytes) -> None:
    fast = parse_simple_request(head)
    event("fast path" if fast is not None else "left to h11")
    if fast is not None:
        assert _h11_parse(head) == fast


def test_the_fast_path_takes_the_common_request_and_leaves_the_rest_to_h11() -> None:
    simple = b"GET /v1/token/gcp HTTP/1.1\r\nHost: wlidd\r\nAccept: */*"
    assert parse_simple_request(simple) == (b"GET", b"/v1/token/gcp", [(b"host", b"wlidd"), (b"accept", b"*/*")], False)
    assert parse_simple_request(simple + b"\r\nConnection: close")[3] is True  # type: ignore[index]
    for other in (
        b"POST /v1/token/gcp HTTP/1.1\r\nHost: x\r\nContent-Length: 0",  # a body
        b"GET /v1/token/gcp HTTP/1.0\r\nHost: x",  # another version
        b"GET /v1/token/gcp HTTP/1.1",  # no Host
        b"GET /v1/token/gcp HTTP/1.1\r\nHost: x\r\nHost: y",  # two
        b"GET /v1/token/gcp HTTP/1.1\r\nHost: x\r\n folded",  # obs-fold
        b"GET /v1/token/gcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked",
        b"GET /v1/t\xffoken HTTP/1.1\r\nHost: x",
    ):
        assert parse_simple_request(other) is None, other
