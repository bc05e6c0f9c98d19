"""The GCE-metadata-compatible listener, judged by unmodified google-auth, plus its refusals."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest

from tests.conftest import FileSet, in_background, request_as_user
from tests.test_tokens import metadata_token_config
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

EMAIL = "app@demo-project.iam.gserviceaccount.com"


@pytest.fixture
async def daemon(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {
                "gcp": metadata_token_config(
                    upstreams,
                    metadata={
                        "url": upstreams.metadata_url,
                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                    },
                )
            },
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {
                    "address": "127.0.0.1:0",
                    "token": "gcp",
                    "email": EMAIL,
                    "project_id": "demo-project",
                    "numeric_project_id": "123456789",
                },
            },
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop):
        yield d


def url(d: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{d.metadata_port}{path}"


GOOGLE_AUTH_CLIENT = """
import json, google.auth
from google.auth.transport.requests import Request
credentials, project = google.auth.default()
credentials.refresh(Request())
print(json.dumps({"type": type(credentials).__module__ + "." + type(credentials).__name__, "project": project,
                  "token": credentials.token, "expiry": credentials.expiry.isoformat(),
                  "email": credentials.service_account_email}))
"""


async def test_unmodified_google_auth_gets_wlidds_token_and_expiry(daemon: Daemon, tmp_path: Path) -> None:
    host = f"127.0.0.1:{daemon.metadata_port}"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),  # no gcloud application default credentials to find first
        "GCE_METADATA_HOST": host,
        "GCE_METADATA_IP": host,
        "GCE_METADATA_MTLS_MODE": "none",
    }
    result = await anyio.run_process([sys.executable, "-c", GOOGLE_AUTH_CLIENT], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    seen = json.loads(result.stdout)
    token = daemon.tokens["gcp"].current
    assert token is not None
    assert seen["type"] == "google.auth.compute_engine.credentials.Credentials"
    assert seen["token"] == token.value and seen["project"] == "demo-project" and seen["email"] == EMAIL
    expiry = dt.datetime.fromisoformat(seen["expiry"]).replace(tzinfo=dt.UTC)
    assert abs((expiry - token.expire_time).total_seconds()) < 10


async def test_every_answer_has_the_flavor_and_the_content_type_google_auth_expects(daemon: Daemon) -> None:
    flavor = {"Metadata-Flavor": "Google"}
    async with httpx.AsyncClient() as c:
        ping = await c.get(url(daemon, "/"))
        info = await c.get(
            url(daemon, "/computeMetadata/v1/instance/service-accounts/default/?recursive=true"), headers=flavor
        )
        token = await c.get(
            url(
                daemon,
                "/computeMetadata/v1/instance/service-accounts/default/token?scopes=https://www.googleapis.com/auth/cloud-platform",
            ),
            headers=flavor,
        )
        email = await c.get(url(daemon, "/computeMetadata/v1/instance/service-accounts/default/email"), headers=flavor)
        project = await c.get(url(daemon, "/computeMetadata/v1/project/numeric-project-id"), headers=flavor)
        universe = await c.get(url(daemon, "/computeMetadata/v1/universe/universe-domain"), headers=flavor)
        identity = await c.get(
            url(daemon, "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x"), headers=flavor
        )
        wrong_scope = await c.get(
            url(daemon, "/computeMetadata/v1/instance/service-accounts/default/token?scopes=https://example.com/other"),
            headers=flavor,
        )
    for response in (ping, info, token, email, project, universe, identity, wrong_scope):
        assert response.headers["metadata-flavor"] == "Google"
    assert ping.status_code == 200
    assert info.headers["content-type"] == "application/json" and info.json()["email"] == EMAIL
    assert token.headers["content-type"] == "application/json" and token.json()["token_type"] == "Bearer"
    assert isinstance(token.json()["expires_in"], int)
    for plain in (email, project, universe):
        assert plain.headers["content-type"] == "application/text"
    assert email.text == EMAIL and project.text == "123456789" and universe.text == "googleapis.com"
    assert identity.status_code == 200 and identity.headers["content-type"] == "application/text"
    assert jwt.decode(identity.text, options={"verify_signature": False})["aud"] == "x"
    assert wrong_scope.status_code == 400 and "https://example.com/other is not covered" in wrong_scope.text


async def test_missing_flavor_header_and_forwarded_requests_are_refused(daemon: Daemon) -> None:
    path = "/computeMetadata/v1/instance/service-accounts/default/token"
    async with httpx.AsyncClient() as c:
        missing = await c.get(url(daemon, path))
        forwarded = await c.get(url(daemon, path), headers={"Metadata-Flavor": "Google", "X-Forwarded-For": "10.0.0.1"})
        wrong_value = await c.get(url(daemon, path), headers={"Metadata-Flavor": "google-ish"})
    assert missing.status_code == 403 and 'Missing required header "Metadata-Flavor": "Google"' in missing.text
    assert forwarded.status_code == 403 and "X-Forwarded-For" in forwarded.text
    assert wrong_value.status_code == 403
    for response in (missing, forwarded, wrong_value):
        assert "access_token" not in response.text


def _tcp_request_as(uid: int, port: int, path: str) -> tuple[int, str]:
    raw = f"GET {path} HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n".encode()
    status, body = request_as_user(uid, ("127.0.0.1", port), raw)
    return status, body.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid in a child needs root")
async def test_a_disallowed_uid_is_refused_over_loopback_tcp(daemon: Daemon) -> None:
    path = "/computeMetadata/v1/instance/service-accounts/default/token"
    status, body = await anyio.to_thread.run_sync(_tcp_request_as, 65534, daemon.metadata_port, path)
    assert status == 403 and "uid 65534 (nobody)" in body and "access_token" not in body
    status, body = await anyio.to_thread.run_sync(_tcp_request_as, 0, daemon.metadata_port, path)
    assert status == 200 and json.loads(body)["access_token"].startswith("ya29.mds-")


def test_a_metadata_listener_on_a_network_address_is_refused() -> None:
    with pytest.raises(ValueError, match="is not a loopback address"):
        Config.model_validate(
            {
                "tokens": {"t": {"flow": "gce-metadata"}},
                "listeners": {"metadata": {"address": "0.0.0.0:80", "token": "t", "email": EMAIL}},
            }
        )


def test_the_metadata_listener_needs_a_known_token() -> None:
    args: dict[str, Any] = {"listeners": {"metadata": {"token": "nope", "email": EMAIL}}}
    with pytest.raises(ValueError, match="listeners.metadata.token: no token named 'nope'"):
        Config.model_validate(args)


GOOGLE_AUTH_ID_TOKEN = """
import google.oauth2.id_token
from google.auth.transport.requests import Request
print(google.oauth2.id_token.fetch_id_token(Request(), "https://service.example.com"))
"""


async def test_unmodified_google_auth_fetches_an_id_token(daemon: Daemon, tmp_path: Path) -> None:
    host = f"127.0.0.1:{daemon.metadata_port}"
    home = tmp_path / "home-id"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "GCE_METADATA_HOST": host,
        "GCE_METADATA_IP": host,
        "GCE_METADATA_MTLS_MODE": "none",
    }
    result = await anyio.run_process([sys.executable, "-c", GOOGLE_AUTH_ID_TOKEN], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    claims = jwt.decode(result.stdout.decode().strip(), options={"verify_signature": False})
    assert claims["aud"] == "https://service.example.com" and claims["exp"] > dt.datetime.now(dt.UTC).timestamp()


async def test_identity_without_a_way_to_mint_id_tokens_is_a_clear_404() -> None:
    from wlidd.api.messages import Request
    from wlidd.api.metadata import MetadataApi
    from wlidd.api.peers import Peer
    from wlidd.config import MetadataListenerConfig, PolicyConfig, parse_token_config
    from wlidd.policy import Policy
    from wlidd.tokens.flows import Flow
    from wlidd.tokens.manager import TokenSource

    config = parse_token_config(
        {"flow": "x509-sts", "identity": "default", "sts": {"audience": "//iam.googleapis.com/x"}}
    )
    source = TokenSource("x", config, Flow("x", config))
    api = MetadataApi(
        MetadataListenerConfig(token="x", email=EMAIL),
        source,
        Policy.from_config(PolicyConfig()),
        lambda: dt.datetime.now(dt.UTC),
    )
    request = Request(
        "GET",
        "/computeMetadata/v1/instance/service-accounts/default/identity",
        {"audience": ["a"]},
        (("metadata-flavor", "Google"),),
        b"",
        Peer(),
        "metadata",
    )
    response = await api(request)
    assert response.status == 404 and b"ID tokens are not available from token 'x'" in response.body
