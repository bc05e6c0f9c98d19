"""The real-client matrix, Node: unmodified google-auth-library and gcp-metadata (versions pinned in
tests/clients/node/package.json and package-lock.json, installed by `npm ci`) against wlidd's metadata
API, pointed at it only by GCE_METADATA_HOST / GCE_METADATA_IP. Detection is never forced (no
METADATA_SERVER_DETECTION): GoogleAuth must find wlidd by its own probe, `GET /computeMetadata/v1/instance`.
Without node/npm the tests skip, and fail in CI (tests/clients/harness.py). One daemon serves the module."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.clients.harness import (
    AUDIENCE,
    EMAIL,
    HERE,
    NUMERIC_PROJECT,
    PROJECT,
    STORAGE_SCOPES,
    client_env,
    current_token_sha256,
    issued_sha256,
    metadata_daemon,
    run_client,
    unavailable,
)
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODE_DIR = HERE / "node"
MIN_NODE = 18  # the engines of the pinned google-auth-library and gcp-metadata


def _installed(package: str) -> str | None:
    try:
        return str(json.loads((NODE_DIR / "node_modules" / package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with the pinned libraries in tests/clients/node/node_modules (`npm ci`
    when what is there is not what package.json pins)."""
    executable = shutil.which("node")
    if executable is None:
        unavailable("node is not installed (apt-get install nodejs npm)")
    version = subprocess.run([executable, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < MIN_NODE:
        unavailable(f"node {version} is older than the pinned libraries need (>= {MIN_NODE})")
    pinned: dict[str, str] = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if any(_installed(name) != version for name, version in pinned.items()):
        npm = shutil.which("npm")
        if npm is None:
            unavailable("npm is not installed (apt-get install npm), so the pinned Node libraries cannot be")
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=100,
                check=False,
            )
        except subprocess.TimeoutExpired:
            unavailable("npm ci in tests/clients/node took over 100 s (no registry?)")
        if result.returncode != 0:
            unavailable(f"npm ci in tests/clients/node failed: {result.stderr.strip()[-800:]}")
    return executable


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> AsyncIterator[tuple[Daemon, Upstreams]]:
    async with metadata_daemon(tmp_path_factory.mktemp("clients-node"), ca) as pair:
        yield pair


async def run_node(node: str, served: tuple[Daemon, Upstreams], tmp_path: Path, *args: str) -> dict[str, object]:
    env = client_env(served[0], tmp_path / "home")
    return await run_client([node, str(NODE_DIR / "client.js"), *args], env)


async def test_gcp_metadata_detects_wlidd_by_its_own_probe(
    node: str, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    """gcp-metadata's isAvailable() asks `GET /computeMetadata/v1/instance` and takes 404 for "not on
    GCE" (issue 15 item 1: wlidd answers directories)."""
    facts = await run_node(node, served, tmp_path, "detect")
    assert facts == {"available": True}


async def test_google_auth_get_client_finds_wlidd_and_serves_its_token_and_project(
    node: str, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_node(node, served, tmp_path, "adc")
    assert "error" not in facts, facts["error"]
    assert facts["client"] == "Compute" and facts["project"] == PROJECT
    assert facts["token_sha256"] == current_token_sha256(served[0])
    assert isinstance(facts["expires_in_s"], int) and 3000 < facts["expires_in_s"] <= 3600


async def test_google_auth_id_token_client_fetches_a_jwt_for_the_audience(
    node: str, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_node(node, served, tmp_path, "id-token", AUDIENCE + "/node")
    assert "error" not in facts, facts["error"]
    claims = facts["claims"]
    assert isinstance(claims, dict)
    assert claims["aud"] == AUDIENCE + "/node" and claims["email"] == EMAIL
    assert claims["exp"] > dt.datetime.now(dt.UTC).timestamp()


async def test_google_auth_with_a_storage_scope_finds_wlidd_and_gets_a_token(
    node: str, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    """new GoogleAuth({scopes: devstorage.read_only}), as @google-cloud/storage builds it: detection,
    then a token for a scope cloud-platform covers (issue 15 items 1 and 2)."""
    daemon, upstreams = served
    facts = await run_node(node, served, tmp_path, "scoped", "https://www.googleapis.com/auth/devstorage.read_only")
    assert "error" not in facts, facts["error"]
    assert facts["client"] == "Compute"
    assert facts["token_sha256"] in issued_sha256(upstreams) | {current_token_sha256(daemon)}


async def test_a_compute_client_asking_for_storage_scopes_gets_a_token(
    node: str, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    """The scope rule without detection in the way: Compute asks `…/token?scopes=a,b,c` for scopes
    the token's cloud-platform covers (issue 15 item 2)."""
    daemon, upstreams = served
    facts = await run_node(node, served, tmp_path, "compute-scoped", *STORAGE_SCOPES)
    assert "error" not in facts, facts["error"]
    assert facts["token_sha256"] in issued_sha256(upstreams) | {current_token_sha256(daemon)}


async def test_gcp_metadata_reads_project_email_and_universe(
    node: str, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_node(node, served, tmp_path, "metadata")
    assert facts == {
        "project": PROJECT,
        "numeric_project": NUMERIC_PROJECT,
        "email": EMAIL,
        "universe": "googleapis.com",
    }
