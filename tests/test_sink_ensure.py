"""Every sink is brought up to date, not only written on rotation (issue 14, item 9): on SIGHUP (changed or
not), after a config change and periodically, a missing or stale sink (a wiped tmpfs, a deleted file) is
written again from the current state; a current one is left alone and its hook does not run. Token sinks
the same. And a second daemon on the same socket writes nothing before it fails to bind (item 12)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FileSet, in_background, wait_until
from tests.test_cli import WLIDD, status, wait_for_socket
from tests.test_hostile_sinks import identity_state, sink
from tests.test_tokens import metadata_token_config
from wlidd.config import Config, SinkConfig, load_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.sinks.credentials import ensure_credentials, publish_credentials
from wlidd.sinks.tokens import ensure_token
from wlidd.tokens.model import Token

APPEND = "import sys; open(sys.argv[1], 'a').write('ran\\n')"  # an on_change that counts its runs


def runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def config_file(path: Path, files: FileSet, socket: Path, sinks: str = "", extra: str = "") -> Path:
    path.write_text(
        f'[identities.default]\nsource = "files"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
        f'bundle = "{files.bundle}"\nmismatch_retries = 1\n{extra}{sinks}\n[listeners.unix]\npath = "{socket}"\n'
    )
    return path


def sink_table(out: Path, marker: Path, identity: str = "default") -> str:
    command = json.dumps([sys.executable, "-c", APPEND, str(marker)])
    return f'\n[[identities.{identity}.sinks]]\ndir = "{out}"\non_change = {command}\n'


async def test_a_wiped_sink_directory_is_written_again_on_sighup_and_its_hook_runs_once(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """The tmpfs under a sink was wiped (or the directory deleted): a SIGHUP, with nothing changed in the
    config or the credentials, writes it again from the current state."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    out, marker = tmp_path / "run" / "creds", tmp_path / "ran"
    path = config_file(tmp_path / "wlidd.toml", files, tmp_path / "wlidd.sock", sink_table(out, marker))
    d = Daemon(load_config(path, {}), config_path=path, environ={})
    async with in_background(d.run, d.stop):
        await wait_until(lambda: runs(marker) == 1 and (out / "key.pem").exists())
        version = d.watchers["default"].current.version  # type: ignore[union-attr]
        shutil.rmtree(tmp_path / "run")
        await d.reload()
        await wait_until(lambda: runs(marker) == 2)
        assert (out / "key.pem").read_bytes() == files.key.read_bytes()
        assert d.watchers["default"].current.version == version  # type: ignore[union-attr]  # no rotation


async def test_a_sink_added_to_the_config_is_written_on_sighup_without_a_rotation(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    out, marker = tmp_path / "creds", tmp_path / "ran"
    path = config_file(tmp_path / "wlidd.toml", files, tmp_path / "wlidd.sock")
    d = Daemon(load_config(path, {}), config_path=path, environ={})
    async with in_background(d.run, d.stop):
        config_file(path, files, tmp_path / "wlidd.sock", sink_table(out, marker))
        await d.reload()
        await wait_until(lambda: runs(marker) == 1)
        assert (out / "cert.pem").read_bytes() == files.cert.read_bytes()


async def test_a_deleted_file_is_written_again_by_the_periodic_check(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """No signal, no rotation: the per-identity check (every reload_interval; here every 50 ms) finds the
    missing file and the missing generation and writes the sink again."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    out = tmp_path / "creds"
    config = Config.model_validate(
        {
            "identities": {"default": files.config(sinks=[{"dir": str(out)}])},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config, sink_check_interval=0.05)
    async with in_background(d.run, d.stop):
        await wait_until(lambda: all((out / name).exists() for name in ("key.pem", "cert.pem", "bundle.pem")))
        (out / "cert.pem").unlink()
        await wait_until(lambda: (out / "cert.pem").exists())
        shutil.rmtree(out / os.readlink(out / "..data"))  # the files themselves, behind the links
        await wait_until(lambda: (out / "cert.pem").exists())
        assert (out / "cert.pem").read_bytes() == files.cert.read_bytes()


async def test_a_sink_that_is_current_is_only_checked_and_its_hook_does_not_run(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """What SIGHUP and the periodic check do for a sink that already holds the current state: nothing."""
    marker = tmp_path / "ran"
    config = sink(tmp_path / "out", on_change=[sys.executable, "-c", APPEND, str(marker)])
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    assert await publish_credentials((config,), state) == (config,)
    generation = os.readlink(tmp_path / "out" / "..data")

    class Watcher:  # what ensure_credentials reads of a CredentialWatcher
        name, current = "default", state
        source = type("Source", (), {"config": type("Config", (), {"sinks": (config,)})()})()

    assert await ensure_credentials(Watcher()) == ()  # type: ignore[arg-type]
    assert runs(marker) == 1 and os.readlink(tmp_path / "out" / "..data") == generation


# ---- token sinks ---------------------------------------------------------------------------------------------


async def test_a_deleted_token_file_is_written_again_from_the_current_token_on_sighup(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    token_file, marker = tmp_path / "tokens" / "vm.token", tmp_path / "ran"
    sinks = [{"path": str(token_file), "on_change": [sys.executable, "-c", APPEND, str(marker)]}]
    config = Config.model_validate(
        {
            "tokens": {"vm": metadata_token_config(upstreams, sinks=sinks)},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop):
        await wait_until(lambda: runs(marker) == 1)
        written, calls = token_file.read_bytes(), d.tokens["vm"].upstream_calls
        shutil.rmtree(tmp_path / "tokens")
        await d.reload()
        await wait_until(lambda: runs(marker) == 2)
        assert token_file.read_bytes() == written and d.tokens["vm"].upstream_calls == calls  # the same token


async def test_a_current_token_file_is_left_alone_even_in_json_whose_expires_in_counts_down(
    tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    token = Token("opaque-" + "t" * 30, now + dt.timedelta(hours=1), now, "gcp")
    marker = tmp_path / "ran"
    token_sink = SinkConfig.model_validate(
        {"path": str(tmp_path / "gcp.json"), "format": "json", "on_change": [sys.executable, "-c", APPEND, str(marker)]}
    )

    class Source:  # what ensure_token reads of a TokenSource
        name = "gcp"
        config = type("Config", (), {"sinks": (token_sink,)})()

        def servable(self, now: object = None) -> Token:
            return token

    later = now + dt.timedelta(minutes=30)
    assert await ensure_token(Source(), lambda: now) == (token_sink,)  # type: ignore[arg-type]
    inode = os.stat(tmp_path / "gcp.json").st_ino
    assert await ensure_token(Source(), lambda: later) == ()  # type: ignore[arg-type]
    assert os.stat(tmp_path / "gcp.json").st_ino == inode and runs(marker) == 1
    os.chmod(tmp_path / "gcp.json", 0o644)  # not what the sink says (0600): rewritten
    assert await ensure_token(Source(), lambda: later) == (token_sink,)  # type: ignore[arg-type]
    assert os.stat(tmp_path / "gcp.json").st_mode & 0o777 == 0o600


# ---- item 12: a second daemon on the same socket --------------------------------------------------------------


def test_a_second_daemon_on_the_same_socket_writes_no_sink_and_runs_no_hook_before_it_fails(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Two real `wlidd run` processes, one socket. The second one's sinks (its own directory and hook, and
    a second identity, so that its first sink would have had time to be written) stay untouched: it fails
    to bind before it starts any watcher."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    socket = tmp_path / "wlidd.sock"
    first_out, first_marker = tmp_path / "first", tmp_path / "first-ran"
    second_out, second_marker = tmp_path / "second", tmp_path / "second-ran"
    first = config_file(tmp_path / "first.toml", files, socket, sink_table(first_out, first_marker))
    second_identity = (
        f'[identities.other]\nsource = "files"\ncert = "{files.cert}"\nkey = "{files.key}"\nbundle = "{files.bundle}"\n'
    )
    sinks = sink_table(second_out, second_marker) + sink_table(tmp_path / "second-other", second_marker, "other")
    second = config_file(tmp_path / "second.toml", files, socket, sinks, extra="\n" + second_identity)
    running = subprocess.Popen(
        [*WLIDD, "run", "--config", str(first)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_socket(socket, running)
        deadline = time.monotonic() + 20
        while runs(first_marker) < 1:
            assert time.monotonic() < deadline, "the first daemon did not write its sink"
            time.sleep(0.02)
        written = os.stat(first_out / "key.pem").st_ino  # the file behind the name: a rewrite makes a new one
        result = subprocess.run([*WLIDD, "run", "--config", str(second)], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert f"cannot bind Unix socket {socket}" in result.stderr or str(socket) in result.stderr, result.stderr
        assert not second_out.exists() and not (tmp_path / "second-other").exists()
        assert not second_marker.exists()
        assert os.stat(first_out / "key.pem").st_ino == written and runs(first_marker) == 1
        assert status(socket)["identities"]["default"]["valid"] is True  # type: ignore[index]
    finally:
        running.terminate()
        running.communicate(timeout=30)
