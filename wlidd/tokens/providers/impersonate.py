"""Service account impersonation: IAM Credentials generateAccessToken (SPECS.md §4, §7)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from urllib.parse import quote

import httpx

from wlidd.tokens.providers.expiry import absolute_expiry, response_date
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
    sent_at: dt.datetime | None = None,
) -> tuple[str, dt.datetime]:
    """(accessToken, expiry on the local clock) for `service_account`, authorized by the federated `bearer`
    token. `lifetime` in seconds (sent as whole seconds). The answer's `expireTime` is on IAM's clock: the
    expiry is bounded by the lifetime asked for and corrected by the answer's Date header
    (expiry.absolute_expiry), counting from `sent_at` (the local time the request was sent; now by
    default)."""
    requested = int(lifetime)
    body: dict[str, object] = {"scope": list(scope), "lifetime": f"{requested}s"}
    if delegates:
        body["delegates"] = [f"projects/-/serviceAccounts/{d}" for d in delegates]
    sent = sent_at if sent_at is not None else dt.datetime.now(dt.UTC)
    document, response = await request_json(
        client,
        "iam",
        "POST",
        generate_access_token_url(base, service_account),
        json=body,
        headers={"Authorization": f"Bearer {bearer}"},
    )
    value = require_str(document, "accessToken", "iam")
    expire_time = parse_rfc3339(require_str(document, "expireTime", "iam"), "iam")
    upstream_now = response_date(response.headers.get("date"))
    return value, absolute_expiry("iam", expire_time, sent_at=sent, requested=requested, upstream_now=upstream_now)


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
