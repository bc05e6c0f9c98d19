"""The GCE metadata server as an upstream (SPECS.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from wlidd.errors import UpstreamError
from wlidd.tokens.providers.http import error_from_response, request_json, require_seconds, require_str, send


async def fetch_metadata_token(
    client: httpx.AsyncClient, base: str, *, account: str = "default", scopes: Sequence[str] = ()
) -> tuple[str, float]:
    """The service account's token; (access_token, expires_in)."""
    url = f"{base.rstrip('/')}/computeMetadata/v1/instance/service-accounts/{account}/token"
    params = {"scopes": ",".join(scopes)} if scopes else None
    document, response = await request_json(
        client, "metadata", "GET", url, params=params, headers={"Metadata-Flavor": "Google"}
    )
    if response.headers.get("metadata-flavor") != "Google":
        raise UpstreamError(
            "metadata",
            f"{url} is not a metadata server (no Metadata-Flavor: Google)",
            code="not_metadata",
            retryable=False,
        )
    return require_str(document, "access_token", "metadata"), require_seconds(document, "expires_in", "metadata")


async def fetch_metadata_identity(
    client: httpx.AsyncClient, base: str, *, account: str = "default", audience: str
) -> str:
    """An ID token from the metadata server's identity endpoint (format=full)."""
    url = f"{base.rstrip('/')}/computeMetadata/v1/instance/service-accounts/{account}/identity"
    response = await send(
        client,
        "metadata",
        "GET",
        url,
        params={"audience": audience, "format": "full"},
        headers={"Metadata-Flavor": "Google"},
    )
    if response.status_code != 200:
        raise error_from_response("metadata", response)
    token = response.text.strip()
    if token.count(".") != 2:
        raise UpstreamError("metadata", "metadata identity answer is not a JWT", code="bad_response", status=200)
    return token
