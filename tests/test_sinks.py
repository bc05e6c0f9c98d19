"""Credential files for consumers that read from disk: atomic, modes, google-auth's reader, rotation hooks."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FileSet, in_background, wait_until
from tests.test_tokens import metadata_token_config
from wlidd.config import Config, CredentialSinkConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, cert_pem
from wlidd.emulator.upstreams import Upstreams


def daemon(tmp_path: Path, files: FileSet, sinks: list[dict[str, Any]], **identity: Any) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config(sinks=sinks, **identity)},
                "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
            }
        )
    )


async def test_files_layout_is_read_by_google_auths_certificate_config_reader_and_follows_rotation(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    from google.auth.transport import _mtls_helper

    first = ca.issue_svid()
    files.put(first, ca.bundle_pem)
    out = tmp_path / "out"
    d = daemon(tmp_path, files, [{"dir": str(out)}])
    async with in_background(d.run, d.stop):
        await wait_until(lambda: (out / "certificate_config.json").exists())
        cert, key = _mtls_helper._get_workload_cert_and_key(str(out / "certificate_config.json"))
        assert cert == first.chain_pem and key == first.key_pem
        assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(out / "cert.pem").st_mode) == 0o644
        assert (out / "bundle.pem").read_bytes() == ca.bundle_pem
        second = ca.issue_svid()
        files.put(second)
        await wait_until(lambda: (out / "cert.pem").read_bytes() == second.chain_pem)
        cert, key = _mtls_helper._get_workload_cert_and_key(str(out / "certificate_config.json"))
        assert cert == second.chain_pem and key == second.key_pem
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


async def test_spiffe_fs_layout_has_key_and_chain_in_one_file_and_a_trust_bundle_per_trust_domain(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """The SPIFFE Filesystem Delivery draft's names: credential-bundle.private-key.pem (PRIVATE KEY, then the
    chain), <trust domain>.spiffe-trust-bundle.pem for the own and every federated trust domain."""
    svid = ca.issue_svid()
    files.put(svid, ca.bundle_pem)
    other = tmp_path / "other.pem"
    other.write_bytes(foreign_ca.bundle_pem)
    out = tmp_path / "spiffe"
    d = daemon(tmp_path, files, [{"dir": str(out), "layout": "spiffe-fs"}], bundles={"other.org": other})
    async with in_background(d.run, d.stop):
        await wait_until(lambda: (out / "other.org.spiffe-trust-bundle.pem").exists())
    combined = (out / "credential-bundle.private-key.pem").read_bytes()
    assert combined.startswith(b"-----BEGIN PRIVATE KEY-----") and combined.endswith(svid.chain_pem)
    assert stat.S_IMODE(os.stat(out / "credential-bundle.private-key.pem").st_mode) == 0o600
    assert (out / "example.org.spiffe-trust-bundle.pem").read_bytes() == cert_pem(ca.root)
    assert (out / "other.org.spiffe-trust-bundle.pem").read_bytes() == cert_pem(foreign_ca.root)
    stable = sorted(p.name for p in out.iterdir() if not p.name.startswith(".."))
    assert stable == [
        "credential-bundle.private-key.pem",
        "example.org.spiffe-trust-bundle.pem",
        "other.org.spiffe-trust-bundle.pem",
    ]


def test_the_removed_spiffe_layout_is_refused_with_what_to_use_instead() -> None:
    """Its svid.pem held key and chain, a name spiffe-helper uses for the chain alone: an old config gets a
    config error naming both replacements, never files with the same names and another meaning."""
    with pytest.raises(ValueError) as refused:
        CredentialSinkConfig.model_validate({"dir": "/x", "layout": "spiffe"})
    message = str(refused.value)
    assert 'layout "spiffe" was removed' in message
    assert 'layout = "spiffe-fs"' in message and 'layout = "spiffe-helper"' in message
    with pytest.raises(ValueError, match="include_federated_domains is only for layout"):
        CredentialSinkConfig.model_validate({"dir": "/x", "layout": "files", "include_federated_domains": True})


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
            await wait_until(lambda: marker.exists() and got_signal.exists())
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


# ---- a reload that changes sinks rewrites them at once ------------------------------------------------

READER = 65534  # the reader a reload removes


def acl_users(path: Path) -> list[int]:
    """Named users in the file's POSIX ACL (none without one)."""
    from wlidd import posix_acl

    try:
        entries = posix_acl.decode(os.getxattr(path, posix_acl.XATTR))
    except OSError:
        return []
    return [e.id for e in entries if e.tag == posix_acl.USER]


async def test_a_reader_removed_by_a_reload_loses_the_key_at_once_not_at_the_next_rotation(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    from wlidd.config import load_config

    files.put(ca.issue_svid(), ca.bundle_pem)
    out, path = tmp_path / "out", tmp_path / "wlidd.toml"

    def write(readers: str) -> None:
        path.write_text(
            f'[identities.default]\nsource = "files"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
            f'bundle = "{files.bundle}"\n[[identities.default.sinks]]\ndir = "{out}"\n{readers}\n'
            f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n'
        )

    write(f"readers = {{ users = [{READER}] }}")
    d = Daemon(load_config(path, {}), config_path=path, environ={})
    async with in_background(d.run, d.stop):
        await wait_until(lambda: (out / "key.pem").exists() and acl_users(out / "key.pem") == [READER])
        version = d.watchers["default"].current.version  # type: ignore[union-attr]
        write("")
        await d.reload()
        await wait_until(lambda: acl_users(out / "key.pem") == [], timeout=5)
        assert d.watchers["default"].current.version == version  # type: ignore[union-attr]  # no rotation


async def test_a_token_sink_changed_by_a_reload_is_rewritten_from_the_current_token_at_once(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    from wlidd.config import load_config

    files.put(ca.issue_svid(), ca.bundle_pem)
    token_file, path = tmp_path / "vm.token", tmp_path / "wlidd.toml"

    def write(readers: str) -> None:
        lines = [f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n[tokens.vm]']
        lines += [f"{k} = {json.dumps(v)}" for k, v in metadata_token_config(upstreams).items() if k != "metadata"]
        lines += [f'metadata.url = "{upstreams.metadata_url}"', f'[[tokens.vm.sinks]]\npath = "{token_file}"', readers]
        path.write_text("\n".join(lines) + "\n")

    write(f"readers = {{ users = [{READER}] }}")
    d = Daemon(load_config(path, {}), config_path=path, environ={})
    async with in_background(d.run, d.stop):
        await wait_until(lambda: token_file.exists() and acl_users(token_file) == [READER])
        calls = d.tokens["vm"].upstream_calls
        write("")
        await d.reload()
        await wait_until(lambda: acl_users(token_file) == [], timeout=5)
        assert d.tokens["vm"].upstream_calls == calls  # the current token, not a new one
