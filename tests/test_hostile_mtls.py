"""The mTLS listener against hostile or merely ordinary clients (issue 13): TLS 1.3 session
resumption, floods of failed handshakes and denied requests (a few lines and a count, not a line
each), and the mTLS side of per-name policy rules."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.conftest import FileSet, in_background, request_as_user
from tests.test_mtls import client_context, make_daemon
from tests.test_tokens import metadata_token_config
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid
from wlidd.emulator.upstreams import Upstreams
from wlidd.logs import RepeatLimiter, configure_logging, reset_logging, use_repeat_limiter

WEB = "spiffe://example.org/ns/prod/sa/web"  # allowed by the listener (ALLOW in test_mtls)
NOBODY = 65534
BURST = 3
WINDOW = 60.0


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def captured_logs() -> Iterator[tuple[io.StringIO, RepeatLimiter, Clock]]:
    """JSON log lines into a buffer, through a repeat limiter on a test clock."""
    out, clock = io.StringIO(), Clock()
    configure_logging("info", "json", out)
    limiter = RepeatLimiter(burst=BURST, window=WINDOW, clock=clock)
    use_repeat_limiter(limiter)
    try:
        yield out, limiter, clock
    finally:
        configure_logging("info", "console")
        reset_logging()


def lines_of(out: io.StringIO, event: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(lines written one by one, summary lines) of `event`."""
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    lines = [line for line in lines if line["event"] == event]
    return [x for x in lines if "repeated" not in x], [x for x in lines if "repeated" in x]


async def wait_seen(limiter: RepeatLimiter, event: str, count: int) -> None:
    with anyio.fail_after(30):
        while limiter.seen[event] < count:
            await anyio.sleep(0.01)


def exchange(tls: ssl.SSLSocket, path: str) -> bytes:
    """One HTTP/1.1 request on an open TLS socket; the whole answer (the server closes)."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    return answer


def twice_with_the_first_session(port: int, context: ssl.SSLContext) -> list[tuple[bool, bytes]]:
    """Two connections; the second offers the session (and any ticket) the first one received."""
    results: list[tuple[bool, bytes]] = []
    session: ssl.SSLSession | None = None
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, session=session) as tls,
        ):
            answer = exchange(tls, "/v1/token/gcp")  # tickets (if any) arrive with the answer
            results.append((tls.session_reused, answer.split(b"\r\n", 1)[0]))
            session = tls.session
    return results


async def test_a_client_offering_its_last_session_gets_a_full_handshake_and_200(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """A resumed TLS 1.3 session carries no verified chain: the server issues no tickets, so a client's
    session cache (Go, Envoy, curl) never resumes and every connection is judged on its chain."""
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    d = make_daemon(tmp_path, files, upstreams)
    async with in_background(d.run, d.stop):
        assert d.mtls_port is not None
        context = client_context(ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
        results = await anyio.to_thread.run_sync(twice_with_the_first_session, d.mtls_port, context)
    assert results == [(False, b"HTTP/1.1 200 OK"), (False, b"HTTP/1.1 200 OK")]


def write_client_files(directory: Path, svid: IssuedSvid, trust: bytes) -> list[str]:
    directory.mkdir()
    (directory / "cert.pem").write_bytes(svid.chain_pem)
    (directory / "key.pem").write_bytes(svid.key_pem)
    (directory / "ca.pem").write_bytes(trust)
    os.chmod(directory / "key.pem", 0o600)
    return [
        "--cert",
        str(directory / "cert.pem"),
        "--key",
        str(directory / "key.pem"),
        "--cacert",
        str(directory / "ca.pem"),
    ]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_fetching_two_urls_in_one_command_gets_200_for_both(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid("/ns/wlidd/sa/node", dns_names=["localhost"]), ca.bundle_pem)  # curl checks the name
    d = make_daemon(tmp_path, files, upstreams)
    tls_args = write_client_files(tmp_path / "client", ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
    async with in_background(d.run, d.stop):
        url = f"https://localhost:{d.mtls_port}/v1/status"
        resolve = ["--resolve", f"localhost:{d.mtls_port}:127.0.0.1"]
        # 'Connection: close': the second URL takes a second connection, which offers the first's session
        out = ["-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"]
        command = ["curl", "-sS", *out, "-H", "Connection: close", *resolve, *tls_args, url, url]
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(command, capture_output=True, timeout=30, check=False)
        )
    assert done.stdout.decode().split("\n")[:2] == ["200 1", "200 1"], done.stderr.decode()[:500]


def failed_handshakes(port: int, garbage: int, foreign: ssl.SSLContext, certificates: int) -> None:
    """`garbage` plain-TCP clients sending non-TLS bytes, then `certificates` TLS clients whose
    certificate comes from a CA the listener does not trust; each waits for the server to hang up."""
    payloads = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello")
    for i in range(garbage):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(payloads[i % 2])
            try:
                while raw.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    for _ in range(certificates):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                with foreign.wrap_socket(raw) as tls:
                    tls.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
                    tls.recv(4096)
            except (ssl.SSLError, OSError):
                pass


async def test_a_thousand_failed_handshakes_write_a_few_lines_and_a_count(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    foreign = client_context(foreign_ca.issue_svid("/ns/partner/sa/x"), foreign_ca.bundle_pem)
    foreign.load_verify_locations(cadata=ca.bundle_pem.decode())
    garbage, certificates = 1000, 20
    with captured_logs() as (out, limiter, clock):
        d = make_daemon(tmp_path, files, upstreams)
        async with in_background(d.run, d.stop):
            assert d.mtls_port is not None
            await anyio.to_thread.run_sync(failed_handshakes, d.mtls_port, garbage, foreign, certificates)
            await wait_seen(limiter, "tls handshake failed", garbage + certificates)
            written, summaries = lines_of(out, "tls handshake failed")
            assert summaries == []
            reasons = {line["reason"] for line in written}
            assert len(written) <= BURST * len(reasons) <= BURST * 4, written
            assert all(line["peer"].startswith("127.0.0.1") for line in written)
            assert "CERTIFICATE_VERIFY_FAILED" in reasons  # the foreign CA's clients, named
            clock.now += WINDOW  # the window ends; the next failure writes the counts first
            await anyio.to_thread.run_sync(failed_handshakes, d.mtls_port, 1, foreign, 0)
            await wait_seen(limiter, "tls handshake failed", garbage + certificates + 1)
    written_after, summaries = lines_of(out, "tls handshake failed")
    assert len(written_after) == len(written) + 1
    assert {s["reason"] for s in summaries} <= reasons and all(s["window_seconds"] == WINDOW for s in summaries)
    assert len(written) + sum(s["repeated"] for s in summaries) == garbage + certificates  # every one counted


async def test_floods_of_denied_mtls_requests_write_a_few_lines_and_a_count(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """Refused by the listener's allow (the gate) and refused by a rule (the routes): each distinct
    denial is written (naming the caller) up to the burst, then counted; random paths change nothing."""
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    flood = 200
    with captured_logs() as (out, limiter, clock):
        d = make_daemon(tmp_path, files, upstreams)
        async with in_background(d.run, d.stop):
            base = f"https://127.0.0.1:{d.mtls_port}"
            outsider = client_context(ca.issue_svid("/ns/dev/sa/web"), ca.bundle_pem)
            web = client_context(ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
            async with (
                httpx.AsyncClient(verify=outsider, base_url=base) as refused_by_listener,
                httpx.AsyncClient(verify=web, base_url=base) as refused_by_rule,
            ):
                for i in range(flood):
                    assert (await refused_by_listener.get(f"/v1/token/x{i:040d}")).status_code == 403
                    assert (await refused_by_rule.get("/v1/credentials/default")).status_code == 403
                await wait_seen(limiter, "access denied", 2 * flood)
                written, summaries = lines_of(out, "access denied")
                assert summaries == [] and len(written) == 2 * BURST
                assert {line.get("spiffe_id") for line in written} == {
                    "spiffe://example.org/ns/dev/sa/web",
                    WEB,
                }
                clock.now += WINDOW
                assert (await refused_by_listener.get("/v1/status")).status_code == 403
    _, summaries = lines_of(out, "access denied")
    assert {(s["spiffe_id"], s["repeated"]) for s in summaries} == {
        ("spiffe://example.org/ns/dev/sa/web", flood - BURST),
        (WEB, flood - BURST),
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid in a child needs root")
async def test_a_flood_of_denied_unix_requests_writes_a_few_lines_and_a_count(
    shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"gcp": metadata_token_config(upstreams)},
            "listeners": {"unix": {"path": str(shared_dir / "wlidd.sock"), "mode": "0666"}},
        }
    )
    raw = b"GET /v1/credentials/default HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    flood = 12
    with captured_logs() as (out, limiter, clock):
        d = Daemon(config)
        async with in_background(d.run, d.stop):
            for _ in range(flood):
                status, _ = await anyio.to_thread.run_sync(request_as_user, NOBODY, str(d.socket_path), raw)
                assert status == 403
            written, _ = lines_of(out, "access denied")
            clock.now += WINDOW
            await anyio.to_thread.run_sync(request_as_user, NOBODY, str(d.socket_path), raw)
            await wait_seen(limiter, "access denied", flood + 1)
    _, summaries = lines_of(out, "access denied")
    assert len(written) == BURST and all(line["uid"] == NOBODY and line["user"] == "nobody" for line in written)
    assert [(s["uid"], s["repeated"]) for s in summaries] == [(NOBODY, flood - BURST)]


@pytest.mark.parametrize(
    ("policy", "status"),
    [
        pytest.param({"token": {"gcp": {"users": ["root"]}}}, 403, id="per-name-rule-without-spiffe-ids-refuses"),
        pytest.param({"token": {"gcp": {"users": ["root"], "spiffe_ids": [WEB]}}}, 200, id="per-name-rule-lists-it"),
    ],
)
async def test_the_mtls_side_of_a_per_name_token_rule_is_its_spiffe_ids(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, policy: dict[str, Any], status: int
) -> None:
    """A [policy.token.X] rule names who gets X: a listener-allowed mTLS peer it does not list is
    refused, even when the rule names Unix users (the default [policy.tokens] keeps admitting them)."""
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    d = make_daemon(tmp_path, files, upstreams, policy)
    async with in_background(d.run, d.stop):
        web = client_context(ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
        async with httpx.AsyncClient(verify=web, base_url=f"https://127.0.0.1:{d.mtls_port}") as client:
            answer = await client.get("/v1/token/gcp")
    assert answer.status_code == status, answer.json().get("message")  # never the token itself
    if status == 403:
        assert answer.json()["message"] == f"{WEB} may not have token 'gcp' ([policy.token.gcp] lists no spiffe_ids)"
    else:
        assert answer.json()["access_token"].startswith("ya29.")


DENIED_CALLS = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=lambda _: b"", response_deserializer=lambda b: b)
for _ in range(int(sys.argv[2])):
    try:
        next(iter(call(None, metadata=[("workload.spiffe.io", "true")], timeout=5)))
        print("OK")
    except grpc.RpcError as exc:
        print(exc.code().name)
"""


async def test_a_flood_of_denied_workload_api_calls_writes_a_few_lines_and_a_count(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "workload_api": {"path": str(tmp_path / "workload.sock")},
            },
            "policy": {"identity": {"default": {"users": ["nobody"]}}},  # not root, who calls
        }
    )
    endpoint, flood = f"unix://{tmp_path / 'workload.sock'}", 30

    async def calls(count: int) -> list[str]:
        done = await anyio.run_process([sys.executable, "-c", DENIED_CALLS, endpoint, str(count)], check=True)
        return done.stdout.decode().split()

    with captured_logs() as (out, limiter, clock):
        d = Daemon(config)
        async with in_background(d.run, d.stop):
            assert await calls(flood) == ["PERMISSION_DENIED"] * flood
            await wait_seen(limiter, "access denied", flood)
            written, _ = lines_of(out, "access denied")
            clock.now += WINDOW
            assert await calls(1) == ["PERMISSION_DENIED"]
            await wait_seen(limiter, "access denied", flood + 1)
    _, summaries = lines_of(out, "access denied")
    assert len(written) == BURST and all(line["uid"] == os.getuid() for line in written)
    assert [(s["listener"], s["repeated"]) for s in summaries] == [("workload_api", flood - BURST)]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid in a child needs root")
async def test_a_flood_of_denied_metadata_requests_writes_a_few_lines_and_a_count(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, tmp_path: Path
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"gcp": metadata_token_config(upstreams)},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {"address": "127.0.0.1:0", "token": "gcp", "email": "a@b.iam.gserviceaccount.com"},
            },
        }
    )
    raw = (
        b"GET /computeMetadata/v1/instance/service-accounts/default/token HTTP/1.1\r\n"
        b"Host: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    )
    flood = 12
    with captured_logs() as (out, limiter, clock):
        d = Daemon(config)
        async with in_background(d.run, d.stop):
            address = ("127.0.0.1", d.metadata_port)
            for _ in range(flood):
                status, _ = await anyio.to_thread.run_sync(request_as_user, NOBODY, address, raw)
                assert status == 403
            await wait_seen(limiter, "access denied", flood)
            written, _ = lines_of(out, "access denied")
            clock.now += WINDOW
            await anyio.to_thread.run_sync(request_as_user, NOBODY, address, raw)
            await wait_seen(limiter, "access denied", flood + 1)
    _, summaries = lines_of(out, "access denied")
    assert len(written) == BURST and all(line["uid"] == NOBODY for line in written)
    assert [(s["listener"], s["uid"], s["repeated"]) for s in summaries] == [("metadata", NOBODY, flood - BURST)]
