"""`wlidd run --oneshot`: every identity loaded, every token fetched, every sink written and its hooks run,
once, then exit 0, or 1 naming each failure after doing all the rest; over real files and the emulated
upstreams, with no listener bound and no sd_notify."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
import tomli_w

from tests.conftest import FileSet
from tests.test_tokens import metadata_token_config, x509_token_config
from wlidd.config import Config
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.oneshot import OneshotResult, run_oneshot

HANG_GUARD = 60  # seconds: a run that is still going by then hangs (the runs here take well under a second)


def identity(files: FileSet, **overrides: Any) -> dict[str, Any]:
    """A files identity that gives up on a set caught mid-write after 2 reads 10 ms apart."""
    values = {"source": "files", "cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}
    return values | {"mismatch_retries": 2, "mismatch_retry_delay": 0.01} | overrides


def document(tmp_path: Path, identities: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    return {
        "daemon": {"log_format": "json"},
        "identities": identities,
        "tokens": tokens,
        "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
    }


async def run_cli(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> tuple[int, str]:
    """`wlidd run --oneshot -c <config>` as a real process (the emulator keeps serving meanwhile): its exit
    code and its stderr (the log lines)."""
    path = tmp_path / "wlidd.toml"
    path.write_text(tomli_w.dumps(config))
    with anyio.fail_after(HANG_GUARD):
        result = await anyio.run_process(
            [sys.executable, "-m", "wlidd", "run", "--oneshot", "-c", str(path)],
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("WLIDD_")} | (env or {}),
        )
    return result.returncode, result.stderr.decode()


async def oneshot(tmp_path: Path, config: dict[str, Any]) -> OneshotResult:
    with anyio.fail_after(HANG_GUARD):
        return await run_oneshot(Config.model_validate(config), environ={})


def events(stderr: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return {line["event"]: line for line in lines}


async def test_oneshot_writes_every_sink_runs_every_hook_and_exits_0_without_listening_or_notifying(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """An identity's credential sink and two tokens' sinks (one token over the identity's mTLS) are written,
    each hook runs, exit 0; no socket is bound and nothing is sent to $NOTIFY_SOCKET."""
    svid = ca.issue_svid()
    files.put(svid, ca.bundle_pem)
    out = tmp_path / "out"
    hooks = {name: tmp_path / f"{name}.ran" for name in ("creds", "mds", "x509")}
    identities = {
        "default": identity(
            files,
            sinks=[
                {
                    "dir": str(out / "creds"),
                    "layout": "spiffe-helper",
                    "on_change": ["/usr/bin/touch", str(hooks["creds"])],
                }
            ],
        )
    }
    tokens = {
        name: make(
            upstreams, sinks=[{"path": str(out / f"{name}.token"), "on_change": ["/usr/bin/touch", str(hooks[name])]}]
        )
        for name, make in (("mds", metadata_token_config), ("x509", x509_token_config))
    }
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    code, stderr = await run_cli(
        tmp_path, document(tmp_path, identities, tokens), {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    )
    assert code == 0, stderr
    assert (out / "creds" / "svid.pem").read_bytes() == svid.chain_pem
    assert (out / "creds" / "svid_key.pem").read_bytes() == svid.key_pem
    for name in ("mds", "x509"):
        assert (out / f"{name}.token").read_text() in upstreams.issued
    assert all(hook.exists() for hook in hooks.values())
    assert upstreams.calls["metadata"] == 1 and upstreams.calls["sts_mtls"] == 1  # each token fetched once
    assert not (tmp_path / "wlidd.sock").exists()
    with pytest.raises(BlockingIOError):
        notify.recv(4096)
    notify.close()
    logged = events(stderr)  # the daemon's log lines, in its format
    assert "credentials loaded" in logged and "token refreshed" in logged
    assert not [event for event in logged if "policy" in event]  # it serves nobody: no caller rules resolved
    assert logged["one-shot run done"]["identities"] == ["default"]
    assert logged["one-shot run done"]["sources"] == ["mds", "x509"]


async def test_a_missing_identity_file_exits_1_naming_it_while_the_other_identitys_sink_is_written(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """The identity whose key file is missing is named with the reason; the other one's sink is written."""
    good, broken = FileSet(tmp_path / "good"), FileSet(tmp_path / "broken")
    svid = ca.issue_svid()
    good.put(svid, ca.bundle_pem)
    broken.write("chain.pem", ca.issue_svid().chain_pem)
    broken.write("bundle.pem", ca.bundle_pem)  # no key.pem
    identities = {
        "broken": identity(broken, sinks=[{"dir": str(tmp_path / "out" / "broken")}]),
        "good": identity(good, sinks=[{"dir": str(tmp_path / "out" / "good")}]),
    }
    code, stderr = await run_cli(tmp_path, document(tmp_path, identities, {}))
    assert code == 1
    failed = events(stderr)["one-shot run failed"]
    assert len(failed["failed"]) == 1 and failed["failed"][0].startswith("identity broken: file_missing: ")
    assert str(broken.key) in failed["failed"][0]
    assert failed["identities"] == ["good"]
    assert (tmp_path / "out" / "good" / "cert.pem").read_bytes() == svid.chain_pem
    assert not (tmp_path / "out" / "broken").exists()


async def test_an_upstream_failure_fails_naming_the_token_and_the_other_token_is_still_written(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """STS refusing the x509 exchange fails that token (named, with the upstream's reason); the metadata
    token is fetched and its sink written all the same; the identity loaded."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    upstreams.inject("sts_mtls", Fault(status=403, body={"error": "access_denied", "error_description": "no"}))
    tokens = {
        "mds": metadata_token_config(upstreams, sinks=[{"path": str(tmp_path / "mds.token")}]),
        "x509": x509_token_config(upstreams, sinks=[{"path": str(tmp_path / "x509.token")}]),
    }
    result = await oneshot(tmp_path, document(tmp_path, {"default": identity(files)}, tokens))
    assert [str(f) for f in result.failures] == [
        f"token x509: sts_access_denied: {result.failures[0].reason.split(': ', 1)[1]}"
    ]
    assert result.identities == ("default",) and result.tokens == ("mds",)
    assert (tmp_path / "mds.token").read_text() in upstreams.issued
    assert not (tmp_path / "x509.token").exists()


async def test_the_oneshot_tries_once_and_never_waits_out_retry_after_a_hang_or_a_rotation_in_progress(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """A 503 with Retry-After: 3600, an upstream that never answers (the token's 1 s timeout), and a key
    that does not match its leaf (a set caught mid-write: retried only within its mismatch window) each end
    as a named failure; every upstream was asked once."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    mismatched = FileSet(tmp_path / "mid-write")
    mismatched.write("chain.pem", ca.issue_svid().chain_pem)
    mismatched.write("key.pem", ca.issue_svid().key_pem)
    mismatched.write("bundle.pem", ca.bundle_pem)
    upstreams.inject("metadata", Fault(status=503, retry_after="3600"))
    upstreams.inject("sts_mtls", Fault(hang=True))
    tokens = {"mds": metadata_token_config(upstreams), "x509": x509_token_config(upstreams, timeout=1.0)}
    identities = {
        "default": identity(files),
        "rotating": identity(mismatched, mismatch_retries=3, mismatch_retry_delay=0.05),
    }
    result = await oneshot(tmp_path, document(tmp_path, identities, tokens))
    reasons = {f.what: f.reason for f in result.failures}
    assert set(reasons) == {"identity rotating", "token mds", "token x509"}
    assert reasons["identity rotating"].startswith("key_mismatch: ")
    assert reasons["token mds"].startswith("metadata_")
    assert reasons["token x509"].startswith("sts_timeout: ")
    assert upstreams.calls["metadata"] == 1 and upstreams.calls["sts_mtls"] == 1


async def test_sinks_that_cannot_be_written_are_named_and_the_others_are_written(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """A credential sink and a token sink under a regular file fail, each named with its path, its owner and
    the error; the identity and the token themselves succeeded and their other sinks are written. The
    log processor that noted the failures is gone afterwards."""
    svid = ca.issue_svid()
    files.put(svid, ca.bundle_pem)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    identities = {"default": identity(files, sinks=[{"dir": str(blocker / "creds")}, {"dir": str(tmp_path / "ok")}])}
    sinks = [{"path": str(blocker / "mds.token")}, {"path": str(tmp_path / "mds.token")}]
    processors = list(structlog.get_config()["processors"])
    result = await oneshot(
        tmp_path, document(tmp_path, identities, {"mds": metadata_token_config(upstreams, sinks=sinks)})
    )
    assert structlog.get_config()["processors"] == processors
    reasons = {f.what: f.reason for f in result.failures}
    assert set(reasons) == {f"sink {blocker / 'creds'} (identity default)", f"sink {blocker / 'mds.token'} (token mds)"}
    assert all(reason == f"not a directory: {blocker}" for reason in reasons.values())
    assert result.identities == ("default",) and result.tokens == ("mds",)
    assert (tmp_path / "ok" / "cert.pem").read_bytes() == svid.chain_pem
    assert (tmp_path / "mds.token").read_text() in upstreams.issued


async def test_a_failing_hook_is_logged_as_by_the_daemon_and_does_not_fail_the_run(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """The files are in place; an on_change that exits non-zero (the program it reloads is not running yet,
    at ExecStartPre= time) is the daemon's "on_change command failed" line, and the run is a success."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    identities = {"default": identity(files, sinks=[{"dir": str(tmp_path / "out"), "on_change": ["/bin/false"]}])}
    result = await oneshot(tmp_path, document(tmp_path, identities, {}))
    assert result.ok and result.identities == ("default",)
    assert "on_change command failed" in capsys.readouterr().out
    assert (tmp_path / "out" / "cert.pem").exists()
