"""The three token flows: each turns the current identity (if any) into a Token.

entra-sts     assertion signed with the identity's (or entra.cert's) RSA key → Entra ID token
              → STS exchange (jwt) → [IAM generateAccessToken]
x509-sts      STS exchange over mTLS with the SVID (subject token = its chain) → [IAM over the same mTLS]
              the token never outlives the certificate it was obtained with
gce-metadata  the metadata server's service account token
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography import x509

from wlidd.config import TokenConfig
from wlidd.errors import SvidError, UpstreamError
from wlidd.svid.parse import parse_chain, parse_private_key
from wlidd.tlsctx import load_identity_into, trust_every_anchor
from wlidd.tokens.model import Token
from wlidd.tokens.providers.entra import fetch_entra_token
from wlidd.tokens.providers.impersonate import generate_access_token, generate_id_token
from wlidd.tokens.providers.metadata import fetch_metadata_identity, fetch_metadata_token
from wlidd.tokens.providers.sts import JWT_TOKEN_TYPE, MTLS_TOKEN_TYPE, exchange, mtls_subject_token
from wlidd.watch import IdentityState

CurrentIdentity = Callable[[], IdentityState | None]


def upstream_ssl_context(ca_file: Path | None, state: IdentityState | None = None) -> ssl.SSLContext:
    """Verify upstream servers against `ca_file` or the system store; with `state`, present its SVID
    (TLS 1.3 only, as required for mTLS with workload credentials).

    The server is verified against `ca_file` (or the system store), never against the SPIFFE bundle.
    Every certificate there is a trust anchor, self-signed or not (`trust_every_anchor`): a `ca_file`
    holding only the issuing intermediate works, and so does a server certificate pinned there, as
    with Python 3.13's create_default_context. Raises UpstreamError `wlidd_ca_file` (permanent) naming
    the path when `ca_file` cannot be loaded (`wlidd check` reports the same before start).
    """
    try:
        context = trust_every_anchor(ssl.create_default_context(cafile=str(ca_file) if ca_file else None))
    except (OSError, ssl.SSLError) as exc:  # ca_file missing, unreadable, or no certificate in it
        detail = "holds no usable CA certificate" if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
        raise UpstreamError("wlidd", f"ca_file {ca_file}: {detail}", code="ca_file", retryable=False) from None
    if state is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        load_identity_into(context, state.identity)
    return context


def _client(context: ssl.SSLContext, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=context, timeout=timeout, trust_env=False, headers={"User-Agent": "wlidd"})


def _require_identity(current: CurrentIdentity | None, name: str | None, now: dt.datetime) -> IdentityState:
    state = current() if current is not None else None
    if state is None:
        raise UpstreamError("identity", f"identity {name!r} has no valid SVID loaded", code="unavailable")
    if not state.identity.svid.is_valid_at(now):
        raise UpstreamError("identity", f"identity {name!r} SVID is outside its validity window", code="expired")
    return state


@dataclass
class Flow:
    """One token source's way to a Token; owns its HTTP clients."""

    name: str
    config: TokenConfig
    current_identity: CurrentIdentity | None = None
    _plain: httpx.AsyncClient | None = field(default=None, repr=False)
    _mtls: tuple[int, httpx.AsyncClient] | None = field(default=None, repr=False)
    # The last federated (STS) token and the client it was obtained over: generateIdToken needs it.
    _federated: tuple[str, dt.datetime, httpx.AsyncClient] | None = field(default=None, repr=False)

    @property
    def mints_id_tokens(self) -> bool:
        """ID tokens come from IAM generateIdToken (when impersonating) or a metadata upstream."""
        return self.config.flow == "gce-metadata" or self.config.impersonate is not None

    @property
    def plain(self) -> httpx.AsyncClient:
        if self._plain is None:
            self._plain = _client(upstream_ssl_context(self.config.ca_file), self.config.timeout)
        return self._plain

    async def mtls(self, state: IdentityState) -> httpx.AsyncClient:
        """A client presenting `state`'s SVID; rebuilt when the identity rotates."""
        if self._mtls is None or self._mtls[0] != state.version:
            if self._mtls is not None:
                await self._mtls[1].aclose()
            self._mtls = (state.version, _client(upstream_ssl_context(self.config.ca_file, state), self.config.timeout))
        return self._mtls[1]

    async def aclose(self) -> None:
        if self._plain is not None:
            await self._plain.aclose()
        if self._mtls is not None:
            await self._mtls[1].aclose()

    async def fetch(self, now: dt.datetime) -> Token:
        if self.config.flow == "entra-sts":
            return await self._entra_sts(now)
        if self.config.flow == "x509-sts":
            return await self._x509_sts(now)
        return await self._metadata(now)

    def _entra_signer(self, now: dt.datetime) -> tuple[object, x509.Certificate]:
        entra = self.config.entra
        assert entra is not None
        if entra.cert is not None and entra.key is not None:
            try:
                return parse_private_key(entra.key.read_bytes()), parse_chain(entra.cert.read_bytes())[0]
            except OSError as exc:
                raise UpstreamError(
                    "entra", f"cannot read entra.cert/entra.key: {exc.strerror}", code="signer", retryable=False
                ) from None
            except SvidError as exc:
                raise UpstreamError(
                    "entra", f"entra.cert/entra.key: {exc.message}", code="signer", retryable=False
                ) from None
        state = _require_identity(self.current_identity, self.config.identity, now)
        return state.identity.svid.private_key, state.identity.svid.leaf

    def id_token_unsupported(self) -> UpstreamError | None:
        """Why this flow cannot mint ID tokens (code id_token_unsupported), or None when it can."""
        if self.mints_id_tokens:
            return None
        return UpstreamError(
            "wlidd",
            f"flow {self.config.flow} mints no ID tokens without a service account to impersonate "
            "(impersonate.service_account)",
            code="id_token_unsupported",
            retryable=False,
        )

    def needs_federated(self, now: dt.datetime) -> bool:
        """True when an ID token needs a new STS exchange first: generateIdToken is called with the
        federated token, and the last one is missing or within `skew` of its expiry. The caller renews it
        through the token source's refresh (single-flight, min_interval, counted), never from here."""
        if self.config.flow == "gce-metadata" or self.config.impersonate is None:
            return False
        federated = self._federated
        return federated is None or (federated[1] - now).total_seconds() < self.config.skew

    async def fetch_id_token(self, audience: str, now: dt.datetime) -> str:
        """One upstream call for an ID token for `audience`: the metadata server's identity endpoint, or
        IAM generateIdToken with the federated token of the last exchange. UpstreamError with code
        id_token_unsupported when this flow cannot mint one, or no_federated_token when `needs_federated`
        (the caller must refresh first: this method makes exactly one upstream call, never a chain)."""
        if self.config.flow == "gce-metadata":
            meta = self.config.metadata_config()
            return await fetch_metadata_identity(self.plain, meta.url, account=meta.account, audience=audience)
        imp = self.config.impersonate
        if imp is None:
            unsupported = self.id_token_unsupported()
            assert unsupported is not None
            raise unsupported
        federated = self._federated
        if federated is None or self.needs_federated(now):
            raise UpstreamError(
                "wlidd", "no current federated token to mint an ID token with", code="no_federated_token"
            )
        return await generate_id_token(
            federated[2],
            self.config.impersonate_base(),
            service_account=imp.service_account,
            bearer=federated[0],
            audience=audience,
        )

    async def _impersonate(
        self, client: httpx.AsyncClient, federated: str, expires_in: float, now: dt.datetime
    ) -> tuple[str, dt.datetime]:
        self._federated = (federated, now + dt.timedelta(seconds=expires_in), client)
        imp = self.config.impersonate
        if imp is None:
            return federated, now + dt.timedelta(seconds=expires_in)
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

    async def _entra_sts(self, now: dt.datetime) -> Token:
        entra, sts = self.config.entra, self.config.sts
        assert entra is not None and sts is not None
        key, cert = self._entra_signer(now)
        entra_token, _ = await fetch_entra_token(self.plain, entra, key=key, cert=cert, now=now)
        federated, expires_in = await exchange(
            self.plain,
            self.config.sts_url(),
            audience=sts.audience,
            scope=sts.scope,
            subject_token=entra_token,
            subject_token_type=JWT_TOKEN_TYPE,
        )
        value, expire_time = await self._impersonate(self.plain, federated, expires_in, now)
        return Token(value, expire_time, now, self.name)

    async def _x509_sts(self, now: dt.datetime) -> Token:
        sts = self.config.sts
        assert sts is not None
        state = _require_identity(self.current_identity, self.config.identity, now)
        client = await self.mtls(state)
        svid = state.identity.svid
        federated, expires_in = await exchange(
            client,
            self.config.sts_url(),
            audience=sts.audience,
            scope=sts.scope,
            subject_token=mtls_subject_token(svid.chain),
            subject_token_type=MTLS_TOKEN_TYPE,
        )
        value, expire_time = await self._impersonate(client, federated, expires_in, now)
        # A certificate-bound token must not outlive the certificate it was obtained with.
        return Token(value, min(expire_time, svid.not_after), now, self.name, identity_version=state.version)

    async def _metadata(self, now: dt.datetime) -> Token:
        meta = self.config.metadata_config()
        value, expires_in = await fetch_metadata_token(self.plain, meta.url, account=meta.account, scopes=meta.scopes)
        return Token(value, now + dt.timedelta(seconds=expires_in), now, self.name)
