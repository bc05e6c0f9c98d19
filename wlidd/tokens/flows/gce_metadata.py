"""gce-metadata: the metadata server's service account token and ID tokens."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from wlidd.config import GceMetadataTokenConfig
from wlidd.tokens.flows.steps import FlowClients, no_scoped_tokens_error
from wlidd.tokens.model import Token
from wlidd.tokens.providers.metadata import fetch_metadata_identity, fetch_metadata_token


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

    async def token(self, flow: FlowClients, now: dt.datetime) -> Token:
        meta = self.config.metadata_config()
        async with flow.using(flow.plain) as client:
            value, expires_in = await fetch_metadata_token(client, meta.url, account=meta.account, scopes=meta.scopes)
        return Token(value, now + dt.timedelta(seconds=expires_in), now, flow.name)

    async def id_token(self, flow: FlowClients, audience: str, now: dt.datetime) -> str:
        meta = self.config.metadata_config()
        async with flow.using(flow.plain) as client:
            return await fetch_metadata_identity(client, meta.url, account=meta.account, audience=audience)

    async def scoped_token(self, flow: FlowClients, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        raise no_scoped_tokens_error(flow.name)
