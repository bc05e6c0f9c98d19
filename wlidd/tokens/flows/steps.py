"""What a flow's steps are (`FlowSteps`: one class per `flow`) and what they use of their Flow (`FlowClients`),
with the refusals the flows share. The Flow (wlidd.tokens.flows) picks its steps by the config's type.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import httpx

from wlidd.errors import UpstreamError
from wlidd.tokens.model import CurrentIdentity, IdentitySnapshot, Token


class FlowClients(Protocol):
    """What a flow's steps use of their Flow (wlidd.tokens.flows.Flow): its HTTP clients, each kept open for
    a call with `using`, and the federated token of the last exchange (see the Flow's docstring)."""

    name: str
    current_identity: CurrentIdentity | None

    @property
    def plain(self) -> httpx.AsyncClient:
        """The client without a client certificate."""
        ...

    async def mtls(self, state: IdentitySnapshot) -> httpx.AsyncClient:
        """A client presenting `state`'s SVID."""
        ...

    def using(self, client: httpx.AsyncClient) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        """`client`, kept open for the block."""
        ...

    def federated_for(self, what: str, now: dt.datetime) -> tuple[str, httpx.AsyncClient]:
        """The federated token to mint `what` with, and the client it was obtained over."""
        ...

    async def keep_federated(self, token: str, expiry: dt.datetime, client: httpx.AsyncClient) -> None:
        """Keep the federated token of the last exchange (and the client it came over) for mints."""
        ...


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

    async def token(self, flow: FlowClients, now: dt.datetime) -> Token:
        """The source's token: the flow's whole chain."""
        ...

    async def id_token(self, flow: FlowClients, audience: str, now: dt.datetime) -> str:
        """One upstream call for an ID token (see Flow.fetch_id_token)."""
        ...

    async def scoped_token(self, flow: FlowClients, scopes: Sequence[str], now: dt.datetime) -> tuple[str, dt.datetime]:
        """One upstream call for a token with other scopes (see Flow.fetch_scoped_token)."""
        ...


def require_identity(current: CurrentIdentity | None, name: str | None, now: dt.datetime) -> IdentitySnapshot:
    """The identity state a flow signs or presents with: UpstreamError `identity_unavailable` when none is
    loaded, `identity_expired` when its SVID is outside its validity window at `now`."""
    state = current() if current is not None else None
    if state is None:
        raise UpstreamError("identity", f"identity {name!r} has no valid SVID loaded", code="unavailable")
    if not state.identity.svid.is_valid_at(now):
        raise UpstreamError("identity", f"identity {name!r} SVID is outside its validity window", code="expired")
    return state


def id_token_unsupported_error(flow: str) -> UpstreamError:
    """`flow` mints no ID tokens: it impersonates no service account (permanent)."""
    message = f"flow {flow} mints no ID tokens without a service account to impersonate (impersonate.service_account)"
    return UpstreamError("wlidd", message, code="id_token_unsupported", retryable=False)


def no_scoped_tokens_error(name: str) -> UpstreamError:
    """Token `name` mints no token with other scopes: it impersonates no service account (permanent)."""
    message = f"token {name!r} impersonates no service account, so it mints no token with other scopes"
    return UpstreamError("wlidd", message, code="other", retryable=False)
