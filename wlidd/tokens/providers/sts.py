"""Google STS token exchange (RFC 8693 shape; SPECS.md §3, §7). Never an Authorization header."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wlidd.tokens.providers.http import request_json, require_seconds, require_str

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
MTLS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:mtls"


def mtls_subject_token(chain: Sequence[x509.Certificate]) -> str:
    """JSON array of padded standard base64 DER certificates, the leaf (handshake certificate) first."""
    return json.dumps([base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in chain])


async def exchange(
    client: httpx.AsyncClient,
    url: str,
    *,
    audience: str,
    scope: Sequence[str],
    subject_token: str,
    subject_token_type: str,
) -> tuple[str, float]:
    """One token exchange; (access_token, expires_in)."""
    document, _ = await request_json(
        client,
        "sts",
        "POST",
        url,
        data={
            "grant_type": GRANT_TYPE,
            "audience": audience,
            "scope": " ".join(scope),
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
        },
    )
    return require_str(document, "access_token", "sts"), require_seconds(document, "expires_in", "sts")
