"""The real-client matrix, Go: unmodified golang.org/x/oauth2/google (FindDefaultCredentials) and
cloud.google.com/go/compute/metadata against wlidd's metadata API, pointed at it only by
GCE_METADATA_HOST. Built offline, once per session, from Debian's golang-go,
golang-golang-x-oauth2-google-dev and golang-google-cloud-compute-metadata-dev (GO111MODULE=off,
GOPATH=/usr/share/gocode). Without them the tests skip, and fail in CI (tests/clients/harness.py).
One daemon serves the module."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.clients.harness import (
    AUDIENCE,
    CLOUD_PLATFORM,
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

GOPATH = Path("/usr/share/gocode")
GO_PACKAGES = {  # import path → the Debian package that ships its source under GOPATH
    "golang.org/x/oauth2/google": "golang-golang-x-oauth2-google-dev",
    "cloud.google.com/go/compute/metadata": "golang-google-cloud-compute-metadata-dev",
}


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/clients/go/client.go built offline into a session tmp dir (its own build cache, no
    cgo: nothing but the go toolchain and the Debian sources is needed)."""
    go = shutil.which("go")
    if go is None:
        unavailable("go is not installed (apt-get install golang-go)")
    missing = [deb for path, deb in GO_PACKAGES.items() if not (GOPATH / "src" / path).is_dir()]
    if missing:
        unavailable(f"the Go sources are not installed (apt-get install {' '.join(missing)})")
    out = tmp_path_factory.mktemp("go-client")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(out),
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOCACHE": str(out / "cache"),
        "GOFLAGS": "",
        "GOPROXY": "off",  # offline: only what the Debian packages installed
        "CGO_ENABLED": "0",
    }
    result = subprocess.run(
        [go, "build", "-o", str(out / "client"), str(HERE / "go" / "client.go")],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"go build of tests/clients/go/client.go failed:\n{result.stderr[-2000:]}", pytrace=False)
    return out / "client"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> AsyncIterator[tuple[Daemon, Upstreams]]:
    async with metadata_daemon(tmp_path_factory.mktemp("clients-go"), ca) as pair:
        yield pair


async def run_go(client: Path, served: tuple[Daemon, Upstreams], tmp_path: Path, *args: str) -> dict[str, object]:
    env = client_env(served[0], tmp_path / "home")
    return await run_client([str(client), *args], env)


async def test_find_default_credentials_gets_the_project_and_wlidds_token(
    go_client: Path, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_go(go_client, served, tmp_path, "adc")
    assert "error" not in facts, facts["error"]
    assert facts["project"] == PROJECT and facts["token_type"] == "Bearer"
    assert facts["token_sha256"] == current_token_sha256(served[0])
    assert isinstance(facts["expires_in_s"], int) and 3000 < facts["expires_in_s"] <= 3600


async def test_compute_metadata_reads_project_email_and_scopes(
    go_client: Path, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_go(go_client, served, tmp_path, "metadata")
    assert facts == {
        "on_gce": True,
        "project": PROJECT,
        "numeric_project": NUMERIC_PROJECT,
        "email": EMAIL,
        "scopes": [CLOUD_PLATFORM],
    }


async def test_the_identity_endpoint_answers_a_jwt_for_the_audience(
    go_client: Path, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    facts = await run_go(go_client, served, tmp_path, "id-token", AUDIENCE + "/go")
    assert "error" not in facts, facts["error"]
    claims = facts["claims"]
    assert isinstance(claims, dict)
    assert claims["aud"] == AUDIENCE + "/go" and claims["email"] == EMAIL
    assert claims["exp"] > dt.datetime.now(dt.UTC).timestamp()


async def test_find_default_credentials_with_storage_scopes_gets_a_token(
    go_client: Path, served: tuple[Daemon, Upstreams], tmp_path: Path
) -> None:
    """FindDefaultCredentials(ctx, devstorage.*) as cloud.google.com/go/storage calls it: scopes the
    token's cloud-platform covers (issue 15 item 2: today refused with 400)."""
    daemon, upstreams = served
    facts = await run_go(go_client, served, tmp_path, "adc", *STORAGE_SCOPES)
    assert "error" not in facts, facts["error"]
    assert facts["token_sha256"] in issued_sha256(upstreams) | {current_token_sha256(daemon)}
