"""A bundle holding only the issuing intermediate: validation and every TLS context agree.

wlidd's own validation (cryptography's verifier) treats every bundle certificate as a trust anchor;
OpenSSL needs VERIFY_X509_PARTIAL_CHAIN for that (wlidd.tlsctx.trust_every_anchor). These tests pin
the agreement: a table judging the same chain and bundle by validate_svid, the mTLS listener's server
context and the identity's client context; the real listener over sockets with Python and with
`openssl s_client`; and the x509-sts upstream context against the emulated STS over mTLS.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import shutil
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from tests.conftest import TD, FileSet, in_background, token_emulator
from tests.test_tokens import client, daemon_config, wait_for_token, x509_token_config
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid, cert_pem
from wlidd.emulator.upstreams import Upstreams
from wlidd.errors import SvidError
from wlidd.logs import configure_logging, reset_logging
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.svid.model import BundleSet, Identity, TrustBundle
from wlidd.svid.parse import parse_bundle
from wlidd.tlsctx import HotServerContext, TlsContexts, build_client_context

ALLOW = ["spiffe://example.org/ns/prod/**", "spiffe://other.org/ns/prod/**"]
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def intermediate_pem(ca: CertificateAuthority) -> bytes:
    assert ca.intermediate is not None
    return cert_pem(ca.intermediate)


def identity(svid: IssuedSvid, bundle: bytes) -> Identity:
    return build_identity(
        CredentialFiles("test", svid.chain_pem, svid.key_pem, own_bundle=bundle), dt.datetime.now(dt.UTC)
    )


def with_bundle(own: Identity, bundle: bytes) -> Identity:
    """`own` (validated against its own CA) made to judge peers by `bundle` alone."""
    return dataclasses.replace(own, bundles=BundleSet({TD: TrustBundle(TD, tuple(parse_bundle(bundle, TD)))}))


def write_pair(directory: Path, name: str, svid: IssuedSvid) -> Path:
    """One PEM file holding `svid`'s chain and key (private to the test's tmp dir)."""
    path = directory / f"{name}.pem"
    path.write_bytes(svid.chain_pem + svid.key_pem)
    path.chmod(0o600)
    return path


# ---- the same chain and bundle judged three ways --------------------------------------------------


@dataclasses.dataclass
class Verdicts:
    validation: str | None  # None = valid, else the SvidError reason
    listener: str | None  # None = the mTLS listener's context accepted the peer as a client
    client: str | None  # None = the identity's client context accepted the peer as a server

    def accepted(self) -> tuple[bool, bool, bool]:
        return self.validation is None, self.listener is None, self.client is None


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """Run one TLS handshake between two contexts in memory: (client error, server error), None = done.

    Each side's verdict is its own: in TLS 1.3 the client finishes before the server has judged its
    certificate, so a refusal by the server shows only in the server's result."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = {"client": client_ctx.wrap_bio(c_in, c_out), "server": server_ctx.wrap_bio(s_in, s_out, server_side=True)}
    result: dict[str, str | None] = {}
    for _ in range(20):
        for name, side in sides.items():
            if name in result:
                continue
            try:
                side.do_handshake()
                result[name] = None
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                result[name] = f"verify: {exc.verify_message}"
            except ssl.SSLError as exc:
                result[name] = f"{exc.reason}"
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(result) == 2:
            break
    return result.get("client", "no result"), result.get("server", "no result")


def judge(peer: IssuedSvid, bundle: bytes, own: Identity, tmp_path: Path) -> Verdicts:
    """validate_svid, the listener's (hot) server context and the client context on `peer` with `bundle`."""
    try:
        identity(peer, bundle)
        validation: str | None = None
    except SvidError as exc:
        validation = exc.reason
    contexts = TlsContexts.build(with_bundle(own, bundle))
    hot = HotServerContext(lambda: contexts)
    pair = write_pair(tmp_path, "peer", peer)
    peer_as_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    peer_as_client.check_hostname, peer_as_client.verify_mode = False, ssl.CERT_NONE
    peer_as_client.load_cert_chain(pair)
    _, listener = handshake(peer_as_client, hot.context)
    peer_as_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    peer_as_server.load_cert_chain(pair)
    client_side, _ = handshake(contexts.client, peer_as_server)
    return Verdicts(validation, listener, client_side)


@pytest.fixture(scope="module")
def expired_ca() -> CertificateAuthority:
    """A CA whose root and intermediate expired a month ago (leaves it issues now are still current)."""
    return CertificateAuthority(
        TD, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=395), lifetime=dt.timedelta(days=365)
    )


Case = Callable[[CertificateAuthority, CertificateAuthority, CertificateAuthority], tuple[IssuedSvid, bytes]]
CASES: dict[str, tuple[Case, bool]] = {
    "root anchor, chain with intermediate": (lambda ca, other, old: (ca.issue_svid(), ca.bundle_pem), True),
    "intermediate-only anchor, chain with that intermediate": (
        lambda ca, other, old: (ca.issue_svid(), intermediate_pem(ca)),
        True,
    ),
    "intermediate-only anchor, leaf alone": (
        lambda ca, other, old: (ca.issue_svid(include_intermediate=False), intermediate_pem(ca)),
        True,
    ),
    "root and intermediate in the bundle, leaf alone": (
        lambda ca, other, old: (ca.issue_svid(include_intermediate=False), ca.bundle_pem + intermediate_pem(ca)),
        True,
    ),
    "leaf issuer not in the bundle (root anchor, leaf alone)": (
        lambda ca, other, old: (ca.issue_svid(include_intermediate=False), ca.bundle_pem),
        False,
    ),
    "another CA's intermediate as anchor": (lambda ca, other, old: (ca.issue_svid(), intermediate_pem(other)), False),
    "expired intermediate as anchor": (
        lambda ca, other, old: (old.issue_svid(include_intermediate=False), intermediate_pem(old)),
        False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_listener_and_client_context_agree_on_the_trust_anchor(
    case: str,
    tmp_path: Path,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    expired_ca: CertificateAuthority,
) -> None:
    """One chain and bundle, three judges: validate_svid, the mTLS listener, the identity's client context."""
    build, expected = CASES[case]
    peer, bundle = build(ca, other_ca, expired_ca)
    own = identity(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    verdicts = judge(peer, bundle, own, tmp_path)
    assert verdicts.accepted() == (expected, expected, expected), verdicts


def test_a_refusal_by_openssl_names_the_missing_issuer_not_a_partial_chain(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """With only the root trusted, a leaf sent without its intermediate is refused for the missing issuer."""
    own = identity(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    verdicts = judge(ca.issue_svid(include_intermediate=False), ca.bundle_pem, own, tmp_path)
    assert verdicts.validation == "chain_incomplete"
    assert verdicts.listener is not None and "unable to get local issuer certificate" in verdicts.listener


# ---- the mTLS listener over real sockets ----------------------------------------------------------


def mtls_daemon(tmp_path: Path, files: FileSet) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config()},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "mtls": {"address": "127.0.0.1:0", "identity": "default", "allow": ALLOW},
                },
            }
        )
    )


def https_get(port: int, context: ssl.SSLContext, path: str) -> bytes:
    """One HTTP/1.1 GET over TLS with a plain socket: the raw answer (blocking; run it in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: wlidd\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer


def trusting_client(svid: IssuedSvid, trust: bytes, tmp_path: Path) -> ssl.SSLContext:
    """A plain Python client presenting `svid` that accepts any server chaining to `trust` (partial chains
    allowed), so that any refusal comes from the server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=trust.decode())
    context.load_cert_chain(write_pair(tmp_path, "client", svid))
    return context


async def s_client(port: int, tmp_path: Path, svid: IssuedSvid, trust: bytes, path: str) -> tuple[int, str, str]:
    """`openssl s_client` presenting `svid`, verifying the server against `trust` (partial chains on,
    every verify error fatal), sending one GET: (exit status, stdout, stderr)."""
    cert, key, ca_file = tmp_path / "s_client_chain.pem", tmp_path / "s_client_key.pem", tmp_path / "s_client_ca.pem"
    cert.write_bytes(svid.chain_pem)
    key.write_bytes(svid.key_pem)
    key.chmod(0o600)
    ca_file.write_bytes(trust)
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-quiet", "-verify_return_error"]
    command += ["-partial_chain", "-CAfile", str(ca_file), "-cert", str(cert), "-key", str(key)]
    request = f"GET {path} HTTP/1.1\r\nHost: wlidd\r\nConnection: close\r\n\r\n".encode()
    with anyio.fail_after(30):
        done = await anyio.run_process(command, input=request, check=False)
    return done.returncode, done.stdout.decode("latin-1"), done.stderr.decode("latin-1")


async def test_mtls_listener_admits_a_same_domain_client_when_the_bundle_is_only_the_intermediate(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Daemon and client both hold only the intermediate: the listener admits the client, and the
    identity's client context (wlidd.tlsctx.build_client_context) accepts the listener."""
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), intermediate_pem(ca))
    d = mtls_daemon(tmp_path, files)
    async with in_background(d.run, d.stop):
        assert d.mtls_port is not None
        context = build_client_context(identity(ca.issue_svid("/ns/prod/sa/web"), intermediate_pem(ca)))
        answer = await anyio.to_thread.run_sync(https_get, d.mtls_port, context, "/v1/status")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"valid": true' in answer or b'"valid":true' in answer


@needs_openssl
async def test_mtls_listener_admits_openssl_s_client_when_the_bundle_is_only_the_intermediate(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """A real OpenSSL client, its CAfile the intermediate alone, is admitted by the listener."""
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), intermediate_pem(ca))
    d = mtls_daemon(tmp_path, files)
    async with in_background(d.run, d.stop):
        assert d.mtls_port is not None
        status, out, err = await s_client(
            d.mtls_port, tmp_path, ca.issue_svid("/ns/prod/sa/web"), intermediate_pem(ca), "/v1/status"
        )
    assert out.startswith("HTTP/1.1 200"), (status, out[:300], err[-500:])


@contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The daemon's log lines, as JSON, into a buffer."""
    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        yield out
    finally:
        reset_logging()


async def handshake_refusals(out: io.StringIO) -> list[dict[str, Any]]:
    """The listener's "tls handshake failed" lines, once there is at least one."""
    with anyio.fail_after(15):
        while True:
            lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
            refusals = [line for line in lines if line["event"] == "tls handshake failed"]
            if refusals:
                return refusals
            await anyio.sleep(0.01)


@pytest.mark.parametrize("stranger", ["other_ca", "foreign_ca"])
async def test_mtls_listener_with_an_intermediate_bundle_still_refuses_a_client_of_another_ca(
    stranger: str, request: pytest.FixtureRequest, tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """A Python client of another CA (same trust domain, or another one) is refused at the handshake."""
    other: CertificateAuthority = request.getfixturevalue(stranger)
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), intermediate_pem(ca))
    with json_logs() as out:
        d = mtls_daemon(tmp_path, files)
        async with in_background(d.run, d.stop):
            assert d.mtls_port is not None
            context = trusting_client(other.issue_svid("/ns/prod/sa/web"), intermediate_pem(ca), tmp_path)
            try:
                answer = await anyio.to_thread.run_sync(https_get, d.mtls_port, context, "/v1/status")
            except (ssl.SSLError, OSError) as exc:  # the alert, or a closed connection
                answer = str(exc).encode()
            refusals = await handshake_refusals(out)
    assert not answer.startswith(b"HTTP/1.1"), answer[:300]
    assert [line["reason"] for line in refusals] == ["CERTIFICATE_VERIFY_FAILED"], refusals


@needs_openssl
@pytest.mark.parametrize("stranger", ["other_ca", "foreign_ca"])
async def test_mtls_listener_with_an_intermediate_bundle_still_refuses_openssl_s_client_of_another_ca(
    stranger: str, request: pytest.FixtureRequest, tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """`openssl s_client` of another CA is refused at the handshake and gets no answer."""
    other: CertificateAuthority = request.getfixturevalue(stranger)
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), intermediate_pem(ca))
    with json_logs() as out:
        d = mtls_daemon(tmp_path, files)
        async with in_background(d.run, d.stop):
            assert d.mtls_port is not None
            status, answer, err = await s_client(
                d.mtls_port, tmp_path, other.issue_svid("/ns/prod/sa/web"), intermediate_pem(ca), "/v1/status"
            )
            refusals = await handshake_refusals(out)
    assert "HTTP/1.1" not in answer, (status, answer[:300], err[-500:])
    assert [line["reason"] for line in refusals] == ["CERTIFICATE_VERIFY_FAILED"], refusals


# ---- the x509-sts upstream context ---------------------------------------------------------------


def sts_emulator_behind_an_intermediate(tmp_path: Path, ca: CertificateAuthority) -> Upstreams:
    """The token emulator (not yet running) whose HTTPS and mTLS server certificates are issued by the
    intermediate of its web CA, so each server presents [leaf, intermediate]."""
    emulator = token_emulator(tmp_path, ca)
    emulator.web_ca = CertificateAuthority("emulator.invalid")  # read by run() when it builds its contexts
    return emulator


def ca_file_of(tmp_path: Path, authority: CertificateAuthority) -> Path:
    """A `ca_file` holding only `authority`'s intermediate."""
    path = tmp_path / f"ca-file-{authority.root.serial_number:x}.pem"
    path.write_bytes(intermediate_pem(authority))
    return path


async def test_x509_sts_accepts_an_sts_server_when_ca_file_holds_only_the_intermediate(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """The x509-sts flow's mTLS client verifies the STS against `ca_file`; the intermediate alone is an
    anchor (the identity's own bundle is the SPIFFE intermediate alone, too)."""
    emulator = sts_emulator_behind_an_intermediate(tmp_path, ca)
    ca_file = ca_file_of(tmp_path, emulator.web_ca)
    svid = ca.issue_svid("/ns/prod/sa/x509")
    files.put(svid, intermediate_pem(ca))
    async with in_background(emulator.run, emulator.stop):
        d = Daemon(daemon_config(tmp_path, files, {"gcp": x509_token_config(emulator, ca_file=str(ca_file))}))
        async with in_background(d.run, d.stop), client(d) as c:
            document = await wait_for_token(c, "gcp")
    assert document["access_token"].startswith("ya29.iam-")
    assert emulator.mtls_leaves == [svid.leaf.serial_number]


async def test_x509_sts_still_refuses_an_sts_server_outside_ca_file(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """A `ca_file` holding another CA's intermediate: the STS server is refused, no exchange happens."""
    emulator = sts_emulator_behind_an_intermediate(tmp_path, ca)
    ca_file = ca_file_of(tmp_path, CertificateAuthority("emulator.invalid"))
    files.put(ca.issue_svid("/ns/prod/sa/x509"), intermediate_pem(ca))
    async with in_background(emulator.run, emulator.stop):
        d = Daemon(daemon_config(tmp_path, files, {"gcp": x509_token_config(emulator, ca_file=str(ca_file))}))
        async with in_background(d.run, d.stop):
            source = d.tokens["gcp"]
            with anyio.fail_after(15):
                while source.last_error is None:
                    await anyio.sleep(0.02)
            message = source.last_error.message
    assert "certificate verify failed" in message, message
    assert emulator.calls["sts_mtls"] == 0 and emulator.mtls_leaves == []
