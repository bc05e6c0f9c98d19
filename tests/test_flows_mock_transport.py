"""Token flows over an injected transport: the Entra ID → STS → IAM chain and the x509 STS chain, answered by
the emulator's own request checks behind httpx.MockTransport (Upstreams.mock_transport), with no socket.

The transport sees no TLS handshake, so an mTLS client's certificate reaches the emulator another way: the
Flow makes one transport per client and names the identity that client presents (`Transports`), and the
mock records that identity's leaf as the TLS peer's certificate, as the mTLS listener's handshake would.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import APP_URI, AUDIENCE, CLIENT_ID, FileSet, token_emulator
from tests.test_tokens import entra_token_config, x509_token_config
from wlidd.config import parse_token_config
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid
from wlidd.emulator.upstreams import Upstreams
from wlidd.errors import UpstreamError
from wlidd.tokens.flows import Flow
from wlidd.tokens.flows.attempts import attempt
from wlidd.tokens.flows.transports import Transports
from wlidd.tokens.manager import TokenSource
from wlidd.tokens.model import IdentitySnapshot
from wlidd.watch import CredentialWatcher


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to connect a socket fails the test: everything below runs in memory."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a socket was connected")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def emulator(tmp_path: Path, ca: CertificateAuthority, no_sockets: None) -> Iterator[Upstreams]:
    """The token emulator, never run: its ports are only names the mock transport routes by."""
    emulator = token_emulator(tmp_path, ca)
    emulator.https_port, emulator.mtls_port, emulator.metadata_port = 10443, 20443, 10080
    yield emulator


@pytest.fixture
async def watcher(files: FileSet, ca: CertificateAuthority, rsa_svid: IssuedSvid) -> AsyncIterator[CredentialWatcher]:
    """The identity the flows use, loaded from files (an RSA key: Entra ID assertions need one)."""
    files.put(rsa_svid, ca.bundle_pem)
    watcher = CredentialWatcher("default", files.source())
    assert await watcher.reload("start")
    yield watcher
    watcher.close()


@pytest.fixture
def rsa_svid(ca: CertificateAuthority) -> IssuedSvid:
    return ca.issue_svid("/ns/prod/sa/entra-client", key_kind="rsa2048")


def leaf_der(state: IdentitySnapshot) -> bytes:
    return state.identity.svid.leaf.public_bytes(Encoding.DER)


def emulator_transports(emulator: Upstreams, presented: bytes | None = None) -> Transports:
    """The Flow's transports: the emulator's checks; an mTLS client presents its identity's leaf (or
    `presented`, to show the emulator refusing a mismatch)."""

    def transport(state: IdentitySnapshot | None) -> httpx.AsyncBaseTransport:
        if state is None:
            return emulator.mock_transport()
        return emulator.mock_transport(presented or leaf_der(state))

    return transport


def entra_flow(emulator: Upstreams, watcher: CredentialWatcher) -> Flow:
    config = parse_token_config(entra_token_config(emulator))
    return Flow("gcp", config, lambda: watcher.current, transports=emulator_transports(emulator))


async def test_the_entra_sts_impersonation_chain_passes_the_emulators_checks_without_sockets(
    emulator: Upstreams, watcher: CredentialWatcher, rsa_svid: IssuedSvid
) -> None:
    """A certificate-signed assertion to Entra ID, its token exchanged at STS, then IAM generateAccessToken:
    each request checked as the real service checks it (assertion signature, aud, jti; subject token
    issuer and audience; Bearer = an issued STS token), and then an ID token over the same chain's client."""
    emulator.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
    flow = entra_flow(emulator, watcher)
    now = dt.datetime.now(dt.UTC)
    try:
        with attempt() as call:
            token = await flow.fetch(now)
        id_token = await flow.fetch_id_token("https://service.example", now)
    finally:
        await flow.aclose()
    assert token.value.startswith("ya29.iam-") and token.value in emulator.issued
    assert 3500 < token.seconds_left(now) <= 3600
    assert call.sent == 3  # every request counted, as over sockets
    assert dict(emulator.calls) == {"entra": 1, "sts": 1, "iam": 2, "iam_id_token": 1}
    assert not emulator.refusals
    assert id_token.count(".") == 2


async def test_an_unregistered_entra_app_is_refused_by_the_emulator_through_the_mock_transport(
    emulator: Upstreams, watcher: CredentialWatcher
) -> None:
    """The refusal comes from the emulator's Entra ID check (AADSTS700016) and is mapped at the flow's boundary,
    as over sockets; nothing is exchanged at STS."""
    flow = entra_flow(emulator, watcher)
    try:
        with pytest.raises(UpstreamError) as refused:
            await flow.fetch(dt.datetime.now(dt.UTC))
    finally:
        await flow.aclose()
    assert refused.value.reason == "entra_aadsts700016" and refused.value.status == 400
    assert emulator.refusals == {"entra:AADSTS700016": 1} and emulator.calls["sts"] == 0


async def test_the_x509_sts_chain_binds_the_token_to_the_certificate_the_client_presents(
    emulator: Upstreams, watcher: CredentialWatcher
) -> None:
    """STS over mTLS (subject token = the SVID chain, its leaf checked against the presented certificate),
    then IAM over the same client: the token carries the identity version it was obtained with."""
    config = parse_token_config(x509_token_config(emulator))
    flow = Flow("gcp", config, lambda: watcher.current, transports=emulator_transports(emulator))
    state = watcher.current
    assert state is not None
    try:
        token = await flow.fetch(dt.datetime.now(dt.UTC))
    finally:
        await flow.aclose()
    assert token.value.startswith("ya29.iam-") and token.identity_version == state.version
    assert token.expire_time <= state.identity.svid.not_after
    assert emulator.mtls_leaves == [state.identity.svid.leaf.serial_number]
    assert dict(emulator.calls) == {"sts_mtls": 1, "iam": 1} and not emulator.refusals


async def test_the_emulator_refuses_a_subject_token_whose_leaf_is_not_the_presented_certificate(
    emulator: Upstreams, watcher: CredentialWatcher, ca: CertificateAuthority
) -> None:
    """The cert-binding check runs behind the mock: a client presenting another certificate than the subject
    token's leaf gets STS's invalid_grant, and no token is issued."""
    config = parse_token_config(x509_token_config(emulator))
    other = ca.issue_svid("/ns/prod/sa/other").leaf.public_bytes(Encoding.DER)
    flow = Flow("gcp", config, lambda: watcher.current, transports=emulator_transports(emulator, other))
    try:
        with pytest.raises(UpstreamError) as refused:
            await flow.fetch(dt.datetime.now(dt.UTC))
    finally:
        await flow.aclose()
    assert refused.value.reason == "sts_invalid_grant" and refused.value.status == 400
    assert emulator.refusals == {"sts_mtls:invalid_grant": 1} and not emulator.issued


async def test_an_mtls_request_without_a_client_certificate_fails_as_its_handshake_would(
    emulator: Upstreams, watcher: CredentialWatcher
) -> None:
    """The mock's stand-in for the mTLS listener's handshake: no client certificate, no connection (the flow's
    `connect` error), and the emulator's checks are never reached."""
    config = parse_token_config(x509_token_config(emulator))

    def plain_only(state: IdentitySnapshot | None) -> httpx.AsyncBaseTransport:
        return emulator.mock_transport()

    flow = Flow("gcp", config, lambda: watcher.current, transports=plain_only)
    try:
        with pytest.raises(UpstreamError) as failed:
            await flow.fetch(dt.datetime.now(dt.UTC))
    finally:
        await flow.aclose()
    assert failed.value.reason == "sts_connect" and not emulator.calls


async def test_a_token_source_over_the_mock_transport_serves_the_chains_token_and_counts_one_upstream_call(
    emulator: Upstreams, watcher: CredentialWatcher, rsa_svid: IssuedSvid
) -> None:
    """The whole token engine (cache, single flight, pacing, counting) over the injected transport."""
    emulator.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
    flow = entra_flow(emulator, watcher)
    source = TokenSource("gcp", flow.config, flow, watcher=watcher)
    try:
        first = await source.get()
        again = await source.get()
    finally:
        await flow.aclose()
    assert first is again and source.upstream_calls == 1 and source.published == 1
    assert emulator.calls["entra"] == 1 and AUDIENCE in emulator.providers
