"""Secrets stay secret: no secret in any log line (at debug, through every flow), files and sockets
get the configured modes and owners, private keys are never group- or world-readable, and building
TLS contexts leaves no key material on disk.

The secret check of every test lives in conftest (`pytest_runtest_makereport`); the first test here
proves it catches a leak.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.conftest import CLIENT_ID, FileSet, in_background
from tests.test_tokens import (
    client,
    entra_token_config,
    metadata_token_config,
    wait_for_token,
    x509_token_config,
)
from wlidd.config import Config, CredentialSinkConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.produced import find_leak, remember
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.logs import configure_logging, reset_logging


@pytest.mark.leaks_a_secret_on_purpose
def test_the_leak_check_catches_a_secret_printed_on_purpose(ca: CertificateAuthority) -> None:
    svid = ca.issue_svid()
    print(f"debug dump: {svid.key_pem!r}")  # the conftest hook must see this and turn it into a failure


def test_a_secret_is_found_inside_json_reprs_and_longer_runs() -> None:
    token = "ya29.test-" + "Zq8PxR2mW7vLkN4tY6uB0cHs3eJdGfA1"
    remember("access token", token)
    assert find_leak(json.dumps({"event": "x", "token": token})) == "access token"
    assert find_leak(repr(token.encode())) == "access token"
    assert find_leak(f"Bearer{token}trailing") == "access token"
    assert find_leak("ya29.test-Zq8PxR2m and nothing more") is None
    assert find_leak(token[: len(token) // 2]) is None  # half a token is not the token


async def test_no_flow_logs_a_token_key_or_assertion_even_at_debug(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """All three flows, a failure with an upstream error body, and the audit lines, at debug level."""
    rsa = ca.issue_svid("/ns/prod/sa/entra-client", key_kind="rsa2048")
    files.put(rsa, ca.bundle_pem)
    upstreams.register_app(CLIENT_ID, "api://wlidd-test", rsa.leaf)
    upstreams.inject("iam", Fault(count=1, status=500))  # one upstream error on the way
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    tokens = {
        "gcp": entra_token_config(upstreams),
        "x509": x509_token_config(upstreams),
        "mds": metadata_token_config(upstreams),
    }
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": tokens,
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    try:
        async with in_background(d.run, d.stop), client(d) as c:
            served = [(await wait_for_token(c, name))["access_token"] for name in tokens]
            await c.get("/v1/status")
            await c.get("/v1/credentials/default")
    finally:
        reset_logging()
    logs = stream.getvalue()
    assert len(set(served)) == 3 and upstreams.calls["entra"] >= 1 and upstreams.calls["sts_mtls"] >= 1
    events = {json.loads(line)["event"] for line in logs.splitlines()}
    assert {"token refreshed", "token refresh failed", "token handed out", "credentials handed out"} <= events
    assert find_leak(logs) is None, f"a {find_leak(logs)} reached the log"


def test_a_key_mode_that_lets_group_or_others_read_the_key_is_refused() -> None:
    for mode in ("0640", "0644", "0604", "0660"):
        with pytest.raises(ValueError, match="lets other users read the private key"):
            CredentialSinkConfig.model_validate({"dir": "/x", "key_mode": mode})
    assert CredentialSinkConfig.model_validate({"dir": "/x", "key_mode": "0400"}).key_mode == 0o400


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
async def test_credential_files_get_the_configured_modes_and_owner(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    out = tmp_path / "out"
    sink = {"dir": str(out), "owner": 65534, "group": 65534, "mode": "0644", "key_mode": "0600"}
    d = Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config(sinks=[sink])},
                "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock"), "mode": "0660"}},
            }
        )
    )
    async with in_background(d.run, d.stop):
        with anyio.fail_after(10):
            while not (out / "certificate_config.json").exists():
                await anyio.sleep(0.02)
        modes = {p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_uid, p.stat().st_gid) for p in out.iterdir()}
        socket_mode = stat.S_IMODE(os.stat(d.socket_path).st_mode)
    assert modes["key.pem"] == (0o600, 65534, 65534)
    assert modes["cert.pem"] == modes["bundle.pem"] == (0o644, 65534, 65534)
    assert socket_mode == 0o660
    # ..data, ..data_tmp and the generation directories are the sink's own; anything else hidden is a leftover
    assert not [name for name in modes if name.startswith(".") and not name.startswith("..")], "temp files left"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
async def test_token_files_get_the_configured_mode_and_owner_and_a_missing_user_is_logged_not_fatal(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    owned, orphan = tmp_path / "out" / "gcp.token", tmp_path / "out" / "nobody-here.token"
    (tmp_path / "out").mkdir()
    sinks = [
        {"path": str(owned), "mode": "0640", "owner": 65534, "group": "65534"},
        {"path": str(orphan), "owner": "no-such-user-wlidd"},
    ]
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"mds": metadata_token_config(upstreams, sinks=sinks)},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop), client(d) as c:
        await wait_for_token(c, "mds")
        with anyio.fail_after(10):
            while not owned.exists():
                await anyio.sleep(0.02)
        assert (await c.get("/v1/token/mds")).status_code == 200  # the failed sink harmed nothing
    st = owned.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 65534, 65534)
    assert not orphan.exists()


def _files_under(roots: list[Path]) -> dict[Path, float]:
    found: dict[Path, float] = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                with contextlib.suppress(OSError):
                    found[path] = path.lstat().st_mtime
    return found


async def test_building_tls_contexts_leaves_no_key_material_on_disk(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Keys reach OpenSSL through a memfd: after start, a rotation and handshakes, no file in the
    temporary or runtime directories holds the key, and no descriptor to key material stays open."""
    first, second = ca.issue_svid(), ca.issue_svid()
    files.put(first, ca.bundle_pem)
    files.key.chmod(0o600)
    roots = [Path(tempfile.gettempdir()), Path("/dev/shm"), Path("/var/tmp"), tmp_path]
    roots = [r for r in roots if r.is_dir()]
    before = _files_under(roots)
    d = Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config()},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "mtls": {"address": "127.0.0.1:0", "identity": "default", "allow": ["spiffe://example.org"]},
                    "workload_api": {"path": str(tmp_path / "workload.sock")},
                },
            }
        )
    )
    async with in_background(d.run, d.stop):
        watcher = d.watchers["default"]
        version = watcher.current.version if watcher.current else 0
        files.put(second, ca.bundle_pem)
        await watcher.wait_for_change(version)
        after = _files_under(roots)
        open_fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _is_link(fd)]
    remember("private key", first.key_pem)
    remember("private key", second.key_pem)
    written = [p for p, mtime in after.items() if before.get(p) != mtime and p not in (files.key, files.key.parent)]
    # this daemon's keys only, whole or as their base64 body: other test processes on the machine (CI runs
    # nothing else, a developer's machine may) write their own keys under the same temporary directories
    bodies = [b"".join(key.splitlines()[1:-1]) for key in (first.key_pem, second.key_pem)]
    holding_key = []
    for path in written:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20 and path != files.key:
            data = b"".join(path.read_bytes().split())
            if any(body in data for body in bodies):
                holding_key.append(path)
    assert not holding_key, f"key material written to {holding_key}"
    assert not [target for target in open_fds if "memfd:wlidd" in target], "a memfd with the key stayed open"


def _is_link(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return True


async def test_one_audit_line_per_caller_and_token_not_per_request(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """The same process asking again for the token it holds adds nothing to the trail; a new token does."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"mds": metadata_token_config(upstreams)},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    try:
        async with in_background(d.run, d.stop), client(d) as c:
            first = await wait_for_token(c, "mds")
            for _ in range(20):
                assert (await c.get("/v1/token/mds")).json()["access_token"] == first["access_token"]
            await d.tokens["mds"].refresh("test")
            second = await wait_for_token(c, "mds")
            await c.get("/v1/token/mds")
    finally:
        reset_logging()
    handed = [json.loads(line) for line in stream.getvalue().splitlines() if '"token handed out"' in line]
    assert second["access_token"] != first["access_token"]
    assert len(handed) == 2 and handed[0]["pid"] == os.getpid() and handed[0]["expire_time"] == first["expire_time"]
    assert handed[1]["expire_time"] == second["expire_time"]


async def test_one_audit_line_per_caller_and_secret_on_every_listener(
    tmp_path: Path, shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """A caller asking in a loop cannot flood the audit trail on any path that hands out a secret:
    metadata tokens and ID tokens, credentials on the Unix socket, Workload API pushes — one line per
    caller and secret (a new one is logged again)."""
    from tests.test_hostile_workload_api import workload_call

    files.put(ca.issue_svid(), ca.bundle_pem)
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    workload = shared_dir / "workload.sock"
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"mds": metadata_token_config(upstreams)},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {"address": "127.0.0.1:0", "token": "mds", "email": "sa@example.iam.gserviceaccount.com"},
                "workload_api": {"path": str(workload)},
            },
        }
    )
    d = Daemon(config)
    flavor = {"Metadata-Flavor": "Google"}
    account = "/computeMetadata/v1/instance/service-accounts/default"
    try:
        async with (
            in_background(d.run, d.stop),
            client(d) as c,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metadata_port}", headers=flavor) as m,
        ):
            await wait_for_token(c, "mds")
            for _ in range(20):
                assert (await m.get(f"{account}/token")).status_code == 200
                assert (await m.get(f"{account}/identity", params={"audience": "https://a.example"})).status_code == 200
                assert (await c.get("/v1/credentials/default")).status_code == 200
            for _ in range(5):
                assert await anyio.to_thread.run_sync(workload_call, workload) == "served"
    finally:
        reset_logging()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines() if line.startswith("{")]
    expected = {"token handed out": 2, "id token handed out": 1, "credentials handed out": 1, "svids pushed": 1}
    for event, count in expected.items():  # the token: once on the Unix socket (wait_for_token), once on metadata
        assert events.count(event) == count, (event, events.count(event))


async def test_a_new_process_per_request_cannot_flood_the_audit_trail(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Hand-outs are audited once per uid and secret; other processes of that uid getting the same secret
    go through the repeat limiter (3 lines a minute, then a count), so forking per request adds a few
    lines, not one per request."""
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    files.put(ca.issue_svid(), ca.bundle_pem)
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    config = Config.model_validate(
        {"identities": {"default": files.config()}, "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}}}
    )
    d = Daemon(config)
    url = "http://wlidd/v1/credentials/default"
    try:
        async with in_background(d.run, d.stop):
            for _ in range(30):  # a new curl process, hence a new pid, each time
                done = await anyio.run_process(
                    ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(d.socket_path), url],
                    check=False,
                    stderr=subprocess.DEVNULL,
                )
                assert done.stdout == b"200"
    finally:
        reset_logging()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if '"credentials handed out"' in line]
    assert lines[0]["uid"] == os.getuid() and "pid" in lines[0]  # the first hand-out names the caller
    # then at most the limiter's burst (3) of other processes, then one line counting the rest
    assert len(lines) <= 5 and lines[-1].get("repeated", 0) >= 30 - 4, lines[-1]
