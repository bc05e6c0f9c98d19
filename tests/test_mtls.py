"""The mTLS listener: SPIFFE ID matchers, trust-domain-bound client chains, hot server rotation."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import TD, FileSet, in_background
from tests.test_tokens import metadata_token_config
from wlidd.api.mtls import MtlsGate
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid
from wlidd.emulator.upstreams import Upstreams
from wlidd.errors import InvalidValue
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.svid.spiffeid import parse_matcher, parse_spiffe_id
from wlidd.tlsctx import TlsContexts, build_client_context
from wlidd.watch import IdentityState

ALLOW = ["spiffe://example.org/ns/prod/**", "spiffe://other.org/ns/partner/sa/*"]


def client_context(svid: IssuedSvid, trust: bytes) -> ssl.SSLContext:
    files = CredentialFiles("client", svid.chain_pem, svid.key_pem, own_bundle=trust)
    return build_client_context(build_identity(files, dt.datetime.now(dt.UTC)))


def make_daemon(
    tmp_path: Path, files: FileSet, upstreams: Upstreams, policy: dict[str, Any] | None = None, **identity: Any
) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config(**identity)},
                "tokens": {"gcp": metadata_token_config(upstreams)},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "mtls": {"address": "127.0.0.1:0", "identity": "default", "allow": ALLOW},
                },
                "policy": policy or {},
            }
        )
    )


async def get(d: Daemon, context: ssl.SSLContext, path: str) -> httpx.Response:
    async with httpx.AsyncClient(verify=context, base_url=f"https://127.0.0.1:{d.mtls_port}") as c:
        return await c.get(path)


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "expected"),
    [
        ("spiffe://example.org/ns/prod/sa/web", "spiffe://example.org/ns/prod/sa/web", True),
        ("spiffe://example.org/ns/prod/sa/web", "spiffe://example.org/ns/prod/sa/api", False),
        ("spiffe://example.org", "spiffe://example.org/any/thing", True),
        ("spiffe://example.org", "spiffe://other.org/any/thing", False),
        ("spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/dev/sa/web", True),
        ("spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/dev/x/sa/web", False),
        ("spiffe://example.org/ns/**", "spiffe://example.org/ns/a/b/c", True),
        ("spiffe://example.org/ns/**", "spiffe://example.org/ns", False),
        ("spiffe://example.org/*", "spiffe://example.org/a/b", False),
    ],
)
def test_spiffe_id_matchers(pattern: str, spiffe_id: str, expected: bool) -> None:
    assert parse_matcher(pattern).matches(parse_spiffe_id(spiffe_id)) is expected


@pytest.mark.parametrize(
    "bad", ["https://example.org/x", "spiffe://Example.org/x", "spiffe://example.org/**/x", "spiffe://example.org/a b"]
)
def test_bad_matchers_are_refused_with_a_stable_reason_not_a_bare_value_error(bad: str) -> None:
    with pytest.raises(InvalidValue) as refused:
        parse_matcher(bad)
    assert refused.value.reason == "spiffe_id_matcher" and bad in refused.value.message


async def test_allowed_id_is_served_and_another_id_gets_403(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    server = ca.issue_svid("/ns/wlidd/sa/node")
    files.put(server, ca.bundle_pem)
    d = make_daemon(tmp_path, files, upstreams)
    async with in_background(d.run, d.stop):
        allowed = client_context(ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
        other = client_context(ca.issue_svid("/ns/dev/sa/web"), ca.bundle_pem)
        status = await get(d, allowed, "/v1/status")
        token = await get(d, allowed, "/v1/token/gcp")
        refused = await get(d, other, "/v1/token/gcp")
        creds = await get(d, allowed, "/v1/credentials/default")
    assert status.status_code == 200 and status.json()["identities"]["default"]["valid"]
    assert token.status_code == 200 and token.json()["access_token"].startswith("ya29.mds-")
    assert (
        refused.status_code == 403 and "spiffe://example.org/ns/dev/sa/web is not allowed" in refused.json()["message"]
    )
    assert "access_token" not in refused.text
    assert creds.status_code == 403, creds.text[:300]  # credentials over mTLS need an explicit spiffe_ids rule


async def test_per_token_spiffe_ids_narrow_the_listener(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    policy = {
        "token": {"gcp": {"spiffe_ids": ["spiffe://example.org/ns/prod/sa/api"]}},
        "identity": {"default": {"spiffe_ids": ["spiffe://example.org/ns/prod/sa/web"]}},
    }
    d = make_daemon(tmp_path, files, upstreams, policy)
    async with in_background(d.run, d.stop):
        web = client_context(ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
        api = client_context(ca.issue_svid("/ns/prod/sa/api"), ca.bundle_pem)
        assert (await get(d, web, "/v1/token/gcp")).status_code == 403
        assert (await get(d, api, "/v1/token/gcp")).status_code == 200
        creds = await get(d, web, "/v1/credentials/default")
    assert creds.status_code == 200 and creds.json()["key_pem"].startswith("-----BEGIN PRIVATE KEY-----")


async def test_a_foreign_trust_domain_is_refused_at_the_handshake(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    d = make_daemon(tmp_path, files, upstreams)
    async with in_background(d.run, d.stop):
        foreign = client_context(foreign_ca.issue_svid("/ns/partner/sa/x"), foreign_ca.bundle_pem)
        foreign.load_verify_locations(cadata=ca.bundle_pem.decode())
        with pytest.raises(httpx.HTTPError):
            await get(d, foreign, "/v1/status")


async def test_one_domains_ca_cannot_mint_another_domains_ids(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    foreign_bundle = tmp_path / "other.pem"
    foreign_bundle.write_bytes(foreign_ca.bundle_pem)
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    d = make_daemon(tmp_path, files, upstreams, bundles={"other.org": foreign_bundle})
    async with in_background(d.run, d.stop):
        partner = client_context(foreign_ca.issue_svid("/ns/partner/sa/x"), foreign_ca.bundle_pem)
        forged = client_context(foreign_ca.issue_svid(spiffe_id=f"spiffe://{TD}/ns/prod/sa/web"), foreign_ca.bundle_pem)
        for context in (partner, forged):
            context.load_verify_locations(cadata=ca.bundle_pem.decode())
        assert (await get(d, partner, "/v1/token/gcp")).status_code == 200  # federated, and allowed
        refused = await get(d, forged, "/v1/token/gcp")
    assert refused.status_code == 403 and "does not lead to the 'example.org' bundle" in refused.json()["message"]


async def test_server_rotation_while_clients_connect_fails_no_handshake(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid("/ns/wlidd/sa/node"), ca.bundle_pem)
    d = make_daemon(tmp_path, files, upstreams)
    context = client_context(ca.issue_svid("/ns/prod/sa/web"), ca.bundle_pem)
    results = {"ok": 0, "failed": 0, "serials": set()}
    stop = threading.Event()

    def hammer(port: int) -> None:
        import socket

        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
                    tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = tls.recv(65536)
                    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
                    results["serials"].add(
                        x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"").serial_number
                    )  # type: ignore[union-attr]
                    results["ok"] += 1  # type: ignore[operator]
            except (OSError, AssertionError):
                results["failed"] += 1  # type: ignore[operator]

    async with in_background(d.run, d.stop):
        assert d.mtls_port is not None
        threads = [threading.Thread(target=hammer, args=(d.mtls_port,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        watcher = d.watchers["default"]
        for _ in range(5):
            version = watcher.current.version  # type: ignore[union-attr]
            files.put(ca.issue_svid("/ns/wlidd/sa/node"))
            with anyio.fail_after(10):
                await watcher.wait_for_change(version)
            await anyio.sleep(0.15)
        stop.set()
        await anyio.to_thread.run_sync(lambda: [t.join(10) for t in threads])
    assert results["failed"] == 0 and results["ok"] > 20  # type: ignore[operator]
    assert len(results["serials"]) >= 5  # type: ignore[arg-type]  # the rotations were seen by clients


def test_a_caller_admitted_under_one_bundle_is_judged_again_under_the_next(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """The gate remembers verdicts per identity version: when other.org's bundle is replaced, a
    partner admitted under the old one is refused, not remembered as admitted."""
    server = ca.issue_svid("/ns/wlidd/sa/node")
    now = dt.datetime.now(dt.UTC)

    def state(version: int, other_org_bundle: bytes) -> IdentityState:
        files = CredentialFiles(
            "x",
            server.chain_pem,
            server.key_pem,
            own_bundle=ca.bundle_pem,
            extra_bundles=(("other.org", other_org_bundle),),
        )
        identity = build_identity(files, now)
        return IdentityState("default", identity, TlsContexts.build(identity), version, now)

    partner = foreign_ca.issue_svid("/ns/partner/sa/x")
    anchor = foreign_ca.root.public_bytes(serialization.Encoding.DER)
    holder = SimpleNamespace(current=state(1, foreign_ca.bundle_pem))
    gate = MtlsGate(lambda request: None, holder, ())  # type: ignore[arg-type]
    leaf = partner.leaf.public_bytes(serialization.Encoding.DER)
    assert str(gate.identify(leaf, anchor)) == "spiffe://other.org/ns/partner/sa/x"
    holder.current = state(2, CertificateAuthority("other.org").bundle_pem)  # other.org rotated its CA
    assert "does not lead to the 'other.org' bundle" in str(gate.identify(leaf, anchor))
