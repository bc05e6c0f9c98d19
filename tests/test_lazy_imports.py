"""A daemon imports what its configuration uses: the token machinery (wlidd.tokens: httpx, PyJWT, the
flows) only with a token, the Workload API (grpclib, h2, protobuf) only with its listener.

Each check runs in a fresh interpreter (`python -c`), since this test process has imported everything
already: it builds a Daemon from a config, runs it until started (READY), stops it, and reports which of
the optional modules `sys.modules` held after the build and after the start.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FileSet
from wlidd.emulator.ca import CertificateAuthority

# Modules an identity with the Unix socket never uses (bench/PROFILES.md: ~0.1 s of start-up and ~5 MB).
TOKENS = ("httpx", "jwt", "wlidd.tokens.flows", "wlidd.tokens.manager")
WORKLOAD_API = ("grpclib", "h2", "google.protobuf", "wlidd.workload_api.server")
OPTIONAL = TOKENS + WORKLOAD_API

PROBE = """
import json, sys
import anyio
from wlidd.config import Config
from wlidd.daemon import Daemon

optional = json.loads(sys.argv[2])
daemon = Daemon(Config.model_validate(json.loads(sys.argv[1])), environ={})
built = [name for name in optional if name in sys.modules]

async def start_and_stop():
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        daemon.stop()

anyio.run(start_and_stop)
print(json.dumps({"built": built, "started": [name for name in optional if name in sys.modules]}))
"""


def imported(config: dict[str, Any]) -> dict[str, list[str]]:
    """Which OPTIONAL modules a fresh interpreter held after building a Daemon for `config`, and after its
    start: {"built": [...], "started": [...]}."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(config), json.dumps(OPTIONAL)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return result


def identity_config(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> dict[str, Any]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    identity = {"source": "files", "cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}
    return {
        "daemon": {"log_level": "warning"},
        "identities": {"default": identity},
        "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_identity_with_the_unix_socket_starts_without_the_token_machinery_or_the_workload_api(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """No token configured: neither httpx, PyJWT nor the token flows are imported, and no Workload API
    listener: neither grpclib, h2 nor protobuf; not by building the Daemon, not by starting it."""
    assert imported(identity_config(tmp_path, files, ca)) == {"built": [], "started": []}


def test_a_token_and_a_workload_api_listener_import_what_they_use(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """The other side of the lazy imports (and proof that the probe sees them): a token source imports the
    token machinery when the Daemon is built, a Workload API listener its gRPC stack when it starts."""
    config = identity_config(tmp_path, files, ca)
    config["tokens"] = {
        "mds": {
            "flow": "gce-metadata",
            "require_at_start": False,
            "metadata": {"url": f"http://127.0.0.1:{closed_port()}"},
        }
    }
    config["listeners"]["workload_api"] = {"path": str(tmp_path / "workload.sock")}
    assert imported(config) == {"built": list(TOKENS), "started": list(OPTIONAL)}
