"""x509-sts: STS exchange over mTLS with the SVID (subject token = its chain) → [IAM over the same mTLS]; the
token never outlives the certificate it was obtained with.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from wlidd.config import X509StsTokenConfig
from wlidd.tokens.flows.steps import FlowClients, require_identity
from wlidd.tokens.flows.sts import StsSteps
from wlidd.tokens.model import Token
from wlidd.tokens.providers.sts import MTLS_TOKEN_TYPE, exchange, mtls_subject_token


@dataclass(frozen=True)
class X509StsSteps(StsSteps[X509StsTokenConfig]):
    """x509-sts: STS exchange over mTLS with the identity's SVID (subject token = its chain) → [IAM over the
    same mTLS]; the token never outlives the certificate it was obtained with."""

    @property
    def bound_to_svid(self) -> bool:
        return True

    async def token(self, flow: FlowClients, now: dt.datetime) -> Token:
        sts = self.config.sts
        state = require_identity(flow.current_identity, self.config.identity, now)
        svid = state.identity.svid
        async with flow.using(await flow.mtls(state)) as client:
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
