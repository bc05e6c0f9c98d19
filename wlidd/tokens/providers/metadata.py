"""The GCE metadata server as an upstream (SPECS.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from wlidd.errors import UpstreamError
from wlidd.tokens.providers.http import request_json, require_seconds, require_str


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
            "metadata", f"{url} is not a metadata server (no Metadata-Flavor: Google)", code="not_metadata"
        )
    return require_str(document, "access_token", "metadata"), require_seconds(document, "expires_in", "metadata")
