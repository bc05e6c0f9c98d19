"""Issue 14, sources: races and costs found by a tester against a real daemon.

- a link that vanishes between realpath's lstat and readlink (the GCE guest agent unlinks the live
  link before renaming the new one in) is a rotation in progress, never an OSError (it killed the
  daemon from the watch, and was counted as tls_context_failed from a read);
- a rotation made while the watches are being set up again is read ("watch-changed");
- a file briefly unreadable (`install -m 0644` creates it 0600, chmods after the copy) is retried;
- events in a busy watched directory cost a read, not a parse (fingerprint first);
- a federated problem the served identity already has does not delay the own rotation;
- a directory replaced whole (`rm -rf certs; mv new certs`) is seen through its parent's events;
- every identity's first load runs at once at start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.test_cli import WLIDD
from tests.test_real_writers import REPO, running_daemon
from tests.test_watch import changed, running, serial_of
from wlidd.config import IdentityConfig, parse_identity_config
from wlidd.emulator.ca import CertificateAuthority
from wlidd.errors import RetryableSvidError
from wlidd.svid.load.source import CredentialSource
from wlidd.watch import CredentialWatcher


def _gce_layout(tmp_path: Path, ca: CertificateAuthority) -> tuple[Path, str]:
    layout = tmp_path / "layout"
    svid = ca.issue_svid()
    for version in ("v1", "v2"):
        (layout / version).mkdir(parents=True)
        (layout / version / "certificates.pem").write_bytes(svid.chain_pem)
        (layout / version / "private_key.pem").write_bytes(svid.key_pem)
        (layout / version / "ca_certificates.pem").write_bytes(ca.bundle_pem)
    os.symlink("v1", layout / "creds")
    return layout / "creds", serial_of(svid.leaf)


def test_a_link_gone_between_lstat_and_readlink_is_a_rotation_in_progress_not_an_oserror(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live link vanishes after realpath's lstat and before its readlink (the guest agent's
    unlink+rename window, made deterministic): watch_dirs() must not raise, read() must say
    "retry" (RetryableSvidError), never let an OSError out."""
    link, _ = _gce_layout(tmp_path, ca)
    source = CredentialSource("default", parse_identity_config({"source": "gce", "dir": link}))
    real_readlink = os.readlink

    def readlink_after_unlink(path: object, *args: object, **kwargs: object) -> str:
        if os.fspath(path) == str(link):  # type: ignore[arg-type]
            raise FileNotFoundError(2, "No such file or directory", str(link))
        return real_readlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "readlink", readlink_after_unlink)
    source.watch_dirs()  # raises FileNotFoundError today (kills the daemon from the watches' check)
    with pytest.raises(RetryableSvidError):
        source.read()  # raises FileNotFoundError today (counted as a tls_context_failed rejection)


def test_daemon_survives_a_link_replaced_by_unlink_then_symlink(tmp_path: Path, ca: CertificateAuthority) -> None:
    """A real daemon on a gce dir whose link is replaced by unlink + symlink (the guest agent's
    writer, older `ln -sf`) over and over: it stays up and never counts a rejection."""
    link, serial = _gce_layout(tmp_path, ca)
    daemon_dir = tmp_path / "daemon"
    daemon_dir.mkdir()
    config = daemon_dir / "wlidd.toml"
    config.write_text(
        f'[daemon]\nlog_format = "json"\n\n[identities.default]\nsource = "gce"\ndir = "{link}"\n'
        f'mismatch_retry_delay = "1s"\n\n[listeners.unix]\npath = "{daemon_dir / "wlidd.sock"}"\n'
    )
    with running_daemon(tmp_path, [*WLIDD, "run", "--config", str(config)]) as daemon:
        daemon.wait_for_serial(serial, "start")
        flipper = subprocess.Popen(
            [
                "bash",
                "-c",
                f"cd {link.parent}; while :; do rm -f creds; ln -s v2 creds; rm -f creds; ln -s v1 creds; done",
            ],
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 20
            start_reloads = daemon.status()["reloads"]
            while daemon.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if daemon.status()["reloads"] - start_reloads >= 150:
                        break
                except Exception:  # the daemon died under us: checked below
                    break
                time.sleep(0.1)
        finally:
            flipper.send_signal(signal.SIGKILL)
            flipper.wait()
        assert daemon.proc.poll() is None, "the daemon died: " + daemon.log.read_text(errors="replace")[-1500:]
        wrong = [
            e.get("detail")
            for e in daemon.log_events()
            if e.get("event") == "credential set rejected" and e.get("reason") == "tls_context_failed"
        ]
        assert not wrong, f"a vanished link was counted as a TLS context failure: {wrong[:2]}"


async def test_a_rotation_while_the_watches_are_re_established_is_not_missed(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """A federated bundle's directory does not exist, so the watches are re-established every 2 s;
    a rotation made exactly while they are down (no inotify open) is served promptly all the same."""
    creds = tmp_path / "creds"
    creds.mkdir()
    key_svid = ca.issue_svid()
    (creds / "ca.pem").write_bytes(ca.bundle_pem)
    (creds / "chain.pem").write_bytes(key_svid.chain_pem)
    (creds / "key.pem").write_bytes(key_svid.key_pem)
    config = parse_identity_config(
        {
            "source": "files",
            "cert": creds / "chain.pem",
            "key": creds / "key.pem",
            "bundle": creds / "ca.pem",
            "bundles": {"other.org": tmp_path / "not-yet" / "other.pem"},
            "mismatch_retries": 2,
            "mismatch_retry_delay": 0.05,
            "debounce": 0.02,
            "reload_interval": 600,
        }
    )
    watcher = CredentialWatcher("default", CredentialSource("default", config))
    new = ca.issue_svid(key=key_svid.key)
    armed = False
    rotated = anyio.Event()
    real_watch_dirs = watcher._watches.needed

    def watch_dirs_rotating_once() -> list[Path]:
        nonlocal armed
        if armed:  # called by the watches' run re-establishing them: no inotify is open now
            armed = False
            tmp = creds / ".chain.tmp"
            tmp.write_bytes(new.chain_pem)
            os.replace(tmp, creds / "chain.pem")
            anyio.from_thread.run_sync(rotated.set)
        return real_watch_dirs()

    watcher._watches.needed = watch_dirs_rotating_once  # type: ignore[method-assign]
    async with running(watcher) as w:
        assert w.current is not None
        version = w.current.version
        armed = True
        with anyio.fail_after(10):
            await rotated.wait()
        state = await changed(w, version, timeout=6.0)  # today: only at the 10-minute re-read
        assert state.identity.svid.serial == serial_of(new.leaf)


async def test_a_file_briefly_unreadable_while_install_writes_it_is_retried_not_rejected(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`install -m 0644 new dest` (README: a followed writer) unlinks dest, creates it 0600 owned by
    the writer, copies, then chmods 0644: the daemon, an unprivileged user under the shipped unit,
    gets EACCES if it reads in between (seen 2 times in 2000 real rotations). That is a set caught
    mid-write: it must be retried quietly, not refused at once as `file_unreadable`. Made
    deterministic here: the key's first open is refused, later opens succeed."""
    from wlidd.svid.load.retry import load_identity

    creds = tmp_path / "creds"
    creds.mkdir()
    svid = ca.issue_svid()
    (creds / "chain.pem").write_bytes(svid.chain_pem)
    (creds / "key.pem").write_bytes(svid.key_pem)
    (creds / "ca.pem").write_bytes(ca.bundle_pem)
    config = parse_identity_config(
        {
            "source": "files",
            "cert": creds / "chain.pem",
            "key": creds / "key.pem",
            "bundle": creds / "ca.pem",
            "mismatch_retries": 3,
            "mismatch_retry_delay": 0.01,
        }
    )
    from wlidd.svid.load import files as load_files

    real_read = load_files.read_regular_file
    refused = [0]

    def read_refusing_the_key_once(path: Path, limit: int = load_files.MAX_FILE_BYTES) -> bytes:
        if path.name == "key.pem" and not refused[0]:
            refused[0] += 1
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, limit)

    monkeypatch.setattr(load_files, "read_regular_file", read_refusing_the_key_once)
    retried: list[str] = []
    identity = await load_identity(  # today: raises SvidError("file_unreadable") on the first read
        CredentialSource("default", config), on_retry=lambda attempt, exc: retried.append(exc.reason)
    )
    assert identity.svid.serial == serial_of(svid.leaf) and retried == ["file_unreadable"]


def _files_config(creds: Path, **overrides: object) -> IdentityConfig:
    values: dict[str, object] = {
        "source": "files",
        "cert": creds / "chain.pem",
        "key": creds / "key.pem",
        "bundle": creds / "ca.pem",
        "mismatch_retries": 3,
        "mismatch_retry_delay": 5.0,
        "debounce": 0.02,
    }
    values.update(overrides)
    return parse_identity_config(values)


def _put(creds: Path, ca: CertificateAuthority) -> str:
    creds.mkdir(parents=True, exist_ok=True)
    svid = ca.issue_svid()
    (creds / "chain.pem").write_bytes(svid.chain_pem)
    (creds / "key.pem").write_bytes(svid.key_pem)
    (creds / "ca.pem").write_bytes(ca.bundle_pem)
    return serial_of(svid.leaf)


async def test_events_in_a_busy_directory_cost_a_read_not_a_parse(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wlidd.svid.load import retry
    from wlidd.svid.model import Identity

    creds = tmp_path / "creds"
    _put(creds, ca)
    parsed = [0]
    real_build = retry.build_identity

    def counting_build(*args: Any, **kwargs: Any) -> Identity:
        parsed[0] += 1
        return real_build(*args, **kwargs)

    monkeypatch.setattr(retry, "build_identity", counting_build)
    async with running(CredentialWatcher("default", CredentialSource("default", _files_config(creds)))) as w:
        assert parsed[0] == 1
        reloads = w.stats.reloads
        for index in range(20):  # another program's file in the same directory
            (creds / "busy.log").write_text(str(index))
            await anyio.sleep(0.03)
        with anyio.fail_after(5):
            while w.stats.reloads < reloads + 3:
                await anyio.sleep(0.01)
        assert parsed[0] == 1, "unchanged files were parsed and validated again"


async def test_a_federated_problem_already_known_does_not_delay_the_own_rotation(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    from wlidd.svid.load.retry import load_identity

    creds = tmp_path / "creds"
    _put(creds, ca)
    other = creds / "other.pem"
    other.write_bytes(foreign_ca.bundle_pem)
    source = CredentialSource("default", _files_config(creds, bundles={"other.org": other}))
    served = await load_identity(source)
    other.unlink()
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    broken = await load_identity(source, sleep=record, current=served)  # new problem: retried once
    assert sleeps == [5.0] and [p.reason for p in broken.bundle_problems] == ["file_missing"]
    sleeps.clear()
    new_serial = _put(creds, ca)
    rotated = await load_identity(source, sleep=record, current=broken)
    assert sleeps == [] and rotated.svid.serial == new_serial and rotated.bundle_problems


async def test_a_directory_replaced_whole_is_seen_through_its_parents_events(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from wlidd.watch import directories

    monkeypatch.setattr(directories, "MISSING_RECHECK", 600.0)  # only events can show the new directory
    creds = tmp_path / "certs"
    _put(creds, ca)
    config = _files_config(creds, mismatch_retry_delay=0.2)
    async with running(CredentialWatcher("default", CredentialSource("default", config))) as w:
        assert w.current is not None
        for _ in range(3):
            version = w.current.version
            staging = tmp_path / "new"
            serial = _put(staging, ca)
            shutil.rmtree(creds)
            await anyio.sleep(0.1)  # the watch notices its directory went away
            os.rename(staging, creds)
            state = await changed(w, version, timeout=5.0)
            assert state.identity.svid.serial == serial


async def test_every_identitys_first_load_runs_at_once_at_start(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import in_background
    from wlidd.config import Config
    from wlidd.daemon import Daemon

    names = ["a", "b", "c"]
    for name in names:
        _put(tmp_path / name, ca)
    begun: set[str] = set()
    all_begun = anyio.Event()
    real_reload = CredentialWatcher.reload

    async def reload_waiting_for_the_others(self: CredentialWatcher, reason: str) -> bool:
        if reason == "start":
            begun.add(self.name)
            if begun == set(names):
                all_begun.set()
            with anyio.fail_after(5):  # one identity after another: never all begun
                await all_begun.wait()
        return await real_reload(self, reason)

    monkeypatch.setattr(CredentialWatcher, "reload", reload_waiting_for_the_others)
    config = Config.model_validate(
        {
            "identities": {name: _files_config(tmp_path / name).model_dump() for name in names},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    daemon = Daemon(config)
    async with in_background(daemon.run, daemon.stop):
        assert all(daemon.watchers[name].is_valid() for name in names)


async def test_a_fifo_in_place_of_a_credential_file_is_refused_not_waited_on(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    from wlidd.errors import SvidError
    from wlidd.svid.load.retry import load_identity

    creds = tmp_path / "creds"
    _put(creds, ca)
    (creds / "key.pem").unlink()
    os.mkfifo(creds / "key.pem")  # no writer: a plain open would block the reading thread forever
    with anyio.fail_after(10), pytest.raises(SvidError) as info:
        await load_identity(CredentialSource("default", _files_config(creds)), attempts=3)
    assert info.value.reason == "file_not_regular" and "is not a regular file" in info.value.message
