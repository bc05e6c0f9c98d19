"""Entra ID client credentials with a certificate-signed client assertion (SPECS.md §2)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wlidd.config import EntraConfig
from wlidd.errors import UpstreamError
from wlidd.tokens.providers.http import request_json, require_seconds, require_str

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprints(cert: x509.Certificate) -> dict[str, str]:
    der = cert.public_bytes(serialization.Encoding.DER)
    return {"x5t": _b64url(hashlib.sha1(der).digest()), "x5t#S256": _b64url(hashlib.sha256(der).digest())}  # noqa: S324


def build_assertion(
    *,
    key: object,
    cert: x509.Certificate,
    client_id: str,
    token_url: str,
    alg: str,
    now: dt.datetime,
    lifetime: float,
    jti: str | None = None,
) -> str:
    """The client-assertion JWT: x5t and x5t#S256 in the header; aud, iss = sub, jti, nbf = iat, exp."""
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UpstreamError(
            "entra",
            "Entra ID client assertions need an RSA key (PS256/RS256); configure entra.cert and entra.key",
            code="key_not_rsa",
            retryable=False,
        )
    issued = int(now.timestamp())
    claims = {
        "aud": token_url,
        "iss": client_id,
        "sub": client_id,
        "jti": jti or str(uuid.uuid4()),
        "nbf": issued,
        "iat": issued,
        "exp": issued + int(lifetime),
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"typ": "JWT", **thumbprints(cert)})


async def fetch_entra_token(
    client: httpx.AsyncClient, config: EntraConfig, *, key: object, cert: x509.Certificate, now: dt.datetime
) -> tuple[str, float]:
    """Client-credentials grant with the assertion; (access_token, expires_in)."""
    token_url = config.token_url()
    assertion = build_assertion(
        key=key,
        cert=cert,
        client_id=config.client_id,
        token_url=token_url,
        alg=config.alg,
        now=now,
        lifetime=config.assertion_lifetime,
    )
    document, _ = await request_json(
        client,
        "entra",
        "POST",
        token_url,
        data={
            "client_id": config.client_id,
            "scope": config.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
            "grant_type": "client_credentials",
        },
    )
    return require_str(document, "access_token", "entra"), require_seconds(document, "expires_in", "entra")
