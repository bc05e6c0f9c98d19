"""Credential files for consumers that read from disk: atomic, modes, google-auth's reader, rotation hooks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import FileSet, in_background
from wlidd.config import Config, CredentialSinkConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, cert_pem


def daemon(tmp_path: Path, files: FileSet, sinks: list[dict[str, Any]], **identity: Any) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config(sinks=sinks, **identity)},
                "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
            }
        )
    )


async def wait_for(predicate: Any, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def test_files_layout_is_read_by_google_auths_certificate_config_reader_and_follows_rotation(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    from google.auth.transport import _mtls_helper

    first = ca.issue_svid()
    files.put(first, ca.bundle_pem)
    out = tmp_path / "out"
    d = daemon(tmp_path, files, [{"dir": str(out)}])
    async with in_background(d.run, d.stop):
        await wait_for(lambda: (out / "certificate_config.json").exists())
        cert, key = _mtls_helper._get_workload_cert_and_key(str(out / "certificate_config.json"))
        assert cert == first.chain_pem and key == first.key_pem
        assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(out / "cert.pem").st_mode) == 0o644
        assert (out / "bundle.pem").read_bytes() == ca.bundle_pem
        second = ca.issue_svid()
        files.put(second)
        await wait_for(lambda: (out / "cert.pem").read_bytes() == second.chain_pem)
        cert, key = _mtls_helper._get_workload_cert_and_key(str(out / "certificate_config.json"))
        assert cert == second.chain_pem and key == second.key_pem
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


async def test_spiffe_layout_has_key_and_chain_in_one_file_and_a_bundle_per_trust_domain(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    svid = ca.issue_svid()
    files.put(svid, ca.bundle_pem)
    other = tmp_path / "other.pem"
    other.write_bytes(foreign_ca.bundle_pem)
    out = tmp_path / "spiffe"
    d = daemon(tmp_path, files, [{"dir": str(out), "layout": "spiffe"}], bundles={"other.org": other})
    async with in_background(d.run, d.stop):
        await wait_for(lambda: (out / "bundle.other.org.pem").exists())
    combined = (out / "svid.pem").read_bytes()
    assert combined.startswith(b"-----BEGIN PRIVATE KEY-----") and combined.endswith(svid.chain_pem)
    assert stat.S_IMODE(os.stat(out / "svid.pem").st_mode) == 0o600
    assert (out / "bundle.example.org.pem").read_bytes() == cert_pem(ca.root)
    assert (out / "bundle.other.org.pem").read_bytes() == cert_pem(foreign_ca.root)


async def test_after_a_rotation_the_command_runs_and_the_pid_file_process_is_signalled(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    marker, got_signal, pid_file = tmp_path / "ran", tmp_path / "signalled", tmp_path / "app.pid"
    app = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,sys,time\nsignal.signal(signal.SIGUSR1, lambda *a: (open(sys.argv[1], 'w').write('yes'), sys.exit(0)))\n"
            "print('ready', flush=True)\ntime.sleep(30)",
            str(got_signal),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None and app.stdout.readline() == "ready\n"  # the handler is in place
    pid_file.write_text(str(app.pid))
    sinks = [
        {
            "dir": str(tmp_path / "out"),
            "on_change": ["/usr/bin/touch", str(marker)],
            "signal": "SIGUSR1",
            "pid_file": str(pid_file),
        }
    ]
    d = daemon(tmp_path, files, sinks)
    try:
        async with in_background(d.run, d.stop):
            await wait_for(lambda: marker.exists() and got_signal.exists())
    finally:
        app.kill()
        app.communicate(timeout=10)
    assert got_signal.read_text() == "yes"


def test_a_world_readable_key_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="lets other users read the private key"):
        CredentialSinkConfig.model_validate({"dir": "/x", "key_mode": "0644"})
    with pytest.raises(ValueError, match="signal and pid_file go together"):
        CredentialSinkConfig.model_validate({"dir": "/x", "signal": "SIGHUP"})
    assert signal.SIGHUP  # the names are the signal module's
