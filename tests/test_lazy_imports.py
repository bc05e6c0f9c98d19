"""A daemon imports what its configuration uses: the token machinery (wlidd.tokens: httpx, PyJWT, the
flows) only with a token, the Workload API (grpclib, h2, protobuf) only with its listener; and what only
some requests or hosts need on its first use: prometheus_client (with its exposition's HTTP server, urllib
and wsgiref) at the first /metrics scrape, h11 at the first request the hot path's parser leaves to it,
watchfiles only where inotify is unavailable.

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


# Imported on first use, never by a start (bench/PROFILES.md, "Resident memory": ~3.5 MB of the smallest node).
ON_FIRST_USE = ("prometheus_client", "http.server", "urllib.request", "wsgiref", "h11", "watchfiles")
SCRAPE = ("prometheus_client", "http.server", "urllib.request", "wsgiref")

SERVE_PROBE = """
import errno, json, socket, sys, time
import anyio

config, watched, steps = (json.loads(arg) for arg in sys.argv[1:4])
if sys.argv[4] == "no-inotify":  # as on a kernel without inotify, or with its limits reached
    import inotify_simple

    def refused(*args, **kwargs):
        raise OSError(errno.ENOSYS, "no inotify here")

    inotify_simple.INotify = refused

from wlidd.config import Config
from wlidd.daemon import Daemon

daemon = Daemon(Config.model_validate(config), environ={})
seen = [{"statuses": [], "imported": [name for name in watched if name in sys.modules]}]

def ask(raw):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(config["listeners"]["unix"]["path"])
        s.sendall(raw.encode())
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer.split(b"\\r\\n", 1)[0].decode()

async def serve():
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        with anyio.fail_after(20):  # the identity loaded and watched (the watch's fallback started, if any)
            while daemon.watchers["default"].current is None or (
                sys.argv[4] == "no-inotify" and "watchfiles" not in sys.modules
            ):
                await anyio.sleep(0.01)
        for step in steps:
            statuses = [await anyio.to_thread.run_sync(ask, raw) for raw in step]
            seen.append({"statuses": statuses, "imported": [name for name in watched if name in sys.modules]})
        daemon.stop()

anyio.run(serve)
print(json.dumps(seen))
"""


def served(config: dict[str, Any], steps: list[list[str]], inotify: bool = True) -> list[dict[str, list[str]]]:
    """Which ON_FIRST_USE modules a fresh interpreter held after building a Daemon for `config`, then after
    each step of requests to its Unix socket (once its identity is loaded and watched), with the status
    line of each answer: [{"statuses": [...], "imported": [...]}, ...], the build's first. `inotify` False:
    the daemon runs as on a host without inotify."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE_PROBE,
            json.dumps(config),
            json.dumps(ON_FIRST_USE),
            json.dumps(steps),
            "inotify" if inotify else "no-inotify",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: list[dict[str, list[str]]] = json.loads(done.stdout.splitlines()[-1])
    return result


def get(path: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: wlidd\r\n\r\n"


def test_metrics_h11_and_watchfiles_are_imported_on_first_use_not_to_serve_identity_and_health(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """An identity with the Unix socket, started and serving its identity and health: none of
    prometheus_client (nor its exposition's http.server, urllib.request, wsgiref), h11 or watchfiles is
    imported. The first /metrics scrape imports prometheus_client and its exposition; the first request the
    hot path's parser leaves to h11 (a POST with a body) imports h11; watchfiles never (inotify works)."""
    steps = [
        [get("/v1/identity/default"), get("/v1/health"), get("/v1/identity/default")],
        [get("/metrics")],
        ["POST /v1/health HTTP/1.1\r\nHost: wlidd\r\nContent-Length: 2\r\n\r\n{}"],
    ]
    built, simple, scraped, posted = served(identity_config(tmp_path, files, ca), steps)
    assert built["imported"] == [] and simple["imported"] == []
    assert simple["statuses"] == ["HTTP/1.1 200 OK"] * 3
    assert scraped == {"statuses": ["HTTP/1.1 200 OK"], "imported": list(SCRAPE)}
    assert posted == {"statuses": ["HTTP/1.1 405 Method Not Allowed"], "imported": [*SCRAPE, "h11"]}


def test_watchfiles_is_imported_where_inotify_is_unavailable_and_only_then(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """On a host without inotify the identity's directories are watched with watchfiles: imported by the
    watch that falls back to it, not by building the daemon (nor anything else of ON_FIRST_USE)."""
    built, watched = served(identity_config(tmp_path, files, ca), [[get("/v1/health")]], inotify=False)
    assert built["imported"] == []
    assert watched == {"statuses": ["HTTP/1.1 200 OK"], "imported": ["watchfiles"]}
