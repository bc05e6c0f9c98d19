"""What the real-client matrix (tests/test_clients_*.py) shares: a daemon with the metadata listener
in front of the emulated metadata upstream, the environment an unmodified Google library is given,
running a client program, and the toolchain rule.

Toolchains (node + npm, go + Debian's Go sources): missing on a workstation, the tests skip and say
why (`-ra` lists the reason); in CI (`CLIENT_MATRIX_REQUIRED=1`, set by .ci/run, or `CI=1`/`CI=true`)
a missing toolchain fails them instead, so the matrix cannot silently stop running there.

Client programs print one JSON line of facts and never a token: an access token as its SHA-256, an
ID token as its decoded claims (tests/conftest.py fails any test whose output holds a secret).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest

from tests.conftest import FileSet, in_background
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

HERE = Path(__file__).parent
EMAIL = "app@demo-project.iam.gserviceaccount.com"
PROJECT = "demo-project"
NUMERIC_PROJECT = "123456789"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
# What google-cloud-storage asks for (google.cloud.storage.Client.SCOPE, the Go and Node storage clients
# likewise): none of them is literally among the token's scopes, all are covered by cloud-platform.
STORAGE_SCOPES = (
    "https://www.googleapis.com/auth/devstorage.full_control",
    "https://www.googleapis.com/auth/devstorage.read_only",
    "https://www.googleapis.com/auth/devstorage.read_write",
)
AUDIENCE = "https://service.example.com"

REQUIRED = os.environ.get("CLIENT_MATRIX_REQUIRED") == "1" or os.environ.get("CI", "").lower() in ("1", "true")


def unavailable(reason: str) -> NoReturn:
    """Skip (workstation) or fail (CI) because a client's toolchain is missing: `reason` says what."""
    if REQUIRED:
        pytest.fail(f"{reason} (required here: CLIENT_MATRIX_REQUIRED=1 or CI is set)", pytrace=False)
    pytest.skip(reason)


@asynccontextmanager
async def metadata_daemon(directory: Path, ca: CertificateAuthority) -> AsyncIterator[tuple[Daemon, Upstreams]]:
    """A daemon whose metadata listener (127.0.0.1, ephemeral port) serves token "gcp", a `gce-metadata`
    token with scope cloud-platform fetched from the emulated metadata upstream, which also mints its
    ID tokens; the listener answers as EMAIL in PROJECT. Yields (daemon, upstreams), both running."""
    upstreams = Upstreams(directory / "emulator", seed=15, metadata_email=EMAIL)
    files = FileSet(directory / "creds")
    files.put(ca.issue_svid(), ca.bundle_pem)
    async with in_background(upstreams.run, upstreams.stop):
        config = Config.model_validate(
            {
                "identities": {"default": files.config()},
                "tokens": {
                    "gcp": {
                        "flow": "gce-metadata",
                        "start_delay": 0,
                        "min_interval": 0,
                        "backoff_min": 0.05,
                        "backoff_max": 0.2,
                        "metadata": {"url": upstreams.metadata_url, "scopes": [CLOUD_PLATFORM]},
                    }
                },
                "listeners": {
                    "unix": {"path": str(directory / "wlidd.sock")},
                    "metadata": {
                        "address": "127.0.0.1:0",
                        "token": "gcp",
                        "email": EMAIL,
                        "project_id": PROJECT,
                        "numeric_project_id": NUMERIC_PROJECT,
                    },
                },
            }
        )
        daemon = Daemon(config)
        async with in_background(daemon.run, daemon.stop):
            await daemon.tokens["gcp"].get()  # the first token is there before any client asks
            yield daemon, upstreams


def client_env(daemon: Daemon, home: Path, **extra: str) -> dict[str, str]:
    """The whole environment of a client process: PATH, an empty HOME (no gcloud application default
    credentials to find first) and the documented variables that point Google libraries at wlidd.
    Nothing else: no METADATA_SERVER_DETECTION, no proxy, no GOOGLE_* variable."""
    home.mkdir(parents=True, exist_ok=True)
    host = f"127.0.0.1:{daemon.metadata_port}"
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GCE_METADATA_HOST": host,  # every data request
        "GCE_METADATA_IP": host,  # the detection ping (google-auth, gcp-metadata)
        **extra,
    }


async def run_client(argv: Sequence[str], env: dict[str, str], *, timeout: float = 60) -> dict[str, Any]:
    """Run a client program; its JSON line of facts, or {"error": …} when it failed or printed none
    (the error is the program's own message, or the tail of its stderr)."""
    with anyio.fail_after(timeout):
        result = await anyio.run_process(list(argv), env=env, check=False)
    lines = result.stdout.decode(errors="replace").strip().splitlines()
    try:
        facts = json.loads(lines[-1]) if lines else None
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        stderr = result.stderr.decode(errors="replace")[-1500:]
        return {"error": f"exit status {result.returncode}, no JSON answer; stderr: {stderr}"}
    if result.returncode != 0 and "error" not in facts:
        facts["error"] = f"exit status {result.returncode}"
    return facts


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def current_token_sha256(daemon: Daemon) -> str:
    """The SHA-256 of the token wlidd serves now for "gcp"."""
    token = daemon.tokens["gcp"].current
    assert token is not None, "wlidd holds no token"
    return sha256(token.value)


def issued_sha256(upstreams: Upstreams) -> set[str]:
    """The SHA-256 of every access token the emulated upstreams issued (a scoped request may be
    served a token minted for exactly its scopes rather than the source's token)."""
    return {sha256(token) for token in upstreams.issued}
