"""The three token flows: each turns the current identity (if any) into a Token.
Long: the three flows' chains of upstream calls, side by side.

entra-sts     assertion signed with the identity's (or entra.cert's) RSA key → Entra ID token
              → STS exchange (jwt) → [IAM generateAccessToken]
x509-sts      STS exchange over mTLS with the SVID (subject token = its chain) → [IAM over the same mTLS]
              the token never outlives the certificate it was obtained with
gce-metadata  the metadata server's service account token

Each flow's calls are one class (EntraStsSteps, X509StsSteps, GceMetadataSteps: `FlowSteps`), chosen once by the
config's type when the Flow is made (`steps_for`); the Flow keeps what they share: its clients and the
federated token.

HTTP clients: a Flow owns every client it makes and closes one only when nothing can use it any more.
A client stays open while it is the plain client, the current mTLS client, the client of the federated
token that ID-token and scoped mints use (`_federated`: that token is bound to the SVID it was obtained
with, so it is used over that SVID's client, which outlives a rotation whose exchange failed), or while a
call is in flight on it (`_using`). After `aclose` (shutdown, a config reload replacing the source) a call
gets UpstreamError `wlidd_other` saying so, never a closed client's RuntimeError.

Counting: every HTTP request a Flow's clients send is counted in the `attempt()` open in the calling task,
so a caller counts an upstream call only when something was sent (a ca_file that cannot be loaded, a
missing SVID or signing key fail before that).

Transports: each client a Flow makes gets its transport from `transports(identity)` (`Transports`): None
for the plain client, the identity state whose SVID the client presents for an mTLS one. The default
(`tls_transports`) is httpx's own over TLS, verifying servers against `ca_file` (`upstream_ssl_context`).
Tests pass one that answers without sockets (wlidd.emulator.upstreams.Upstreams.mock_transport: the
emulator's own request checks behind an httpx.MockTransport); as such a transport sees no handshake, it
takes the client certificate from the identity it is made for, the one the handshake would present.

Identities are read through `CurrentIdentity` (wlidd.tokens.model): no import of the watcher above.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import stat
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar, assert_never

import anyio
import httpx
from cryptography import x509

from wlidd.config import (
    EntraStsTokenConfig,
    GceMetadataTokenConfig,
    StsTokenConfig,
    TokenConfig,
    X509StsTokenConfig,
)
from wlidd.errors import SvidError, UpstreamError
from wlidd.svid.load import read_regular_file
from wlidd.svid.parse import MAX_FILE_BYTES, parse_chain, parse_private_key
from wlidd.tlsctx import load_identity_into, trust_every_anchor
from wlidd.tokens.model import CurrentIdentity, IdentitySnapshot, Token
from wlidd.tokens.providers.entra import fetch_entra_token
from wlidd.tokens.providers.impersonate import generate_access_token, generate_id_token
from wlidd.tokens.providers.metadata import fetch_metadata_identity, fetch_metadata_token
from wlidd.tokens.providers.sts import JWT_TOKEN_TYPE, MTLS_TOKEN_TYPE, exchange, mtls_subject_token

Transports = Callable[[IdentitySnapshot | None], httpx.AsyncBaseTransport]
"""The transport of one new HTTP client: called with None for the plain client, with the identity state whose
SVID an mTLS client presents. May raise UpstreamError (`wlidd_ca_file`: nothing is sent then)."""

StsVariant = TypeVar("StsVariant", bound=StsTokenConfig)


def tls_transports(ca_file: Path | None) -> Transports:
    """The real transports: httpx over TLS, the server verified against `ca_file` (or the system store), the
    identity's SVID presented when there is one (`upstream_ssl_context`)."""

    def transport(state: IdentitySnapshot | None) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(verify=upstream_ssl_context(ca_file, state), trust_env=False)

    return transport


def upstream_ssl_context(ca_file: Path | None, state: IdentitySnapshot | None = None) -> ssl.SSLContext:
    """Verify upstream servers against `ca_file` or the system store; with `state`, present its SVID
    (TLS 1.3 only, as required for mTLS with workload credentials).

    The server is verified against `ca_file` (or the system store), never against the SPIFFE bundle.
    Every certificate there is a trust anchor, self-signed or not (`trust_every_anchor`): a `ca_file`
    holding only the issuing intermediate works, and so does a server certificate pinned there, as
    with Python 3.13's create_default_context. Raises UpstreamError `wlidd_ca_file` (permanent) naming
    the path when `ca_file` cannot be loaded (`wlidd check` reports the same before start), among them a
    `ca_file` that is not a regular file: OpenSSL's open() of a FIFO would block the event loop until
    something writes to it, so os.stat (which never blocks) is asked first.
    """
    try:
        if ca_file is not None and not stat.S_ISREG(os.stat(ca_file).st_mode):
            raise UpstreamError("wlidd", f"ca_file {ca_file}: is not a regular file", code="ca_file", retryable=False)
        context = trust_every_anchor(ssl.create_default_context(cafile=str(ca_file) if ca_file else None))
    except (OSError, ssl.SSLError) as exc:  # ca_file missing, unreadable, or no certificate in it
        detail = "holds no usable CA certificate" if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
        raise UpstreamError("wlidd", f"ca_file {ca_file}: {detail}", code="ca_file", retryable=False) from None
    if state is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        load_identity_into(context, state.identity)
    return context


@dataclass
class Attempt:
    """What one upstream call (an access-token chain, one mint) did: `sent` HTTP requests went out over a
    Flow's clients; `reported` once a Flow ran it (a stand-in without HTTP clients reports nothing)."""

    sent: int = 0
    reported: bool = False

    @property
    def went_upstream(self) -> bool:
        """Whether to count it as an upstream call: something was sent, or its flow cannot tell."""
        return self.sent > 0 or not self.reported


_ATTEMPT: ContextVar[Attempt | None] = ContextVar("wlidd_upstream_attempt", default=None)


@contextlib.contextmanager
def attempt() -> Iterator[Attempt]:
    """Count what the calls made by this task inside the block send (httpx runs request hooks in the
    task that sends, so concurrent attempts in other tasks are counted apart)."""
    current = Attempt()
    token = _ATTEMPT.set(current)
    try:
        yield current
    finally:
        _ATTEMPT.reset(token)


def _report() -> None:
    current = _ATTEMPT.get()
    if current is not None:
        current.reported = True


async def _count_request(request: httpx.Request) -> None:
    current = _ATTEMPT.get()
    if current is not None:
        current.sent += 1


def _client(transport: httpx.AsyncBaseTransport, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        trust_env=False,
        headers={"User-Agent": "wlidd"},
        event_hooks={"request": [_count_request]},
    )


def _require_identity(current: CurrentIdentity | None, name: str | None, now: dt.datetime) -> IdentitySnapshot:
    state = current() if current is not None else None
    if state is None:
        raise UpstreamError("identity", f"identity {name!r} has no valid SVID loaded", code="unavailable")
    if not state.identity.svid.is_valid_at(now):
        raise UpstreamError("identity", f"identity {name!r} SVID is outside its validity window", code="expired")
    return state


@dataclass(frozen=True)
class _MtlsClient:
    """The current mTLS client and the version of the identity state whose SVID it presents."""

    version: int
    client: httpx.AsyncClient


@dataclass(frozen=True)
class _Federated:
    """The federated (STS) token of the last exchange, its expiry (local clock) and the client it was obtained
    over: generateIdToken and scoped generateAccessToken calls are made with it, over that client."""

    token: str = field(repr=False)
    expiry: dt.datetime
    client: httpx.AsyncClient


@dataclass
class Flow:
    """One token source's way to a Token; owns its HTTP clients (see the module docstring). `transports`: where
    its clients' transports come from (default: `tls_transports(config.ca_file)`)."""

    name: str
    config: TokenConfig
    current_identity: CurrentIdentity | None = None
    transports: Transports | None = field(default=None, repr=False)
    _plain: httpx.AsyncClient | None = field(default=None, repr=False)
    _mtls: _MtlsClient | None = field(default=None, repr=False)
    _federated: _Federated | None = field(default=None, repr=False)  # the last exchange's, for mints
    _open: list[httpx.AsyncClient] = field(default_factory=list, repr=False)  # every client not yet closed
    _uses: dict[int, int] = field(default_factory=dict, repr=False)  # id(client) → calls in flight on it
    _closed: bool = field(default=False, repr=False)
    steps: FlowSteps = field(init=False, repr=False)  # the flow's own calls, chosen by the config's type

    def __post_init__(self) -> None:
        self.steps = steps_for(self.config)

    @property
    def mints_id_tokens(self) -> bool:
        """ID tokens come from IAM generateIdToken (when impersonating) or a metadata upstream."""
        return self.steps.mints_id_tokens

    @property
    def bound_to_svid(self) -> bool:
        """Whether its token is bound to the SVID it was obtained with (x509-sts): the source refreshes at once
        when the SVID rotates."""
        return self.steps.bound_to_svid

    @property
    def id_token_minter(self) -> str:
        """Who mints its ID tokens, as errors and logs name it: "metadata" (gce-metadata) or "iam"."""
        return self.steps.id_token_minter

    @property
    def plain(self) -> httpx.AsyncClient:
        """The client without a client certificate (made on first use). UpstreamError `wlidd_ca_file` when
        ca_file cannot be loaded, `wlidd_other` after `aclose`."""
        self._check_open()
        if self._plain is None:
            self._plain = self._keep(_client(self._transport(None), self.config.timeout))
        return self._plain

    def _transport(self, state: IdentitySnapshot | None) -> httpx.AsyncBaseTransport:
        transports = self.transports or tls_transports(self.config.ca_file)
        return transports(state)

    async def mtls(self, state: IdentitySnapshot) -> httpx.AsyncClient:
        """A client presenting `state`'s SVID; a new one when the identity rotates. The one it replaces is
        closed once nothing uses it (see the module docstring), not at once."""
        self._check_open()
        if self._mtls is None or self._mtls.version != state.version:
            client = _client(self._transport(state), self.config.timeout)
            self._mtls = _MtlsClient(state.version, self._keep(client))
            await self._close_unused()
        return self._mtls.client

    async def aclose(self) -> None:
        """Close every client now, except those a call is still in flight on: each of those is closed when
        its last call ends. Calls after this one get UpstreamError `wlidd_other`."""
        self._closed = True
        self._plain = self._mtls = self._federated = None
        await self._close_unused()

    def _keep(self, client: httpx.AsyncClient) -> httpx.AsyncClient:
        self._open.append(client)
        return client

    def _check_open(self) -> None:
        if self._closed:
            raise UpstreamError(
                "wlidd", f"token {self.name!r} was stopped (shutdown or configuration reload)", code="other"
            )

    @contextlib.asynccontextmanager
    async def _using(self, client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
        """`client`, kept open for the block. Take it in the same step as reading the reference to it (no
        await between): a rotation or `aclose` can otherwise close it first."""
        if client.is_closed:  # cannot happen while the references above hold: say so, not RuntimeError
            self._check_open()
            raise UpstreamError("wlidd", f"token {self.name!r}: its HTTP client was closed", code="other")
        key = id(client)
        self._uses[key] = self._uses.get(key, 0) + 1
        try:
            yield client
        finally:
            left = self._uses.pop(key) - 1
            if left:
                self._uses[key] = left
            with anyio.CancelScope(shield=True):
                await self._close_unused()

    async def _close_unused(self) -> None:
        """Close the clients nothing refers to (plain, current mTLS, federated) and no call is using."""
        referenced = [
            self._plain,
            self._mtls.client if self._mtls else None,
            self._federated.client if self._federated else None,
        ]
        unused = [c for c in self._open if not any(c is r for r in referenced) and id(c) not in self._uses]
        for client in unused:
            self._open.remove(client)
        for client in unused:
            await client.aclose()

    async def fetch(self, now: dt.datetime) -> Token:
        _report()
        self._check_open()
        return await self.steps.token(self, now)

    def id_token_unsupported(self) -> UpstreamError | None:
        """Why this flow cannot mint ID tokens (code id_token_unsupported), or None when it can."""
        return None if self.mints_id_tokens else _id_token_unsupported(self.config.flow)

    def needs_federated(self, now: dt.datetime) -> bool:
        """True when a mint (an ID token, a scoped token) needs a new STS exchange first: generateIdToken
        and generateAccessToken are called with the federated token, and the last one is missing or within
        `skew` of its expiry (or of the end of the certificate it is bound to). The caller renews it through
        the token source's refresh (single-flight, min_interval, counted), never from here."""
        if not self.steps.mints_with_federated:
            return False
        federated = self._federated
        return federated is None or (federated.expiry - now).total_seconds() < self.config.skew

    async def fetch_id_token(self, audience: str, now: dt.datetime) -> str:
        """One upstream call for an ID token for `audience`: the metadata server's identity endpoint, or
        IAM generateIdToken with the federated token of the last exchange, over the client it was obtained
        over. UpstreamError with code id_token_unsupported when this flow cannot mint one, or
        no_federated_token when `needs_federated` (the caller must refresh first: this method makes exactly
        one upstream call, never a chain)."""
        _report()
        self._check_open()
        return await self.steps.id_token(self, audience, now)

    async def fetch_scoped_token(self, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        """One IAM generateAccessToken call for exactly `scopes` (with `impersonate.lifetime` and
        `delegates`), made with the federated token of the last exchange over its client: (accessToken,
        expiry on the local clock). UpstreamError `wlidd_other` (permanent) when this source impersonates
        no service account, `wlidd_no_federated_token` when `needs_federated` (refresh first)."""
        _report()
        self._check_open()
        return await self.steps.scoped_token(self, scopes, now)

    def _federated_for(self, what: str, now: dt.datetime) -> tuple[str, httpx.AsyncClient]:
        federated = self._federated
        if federated is None or self.needs_federated(now):
            raise UpstreamError("wlidd", f"no current federated token to mint {what} with", code="no_federated_token")
        return federated.token, federated.client

    async def _keep_federated(self, token: str, expiry: dt.datetime, client: httpx.AsyncClient) -> None:
        """Keep the federated token of the last exchange (and the client it came over) for mints."""
        self._federated = _Federated(token, expiry, client)
        await self._close_unused()  # the previous federated token's client, if nothing else holds it


def _id_token_unsupported(flow: str) -> UpstreamError:
    return UpstreamError(
        "wlidd",
        f"flow {flow} mints no ID tokens without a service account to impersonate (impersonate.service_account)",
        code="id_token_unsupported",
        retryable=False,
    )


def _no_scoped_tokens(name: str) -> UpstreamError:
    return UpstreamError(
        "wlidd",
        f"token {name!r} impersonates no service account, so it mints no token with other scopes",
        code="other",
        retryable=False,
    )


class FlowSteps(Protocol):
    """One token flow's upstream calls: one class per `flow` (EntraStsSteps, X509StsSteps, GceMetadataSteps),
    chosen by the config's type when its Flow is made (`steps_for`). Each call runs over the Flow's clients
    (`Flow.plain`, `Flow.mtls`) and keeps what the Flow keeps (the federated token)."""

    @property
    def mints_id_tokens(self) -> bool:
        """Whether ID tokens can be had (IAM generateIdToken when impersonating, or a metadata upstream)."""
        ...

    @property
    def mints_with_federated(self) -> bool:
        """Whether ID tokens and scoped tokens are minted with the federated token of the last exchange."""
        ...

    @property
    def bound_to_svid(self) -> bool:
        """Whether the token is bound to the SVID it was obtained with (refreshed at once when it rotates)."""
        ...

    @property
    def id_token_minter(self) -> str:
        """Who mints ID tokens, as errors name it ("iam", "metadata")."""
        ...

    async def token(self, flow: Flow, now: dt.datetime) -> Token:
        """The source's token: the flow's whole chain."""
        ...

    async def id_token(self, flow: Flow, audience: str, now: dt.datetime) -> str:
        """One upstream call for an ID token (see Flow.fetch_id_token)."""
        ...

    async def scoped_token(self, flow: Flow, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        """One upstream call for a token with other scopes (see Flow.fetch_scoped_token)."""
        ...


@dataclass(frozen=True)
class _StsSteps(Generic[StsVariant]):
    """What both STS flows do after their exchange: impersonate a service account (when configured) and
    mint ID tokens and scoped tokens with the federated token."""

    config: StsVariant

    @property
    def mints_id_tokens(self) -> bool:
        return self.config.impersonate is not None

    @property
    def mints_with_federated(self) -> bool:
        return self.config.impersonate is not None

    @property
    def bound_to_svid(self) -> bool:
        return False

    @property
    def id_token_minter(self) -> str:
        return "iam"

    async def id_token(self, flow: Flow, audience: str, now: dt.datetime) -> str:
        imp = self.config.impersonate
        if imp is None:
            raise _id_token_unsupported(self.config.flow)
        bearer, client = flow._federated_for("an ID token", now)
        async with flow._using(client):
            return await generate_id_token(
                client,
                self.config.impersonate_base(),
                service_account=imp.service_account,
                bearer=bearer,
                audience=audience,
            )

    async def scoped_token(self, flow: Flow, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        imp = self.config.impersonate
        if imp is None:
            raise _no_scoped_tokens(flow.name)
        bearer, client = flow._federated_for("a scoped token", now)
        async with flow._using(client):
            return await generate_access_token(
                client,
                self.config.impersonate_base(),
                service_account=imp.service_account,
                bearer=bearer,
                scope=scopes,
                lifetime=imp.lifetime,
                delegates=imp.delegates,
                sent_at=now,
            )

    async def _impersonate(
        self,
        flow: Flow,
        client: httpx.AsyncClient,
        federated: str,
        expires_in: float,
        now: dt.datetime,
        not_after: dt.datetime | None = None,
    ) -> tuple[str, dt.datetime]:
        """The source's token from the federated one: generateAccessToken when impersonating, else the
        federated token itself. The federated token is kept for mints (with `client`), its expiry bounded
        by `not_after`, the end of the certificate it is bound to (x509-sts)."""
        expiry = now + dt.timedelta(seconds=expires_in)
        await flow._keep_federated(federated, min(expiry, not_after) if not_after else expiry, client)
        imp = self.config.impersonate
        if imp is None:
            return federated, expiry
        return await generate_access_token(
            client,
            self.config.impersonate_base(),
            service_account=imp.service_account,
            bearer=federated,
            scope=imp.scope,
            lifetime=imp.lifetime,
            delegates=imp.delegates,
            sent_at=now,
        )


@dataclass(frozen=True)
class EntraStsSteps(_StsSteps[EntraStsTokenConfig]):
    """entra-sts: a client assertion signed with the identity's key (or entra.cert's) → Entra ID token → STS
    exchange (jwt) → [IAM generateAccessToken], all over the plain client."""

    def _signer(self, flow: Flow, now: dt.datetime) -> tuple[object, x509.Certificate]:
        entra = self.config.entra
        if entra.cert is not None and entra.key is not None:
            try:  # regular files only: a FIFO would block the event loop (preflight.read_regular_file)
                key = parse_private_key(read_regular_file(entra.key, MAX_FILE_BYTES))
                return key, parse_chain(read_regular_file(entra.cert, MAX_FILE_BYTES))[0]
            except OSError as exc:
                raise UpstreamError(
                    "entra", f"cannot read entra.cert/entra.key: {exc.strerror}", code="signer", retryable=False
                ) from None
            except SvidError as exc:
                raise UpstreamError(
                    "entra", f"entra.cert/entra.key: {exc.message}", code="signer", retryable=False
                ) from None
        state = _require_identity(flow.current_identity, self.config.identity, now)
        return state.identity.svid.private_key, state.identity.svid.leaf

    async def token(self, flow: Flow, now: dt.datetime) -> Token:
        entra, sts = self.config.entra, self.config.sts
        key, cert = self._signer(flow, now)
        async with flow._using(flow.plain) as client:
            entra_token, _ = await fetch_entra_token(client, entra, key=key, cert=cert, now=now)
            federated, expires_in = await exchange(
                client,
                self.config.sts_url(),
                audience=sts.audience,
                scope=sts.scope,
                subject_token=entra_token,
                subject_token_type=JWT_TOKEN_TYPE,
            )
            value, expire_time = await self._impersonate(flow, client, federated, expires_in, now)
        return Token(value, expire_time, now, flow.name)


@dataclass(frozen=True)
class X509StsSteps(_StsSteps[X509StsTokenConfig]):
    """x509-sts: STS exchange over mTLS with the identity's SVID (subject token = its chain) → [IAM over the
    same mTLS]; the token never outlives the certificate it was obtained with."""

    @property
    def bound_to_svid(self) -> bool:
        return True

    async def token(self, flow: Flow, now: dt.datetime) -> Token:
        sts = self.config.sts
        state = _require_identity(flow.current_identity, self.config.identity, now)
        svid = state.identity.svid
        async with flow._using(await flow.mtls(state)) as client:
            federated, expires_in = await exchange(
                client,
                self.config.sts_url(),
                audience=sts.audience,
                scope=sts.scope,
                subject_token=mtls_subject_token(svid.chain),
                subject_token_type=MTLS_TOKEN_TYPE,
            )
            value, expire_time = await self._impersonate(flow, client, federated, expires_in, now, svid.not_after)
        # A certificate-bound token must not outlive the certificate it was obtained with.
        return Token(value, min(expire_time, svid.not_after), now, flow.name, identity_version=state.version)


@dataclass(frozen=True)
class GceMetadataSteps:
    """gce-metadata: the metadata server's service account token and ID tokens, over the plain client."""

    config: GceMetadataTokenConfig

    @property
    def mints_id_tokens(self) -> bool:
        return True

    @property
    def mints_with_federated(self) -> bool:
        return False

    @property
    def bound_to_svid(self) -> bool:
        return False

    @property
    def id_token_minter(self) -> str:
        return "metadata"

    async def token(self, flow: Flow, now: dt.datetime) -> Token:
        meta = self.config.metadata_config()
        async with flow._using(flow.plain) as client:
            value, expires_in = await fetch_metadata_token(client, meta.url, account=meta.account, scopes=meta.scopes)
        return Token(value, now + dt.timedelta(seconds=expires_in), now, flow.name)

    async def id_token(self, flow: Flow, audience: str, now: dt.datetime) -> str:
        meta = self.config.metadata_config()
        async with flow._using(flow.plain) as client:
            return await fetch_metadata_identity(client, meta.url, account=meta.account, audience=audience)

    async def scoped_token(self, flow: Flow, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        raise _no_scoped_tokens(flow.name)


def steps_for(config: TokenConfig) -> FlowSteps:
    """The steps of `config`'s flow, chosen by its type."""
    match config:
        case EntraStsTokenConfig():
            return EntraStsSteps(config)
        case X509StsTokenConfig():
            return X509StsSteps(config)
        case GceMetadataTokenConfig():
            return GceMetadataSteps(config)
    assert_never(config)
