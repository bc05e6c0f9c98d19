"""Service account impersonation: IAM Credentials generateAccessToken (SPECS.md §4, §7)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from urllib.parse import quote

import httpx

from wlidd.tokens.providers.http import parse_rfc3339, request_json, require_str


def generate_access_token_url(base: str, service_account: str) -> str:
    return f"{base.rstrip('/')}/v1/projects/-/serviceAccounts/{quote(service_account, safe='@')}:generateAccessToken"


async def generate_access_token(
    client: httpx.AsyncClient,
    base: str,
    *,
    service_account: str,
    bearer: str,
    scope: Sequence[str],
    lifetime: float,
    delegates: Sequence[str] = (),
) -> tuple[str, dt.datetime]:
    """(accessToken, expireTime) for `service_account`, authorized by the federated `bearer` token."""
    body: dict[str, object] = {"scope": list(scope), "lifetime": f"{int(lifetime)}s"}
    if delegates:
        body["delegates"] = [f"projects/-/serviceAccounts/{d}" for d in delegates]
    document, _ = await request_json(
        client,
        "iam",
        "POST",
        generate_access_token_url(base, service_account),
        json=body,
        headers={"Authorization": f"Bearer {bearer}"},
    )
    return require_str(document, "accessToken", "iam"), parse_rfc3339(require_str(document, "expireTime", "iam"), "iam")


async def generate_id_token(
    client: httpx.AsyncClient,
    base: str,
    *,
    service_account: str,
    bearer: str,
    audience: str,
    include_email: bool = True,
) -> str:
    """An OIDC ID token (JWT) for `service_account` with `audience` (IAM Credentials generateIdToken)."""
    url = f"{base.rstrip('/')}/v1/projects/-/serviceAccounts/{quote(service_account, safe='@')}:generateIdToken"
    document, _ = await request_json(
        client,
        "iam",
        "POST",
        url,
        json={"audience": audience, "includeEmail": include_email},
        headers={"Authorization": f"Bearer {bearer}"},
    )
    return require_str(document, "token", "iam")
