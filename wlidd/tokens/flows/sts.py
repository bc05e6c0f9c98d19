"""What both STS flows (entra-sts, x509-sts) do after their exchange: impersonate a service account (when
configured: IAM generateAccessToken) and mint ID tokens and scoped tokens with the federated token.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx

from wlidd.config import StsTokenConfig
from wlidd.tokens.flows.steps import FlowClients, id_token_unsupported_error, no_scoped_tokens_error
from wlidd.tokens.providers.impersonate import generate_access_token, generate_id_token

StsVariant = TypeVar("StsVariant", bound=StsTokenConfig)


@dataclass(frozen=True)
class StsSteps(Generic[StsVariant]):
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

    async def id_token(self, flow: FlowClients, audience: str, now: dt.datetime) -> str:
        imp = self.config.impersonate
        if imp is None:
            raise id_token_unsupported_error(self.config.flow)
        bearer, client = flow.federated_for("an ID token", now)
        async with flow.using(client):
            return await generate_id_token(
                client,
                self.config.impersonate_base(),
                service_account=imp.service_account,
                bearer=bearer,
                audience=audience,
            )

    async def scoped_token(self, flow: FlowClients, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        imp = self.config.impersonate
        if imp is None:
            raise no_scoped_tokens_error(flow.name)
        bearer, client = flow.federated_for("a scoped token", now)
        async with flow.using(client):
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
        flow: FlowClients,
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
        await flow.keep_federated(federated, min(expiry, not_after) if not_after else expiry, client)
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
