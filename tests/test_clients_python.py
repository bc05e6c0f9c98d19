"""The real-client matrix, Python: unmodified google-auth and google-cloud-storage against wlidd's
metadata API, pointed at it only by GCE_METADATA_HOST / GCE_METADATA_IP (README "Unmodified Google
libraries (the metadata API)"). Each client runs in its own interpreter: google-auth reads those
variables at import. One daemon serves the whole module."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.clients.harness import (
    AUDIENCE,
    EMAIL,
    PROJECT,
    STORAGE_SCOPES,
    client_env,
    current_token_sha256,
    issued_sha256,
    metadata_daemon,
    run_client,
)
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Each program prints one JSON line of facts, never a token (its SHA-256 or an ID token's claims).
PRELUDE = """
import hashlib, json, sys
def sha256(text): return hashlib.sha256(text.encode()).hexdigest()
def claims(jwt):
    import base64
    payload = jwt.split(".")[1]
    document = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return {k: document.get(k) for k in ("aud", "exp", "iss", "email")}
def answer(facts): print(json.dumps(facts))
def failed(kind, exc, tb): answer({"error": f"{kind.__name__}: {exc}"[:1500]})  # the exit status stays 1
sys.excepthook = failed
"""

DEFAULT_CREDENTIALS = (
    PRELUDE
    + """
import datetime, google.auth
from google.auth.transport.requests import Request
credentials, project = google.auth.default()
credentials.refresh(Request())
answer({"type": type(credentials).__module__ + "." + type(credentials).__name__, "project": project,
        "email": credentials.service_account_email, "token_sha256": sha256(credentials.token),
        "expires_in_s": (credentials.expiry - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).total_seconds()})
"""
)

FETCH_ID_TOKEN = (
    PRELUDE
    + """
import google.oauth2.id_token
from google.auth.transport.requests import Request
answer({"claims": claims(google.oauth2.id_token.fetch_id_token(Request(), sys.argv[1]))})
"""
)

ID_TOKEN_CREDENTIALS = (
    PRELUDE
    + """
from google.auth import compute_engine
from google.auth.transport.requests import Request
credentials = compute_engine.IDTokenCredentials(Request(), sys.argv[1], use_metadata_identity_endpoint=True)
credentials.refresh(Request())
answer({"claims": claims(credentials.token), "email": credentials.service_account_email})
"""
)

# google-cloud-storage as an application uses it: storage.Client() finds project and credentials by
# itself, asks wlidd for a token with the scopes it needs, and sends it to the JSON API, here a fake
# endpoint in this process (client_options api_endpoint) that records the bearer token's SHA-256.
STORAGE = (
    PRELUDE
    + """
import http.server, threading
from google.cloud import storage
seen = []
class FakeGcs(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        authorization = self.headers.get("Authorization", "")
        seen.append(sha256(authorization.removeprefix("Bearer ")) if authorization.startswith("Bearer ") else None)
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        body = json.dumps({"kind": "storage#bucket", "id": name, "name": name, "location": "EU"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGcs)
threading.Thread(target=server.serve_forever, daemon=True).start()
client = storage.Client(client_options={"api_endpoint": f"http://127.0.0.1:{server.server_port}"})
bucket = client.get_bucket("demo-bucket")
answer({"project": client.project, "bucket": bucket.name, "scopes": sorted(client._credentials.scopes or []),
        "authorization_sha256": seen})
"""
)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> AsyncIterator[tuple[Daemon, Upstreams]]:
    async with metadata_daemon(tmp_path_factory.mktemp("clients-python"), ca) as pair:
        yield pair


async def run_python(served: tuple[Daemon, Upstreams], tmp_path: Path, program: str, *args: str) -> dict[str, object]:
    # GCE_METADATA_MTLS_MODE=none: google-auth >= 2.44 would otherwise try https to a custom host (README)
    env = client_env(served[0], tmp_path / "home", GCE_METADATA_MTLS_MODE="none")
    return await run_client([sys.executable, "-c", program, *args], env)


async def test_google_auth_default_finds_the_project_and_refreshes_wlidds_token(
    served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_python(served, tmp_path, DEFAULT_CREDENTIALS)
    assert "error" not in facts, facts["error"]
    assert facts["type"] == "google.auth.compute_engine.credentials.Credentials"
    assert facts["project"] == PROJECT and facts["email"] == EMAIL
    assert facts["token_sha256"] == current_token_sha256(served[0])
    assert isinstance(facts["expires_in_s"], float) and 3000 < facts["expires_in_s"] <= 3600


async def test_fetch_id_token_gets_a_jwt_for_the_audience(served: tuple[Daemon, Upstreams], tmp_path: Path) -> None:
    facts = await run_python(served, tmp_path, FETCH_ID_TOKEN, AUDIENCE)
    assert "error" not in facts, facts["error"]
    claims = facts["claims"]
    assert isinstance(claims, dict)
    assert claims["aud"] == AUDIENCE and claims["email"] == EMAIL
    assert claims["exp"] > dt.datetime.now(dt.UTC).timestamp()


async def test_compute_engine_id_token_credentials_refresh_from_the_identity_endpoint(
    served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_python(served, tmp_path, ID_TOKEN_CREDENTIALS, AUDIENCE + "/idtc")
    assert "error" not in facts, facts["error"]
    claims = facts["claims"]
    assert isinstance(claims, dict)
    assert claims["aud"] == AUDIENCE + "/idtc" and claims["email"] == EMAIL
    assert facts["email"] == EMAIL


async def test_google_cloud_storage_authorizes_its_calls_with_a_token_for_its_devstorage_scopes(
    served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    """storage.Client() asks for devstorage.full_control, read_only and read_write, which the token's
    cloud-platform covers (issue 15 item 2: today a literal comparison refuses them with 400)."""
    daemon, upstreams = served
    facts = await run_python(served, tmp_path, STORAGE)
    assert "error" not in facts, facts["error"]
    assert facts["project"] == PROJECT and facts["bucket"] == "demo-bucket"
    assert facts["scopes"] == sorted(STORAGE_SCOPES)
    sent = facts["authorization_sha256"]
    assert isinstance(sent, list) and len(sent) == 1
    assert sent[0] in issued_sha256(upstreams) | {current_token_sha256(daemon)}
