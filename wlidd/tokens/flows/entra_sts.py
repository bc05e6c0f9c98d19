"""entra-sts: a client assertion signed with the identity's (or entra.cert's) RSA key → Entra ID token → STS
exchange (jwt) → [IAM generateAccessToken].
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from wlidd.config import EntraStsTokenConfig
from wlidd.errors import SvidError, UpstreamError
from wlidd.svid.load.files import read_regular_file
from wlidd.svid.parse import MAX_FILE_BYTES, parse_chain, parse_private_key
from wlidd.tokens.flows.steps import FlowClients, require_identity
from wlidd.tokens.flows.sts import StsSteps
from wlidd.tokens.model import Token
from wlidd.tokens.providers.entra import fetch_entra_token
from wlidd.tokens.providers.sts import JWT_TOKEN_TYPE, exchange


@dataclass(frozen=True)
class EntraStsSteps(StsSteps[EntraStsTokenConfig]):
    """entra-sts: a client assertion signed with the identity's key (or entra.cert's) → Entra ID token → STS
    exchange (jwt) → [IAM generateAccessToken], all over the plain client."""

    def _signer(self, flow: FlowClients, now: dt.datetime) -> tuple[object, x509.Certificate]:
        entra = self.config.entra
        if entra.cert is not None and entra.key is not None:
            try:  # regular files only: a FIFO would block the event loop (read_regular_file)
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
        state = require_identity(flow.current_identity, self.config.identity, now)
        return state.identity.svid.private_key, state.identity.svid.leaf

    async def token(self, flow: FlowClients, now: dt.datetime) -> Token:
        entra, sts = self.config.entra, self.config.sts
        key, cert = self._signer(flow, now)
        async with flow.using(flow.plain) as client:
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
