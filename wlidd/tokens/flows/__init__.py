"""The three token flows: each turns the current identity (if any) into a Token.

entra-sts     assertion signed with the identity's (or entra.cert's) RSA key → Entra ID token
              → STS exchange (jwt) → [IAM generateAccessToken]                      (entra_sts)
x509-sts      STS exchange over mTLS with the SVID (subject token = its chain) → [IAM over the same mTLS]
              the token never outlives the certificate it was obtained with         (x509_sts)
gce-metadata  the metadata server's service account token                          (gce_metadata)

Each flow's calls are one class (EntraStsSteps, X509StsSteps, GceMetadataSteps: `FlowSteps`, in
wlidd.tokens.flows.steps; the two STS flows share wlidd.tokens.flows.sts), chosen once by the config's type
when the Flow is made (`steps_for`); the Flow keeps what they share: its clients and the federated token.
Its clients' transports come from wlidd.tokens.flows.transports; what they send is counted in
wlidd.tokens.flows.attempts.

HTTP clients: a Flow owns every client it makes and closes one only when nothing can use it any more.
A client stays open while it is the plain client, the current mTLS client, the client of the federated
token that ID-token and scoped mints use (`_federated`: that token is bound to the SVID it was obtained
with, so it is used over that SVID's client, which outlives a rotation whose exchange failed), or while a
call is in flight on it (`using`). After `aclose` (shutdown, a config reload replacing the source) a call
gets UpstreamError `wlidd_other` saying so, never a closed client's RuntimeError.

Identities are read through `CurrentIdentity` (wlidd.tokens.model): no import of the watcher above.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import assert_never

import anyio
import httpx

from wlidd.config import EntraStsTokenConfig, GceMetadataTokenConfig, TokenConfig, X509StsTokenConfig
from wlidd.errors import UpstreamError
from wlidd.tokens.flows.attempts import mark_reported
from wlidd.tokens.flows.entra_sts import EntraStsSteps
from wlidd.tokens.flows.gce_metadata import GceMetadataSteps
from wlidd.tokens.flows.steps import FlowSteps, id_token_unsupported_error
from wlidd.tokens.flows.transports import Transports, new_client, tls_transports
from wlidd.tokens.flows.x509_sts import X509StsSteps
from wlidd.tokens.model import CurrentIdentity, IdentitySnapshot, Token


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
            self._plain = self._keep(new_client(self._transport(None), self.config.timeout))
        return self._plain

    def _transport(self, state: IdentitySnapshot | None) -> httpx.AsyncBaseTransport:
        transports = self.transports or tls_transports(self.config.ca_file)
        return transports(state)

    async def mtls(self, state: IdentitySnapshot) -> httpx.AsyncClient:
        """A client presenting `state`'s SVID; a new one when the identity rotates. The one it replaces is
        closed once nothing uses it (see the module docstring), not at once."""
        self._check_open()
        if self._mtls is None or self._mtls.version != state.version:
            client = new_client(self._transport(state), self.config.timeout)
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
    async def using(self, client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
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
        mark_reported()
        self._check_open()
        return await self.steps.token(self, now)

    def id_token_unsupported(self) -> UpstreamError | None:
        """Why this flow cannot mint ID tokens (code id_token_unsupported), or None when it can."""
        return None if self.mints_id_tokens else id_token_unsupported_error(self.config.flow)

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
        mark_reported()
        self._check_open()
        return await self.steps.id_token(self, audience, now)

    async def fetch_scoped_token(self, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        """One IAM generateAccessToken call for exactly `scopes` (with `impersonate.lifetime` and
        `delegates`), made with the federated token of the last exchange over its client: (accessToken,
        expiry on the local clock). UpstreamError `wlidd_other` (permanent) when this source impersonates
        no service account, `wlidd_no_federated_token` when `needs_federated` (refresh first)."""
        mark_reported()
        self._check_open()
        return await self.steps.scoped_token(self, scopes, now)

    def federated_for(self, what: str, now: dt.datetime) -> tuple[str, httpx.AsyncClient]:
        federated = self._federated
        if federated is None or self.needs_federated(now):
            raise UpstreamError("wlidd", f"no current federated token to mint {what} with", code="no_federated_token")
        return federated.token, federated.client

    async def keep_federated(self, token: str, expiry: dt.datetime, client: httpx.AsyncClient) -> None:
        """Keep the federated token of the last exchange (and the client it came over) for mints."""
        self._federated = _Federated(token, expiry, client)
        await self._close_unused()  # the previous federated token's client, if nothing else holds it


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
