"""Credential sinks publish each generation in one atomic step (issue 14, item 8): every state a reader can
observe holds a matched key and chain, the first event a directory watcher gets for a rotation is the rename
of `..data`, and readers of a real daemon's sinks (event-driven like Envoy and Go cert watchers, and random)
never read a mismatched pair.

`run_rotations` and the consumer processes are shared with the soak (tests/test_soak.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from tests.conftest import TD
from tests.test_cli import WLIDD, wait_for_socket
from tests.test_hostile_sinks import (  # noqa: F401  (public_dir, sticky_dir: fixtures)
    APP,
    DAEMON,
    as_user,
    identity_state,
    needs_root,
    public_dir,
    sink,
)
from tests.test_hostile_sinks import sticky_dir as sticky_dir  # a fixture
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.sinks.credentials import write_credentials
from wlidd.sinks.generation_dirs import GENERATION

Pair = tuple[bytes, bytes]  # (key, chain) as read
# what a Go fsnotify watcher subscribes to (Create, Write, Remove, Rename, Chmod)
CHANGES = (
    inotify_flags.CREATE
    | inotify_flags.DELETE
    | inotify_flags.MOVED_FROM
    | inotify_flags.MOVED_TO
    | inotify_flags.MODIFY
    | inotify_flags.CLOSE_WRITE
    | inotify_flags.ATTRIB
)


def read_pair(directory: Path) -> Pair | None:
    """key.pem and cert.pem through their stable names (None while one is missing)."""
    try:
        return (directory / "key.pem").read_bytes(), (directory / "cert.pem").read_bytes()
    except FileNotFoundError:
        return None


def observe_every_step(monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[Pair | None]:
    """Read the pair after every change the writer makes to the file system (rename, link, unlink, mkdir,
    rmdir): the states any reader between two of its steps could see. The list of pairs read."""
    seen: list[Pair | None] = []
    for name in ("replace", "rename", "symlink", "unlink", "rmdir", "mkdir"):
        real = getattr(os, name)

        def step(*args: Any, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            result = _real(*args, **kwargs)
            seen.append(read_pair(directory))
            return result

        monkeypatch.setattr(os, name, step)
    return seen


def test_every_intermediate_state_of_a_rotation_holds_a_matched_pair(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Today's writer renamed key.pem, then cert.pem: between the two, a reader found the new key beside
    the old chain. Now every state between the writer's steps holds the old pair or the new one."""
    out = tmp_path / "out"
    old, new = ca.issue_svid(), ca.issue_svid()
    write_credentials(sink(out), identity_state(old, ca.bundle_pem))
    seen = observe_every_step(monkeypatch, out)
    write_credentials(sink(out), identity_state(new, ca.bundle_pem))
    monkeypatch.undo()
    pairs = {(old.key_pem, old.chain_pem): "old", (new.key_pem, new.chain_pem): "new"}
    labels = [pairs.get(pair, "MISMATCH") if pair is not None else "missing" for pair in seen]
    assert "MISMATCH" not in labels and "missing" not in labels, labels
    assert labels[-1] == "new" and len(labels) > 3  # the rename of ..data, then the old generation's removal


def test_plain_files_of_an_older_wlidd_become_links_and_no_state_between_mixes_them(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration: cert.pem and key.pem as plain files (what wlidd wrote before) end up as links into ..data,
    and no state on the way pairs a new key with the old chain (or the reverse)."""
    out = tmp_path / "out"
    out.mkdir()
    old, new = ca.issue_svid(), ca.issue_svid()
    (out / "key.pem").write_bytes(old.key_pem)
    (out / "key.pem").chmod(0o600)
    (out / "cert.pem").write_bytes(old.chain_pem)
    seen = observe_every_step(monkeypatch, out)
    write_credentials(sink(out), identity_state(new, ca.bundle_pem))
    monkeypatch.undo()
    pairs = {(old.key_pem, old.chain_pem): "old", (new.key_pem, new.chain_pem): "new"}
    labels = [pairs.get(pair, "MISMATCH") if pair is not None else "missing" for pair in seen]
    assert "MISMATCH" not in labels and "missing" not in labels, labels
    for name in ("key.pem", "cert.pem", "bundle.pem", "certificate_config.json"):
        assert os.readlink(out / name) == f"..data/{name}"
    assert (out / "key.pem").read_bytes() == new.key_pem
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600


def test_a_generation_is_published_by_renaming_dotdata_and_the_stable_names_are_links_into_it(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """The Kubernetes atomic writer's layout: ..data -> ..<time>.<random>, <file> -> ..data/<file>; the next
    generation's directory waits, empty, behind ..data_tmp; the old generation is gone."""
    out = tmp_path / "out"
    write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    first = os.readlink(out / "..data")
    write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    current, spare = os.readlink(out / "..data"), os.readlink(out / "..data_tmp")
    assert current != first and not (out / first).exists()
    for name in (current, spare):
        assert GENERATION.fullmatch(name), name
        assert stat.S_IMODE(os.lstat(out / name).st_mode) == 0o755
    assert list((out / spare).iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["..data", "..data_tmp", current, spare, "bundle.pem", "cert.pem", "certificate_config.json", "key.pem"]
    )
    for name in ("bundle.pem", "cert.pem", "certificate_config.json", "key.pem"):
        assert os.readlink(out / name) == f"..data/{name}"
    document = json.loads((out / "certificate_config.json").read_bytes())
    assert document["cert_configs"]["workload"] == {
        "cert_path": str(out / "cert.pem"),
        "key_path": str(out / "key.pem"),
    }


def test_the_first_event_a_directory_watcher_gets_for_a_rotation_is_the_rename_of_dotdata(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """A consumer that reloads on the first inotify event in the directory (Go cert watchers, Envoy) is woken
    by the publication itself, not by a step before it: the new generation is written inside a directory
    made at the previous publication, whose files raise no event in the sink directory."""
    out = tmp_path / "out"
    write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    with INotify() as watcher:
        watcher.add_watch(str(out), CHANGES)
        write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
        events = [(inotify_flags.from_mask(e.mask), e.name) for e in watcher.read(timeout=1000)]
    names = [name for _, name in events if name]
    assert names[:2] == ["..data_tmp", "..data"], events[:4]
    assert inotify_flags.MOVED_FROM in events[0][0] and inotify_flags.MOVED_TO in events[1][0]


def test_a_sink_that_is_already_current_is_not_rewritten(tmp_path: Path, ca: CertificateAuthority) -> None:
    out = tmp_path / "out"
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    assert write_credentials(sink(out), state) is True
    generation, inode = os.readlink(out / "..data"), os.stat(out / "key.pem").st_ino
    assert write_credentials(sink(out), state) is False
    assert os.readlink(out / "..data") == generation and os.stat(out / "key.pem").st_ino == inode
    assert write_credentials(sink(out, mode="0640"), state) is True  # another mode: a new generation
    assert stat.S_IMODE(os.stat(out / "cert.pem").st_mode) == 0o640


def test_a_federated_bundle_dropped_from_a_spiffe_fs_sink_disappears_from_it(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """De-federation (SPIFFE Filesystem Delivery draft, 3.3): the trust domain's file goes away with the
    generation that no longer has it."""
    from wlidd.svid.credential_set import CredentialFiles, build_identity
    from wlidd.tlsctx import TlsContexts
    from wlidd.watch import IdentityState

    svid, now = ca.issue_svid(), dt.datetime.now(dt.UTC)
    files = CredentialFiles("t", svid.chain_pem, svid.key_pem, own_bundle=ca.bundle_pem)
    federated = CredentialFiles(
        "t",
        svid.chain_pem,
        svid.key_pem,
        own_bundle=ca.bundle_pem,
        extra_bundles=(("other.org", foreign_ca.bundle_pem),),
    )
    out = tmp_path / "fs"
    for credential_files in (federated, files):
        identity = build_identity(credential_files, now)
        write_credentials(
            sink(out, layout="spiffe-fs"), IdentityState("d", identity, TlsContexts.build(identity), 1, now)
        )
        if credential_files is federated:
            assert (out / "other.org.spiffe-trust-bundle.pem").read_bytes() == foreign_ca.bundle_pem
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("..")) == [
        "credential-bundle.private-key.pem",
        f"{TD}.spiffe-trust-bundle.pem",
    ]


def test_leftovers_of_a_crash_are_swept_at_the_next_write(tmp_path: Path, ca: CertificateAuthority) -> None:
    """A generation written but never published, one published over but not removed, and a ..data_tmp
    leading nowhere: all removed; the current generation and the files stay."""
    out = tmp_path / "out"
    write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    (out / "..data_tmp").unlink()
    for stale in ("..2020_01_01_00_00_00.aaaaaaaaaaaa", "..2020_01_01_00_00_01.bbbbbbbbbbbb"):
        (out / stale).mkdir()
        (out / stale / "key.pem").write_bytes(b"half")
    (out / "..data_tmp").symlink_to("..2020_01_01_00_00_09.cccccccccccc")
    kept = ["..notes", "..2020_01_01_00_00_02"]  # not of the generation pattern: not ours to remove
    for name in kept:
        (out / name).mkdir()
    write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    current, spare = os.readlink(out / "..data"), os.readlink(out / "..data_tmp")
    dotted = sorted(p.name for p in out.iterdir() if p.name.startswith(".."))
    assert dotted == sorted(["..data", "..data_tmp", current, spare, *kept])


def test_a_directory_at_a_stable_name_refuses_the_write_and_changes_nothing(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    out = tmp_path / "out"
    first = identity_state(ca.issue_svid(), ca.bundle_pem)
    write_credentials(sink(out, layout="spiffe-helper"), first)
    generation = os.readlink(out / "..data")
    (out / "svid.pem").unlink()
    (out / "svid.pem").mkdir()
    with pytest.raises(IsADirectoryError, match="svid.pem is a directory; nothing written"):
        write_credentials(sink(out, layout="spiffe-helper"), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert os.readlink(out / "..data") == generation


# ---- another user in a sticky directory ------------------------------------------------------------------


@needs_root
def test_a_dotdata_another_user_holds_in_a_sticky_sink_directory_refuses_an_unprivileged_write(
    sticky_dir: Path, ca: CertificateAuthority
) -> None:
    """The sink directory is /tmp-like: another user made `..data` there first. wlidd (unprivileged) cannot
    replace it, says so, and writes nothing; another user's generation-named directory is never removed."""
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    os.chown(sticky_dir, DAEMON, DAEMON)
    planted = sticky_dir / "..2020_01_01_00_00_00.aaaaaaaaaaaa"

    def plant() -> str:
        (sticky_dir / "..data").symlink_to("/etc")
        planted.mkdir()
        return "done"

    assert as_user(APP, plant) == "done"
    result = as_user(DAEMON, lambda: str(write_credentials(sink(sticky_dir), state)))
    assert result.startswith("ERROR SinkRefused") and "..data belongs to uid 65534 in a sticky directory" in result
    assert sorted(p.name for p in sticky_dir.iterdir()) == ["..2020_01_01_00_00_00.aaaaaaaaaaaa", "..data"]
    assert planted.is_dir()


# ---- readers of a real daemon's sinks ----------------------------------------------------------------------

CONSUMER = r'''
import json, os, re, signal, sys, time
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from inotify_simple import INotify, flags

kind, directory, bundle_path, report = sys.argv[1:5]
roots = x509.load_pem_x509_certificates(open(bundle_path, "rb").read())
counts = {"reads": 0, "mismatches": 0, "retries": 0}
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\n.*?\n-----END \1-----\n", re.S)

def matched(key_pem, chain_pem):
    """The key is the leaf's, and each certificate is issued by the next, the last by a root of the bundle."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        if key.public_key().public_bytes(*SPKI) != chain[0].public_key().public_bytes(*SPKI):
            return False
        for cert, issuer in zip(chain, chain[1:]):
            cert.verify_directly_issued_by(issuer)
        for root in roots:
            try:
                chain[-1].verify_directly_issued_by(root)
                return True
            except Exception:
                pass
        return False
    except Exception:
        return False

def stable():  # as Go's tls.LoadX509KeyPair: the chain file, then the key file, by their stable names
    chain = open(os.path.join(directory, "cert.pem"), "rb").read()
    return open(os.path.join(directory, "key.pem"), "rb").read(), chain

def through_data():  # kubelet-style: resolve ..data once, read the whole set through that generation
    try:
        generation = os.path.join(directory, os.readlink(os.path.join(directory, "..data")))
    except FileNotFoundError:
        return stable()  # a writer without ..data
    return open(os.path.join(generation, "key.pem"), "rb").read(), open(os.path.join(generation, "cert.pem"), "rb").read()

def single():  # SPIFFE Filesystem Delivery: one open/read/close of the credential bundle, then split
    data = open(os.path.join(directory, "credential-bundle.private-key.pem"), "rb").read()
    blocks = [m.group(0) for m in BLOCK.finditer(data)]
    return blocks[0], b"".join(blocks[1:])

def check(read):
    try:
        key, chain = read()
    except FileNotFoundError:  # a generation removed between readlink and open: read again
        counts["retries"] += 1
        return
    counts["reads"] += 1
    if not matched(key, chain):
        counts["mismatches"] += 1

read = {"first-event-data": through_data, "first-event-stable": stable, "envoy": stable,
        "random-data": through_data, "random-single": single}[kind]
if kind.startswith("random"):
    print("ready", flush=True)
    while not stop:
        check(read)
else:
    watcher = INotify()
    mask = flags.MOVED_TO if kind == "envoy" else (flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
            | flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB)
    watcher.add_watch(directory, mask)
    print("ready", flush=True)
    while not stop:
        if watcher.read(timeout=50):  # reload at once on the first event (of each burst)
            check(read)
open(report, "w").write(json.dumps(counts))
'''

FILES_CONSUMERS = ("first-event-data", "first-event-stable", "envoy", "random-data")


@contextlib.contextmanager
def consumers(kinds: dict[str, Path], bundle: Path, reports: Path) -> Iterator[dict[str, dict[str, int]]]:
    """One process per consumer kind (no shared GIL, like real consumers) reading the directory given; the
    yielded dict is filled with each one's counts once they were stopped."""
    reports.mkdir(exist_ok=True)
    results: dict[str, dict[str, int]] = {}
    processes = {}
    try:
        for kind, directory in kinds.items():
            command = [sys.executable, "-c", CONSUMER, kind, str(directory), str(bundle), str(reports / kind)]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            processes[kind] = process
            assert process.stdout is not None and process.stdout.readline() == "ready\n", kind
        yield results
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for kind, process in processes.items():
            process.communicate(timeout=30)
            if (reports / kind).exists():
                results[kind] = json.loads((reports / kind).read_text())


def run_rotations(base: Path, rotations: int, *, layouts: tuple[str, ...] = ("files",)) -> dict[str, dict[str, int]]:
    """A real `wlidd run` reading GCE-style credentials (the guest agent's symlink-swap writer) rotated
    `rotations` times, each with a new short-lived SVID, waiting each time until the sinks hold it; sink
    consumers read all along. Their counts by consumer kind."""
    ca = CertificateAuthority(TD)
    writer = GceCredentialWriter(base / "secrets")
    svid = ca.issue_svid(ttl=dt.timedelta(minutes=5))
    writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
    bundle = base / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    out = {layout: base / "sinks" / layout for layout in layouts}
    sink_tables = "".join(
        f'[[identities.default.sinks]]\ndir = "{d}"\nlayout = "{layout}"\n' for layout, d in out.items()
    )
    config = base / "wlidd.toml"
    config.write_text(
        f"""
[daemon]
log_format = "json"
log_level = "warning"

[identities.default]
source = "gce"
dir = "{writer.link}"
trust_domain = "{TD}"
mismatch_retries = 50
mismatch_retry_delay = "20ms"
debounce = "10ms"
{sink_tables}
[listeners.unix]
path = "{base / "wlidd.sock"}"
"""
    )
    log = (base / "wlidd.log").open("w")
    daemon = subprocess.Popen([*WLIDD, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_socket(base / "wlidd.sock", daemon)
        wait_until_published(out, svid)
        kinds = {kind: out["files"] for kind in FILES_CONSUMERS if "files" in out}
        if "spiffe-fs" in out:
            kinds["random-single"] = out["spiffe-fs"]
        with consumers(kinds, bundle, base / "reports") as results:
            for _ in range(rotations):
                svid = ca.issue_svid(ttl=dt.timedelta(minutes=5))
                writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
                wait_until_published(out, svid)
        assert daemon.poll() is None, "the daemon exited"
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
    assert set(results) == set(kinds), f"a consumer did not report: {sorted(results)}"
    return results


def wait_until_published(out: dict[str, Path], svid: IssuedSvid, timeout: float = 20) -> None:
    """Until every sink holds `svid` (read through its stable names)."""
    deadline = time.monotonic() + timeout
    wanted = {"files": ("cert.pem", svid.chain_pem), "spiffe-fs": ("credential-bundle.private-key.pem", svid.key_pem)}
    for layout, directory in out.items():
        name, content = wanted[layout]
        while True:
            with contextlib.suppress(OSError):
                if (directory / name).read_bytes().startswith(content):
                    break
            assert time.monotonic() < deadline, f"the {layout} sink did not get the rotation"
            time.sleep(0.005)


def test_event_driven_and_random_readers_of_a_real_daemons_sink_never_read_a_mismatched_pair(tmp_path: Path) -> None:
    """30 rotations of a real daemon's "files" sink, read by: a consumer reloading on the first inotify event
    through ..data (kubelet-style) and one through the stable names (Go's LoadX509KeyPair), Envoy's
    watched_directory (IN_MOVED_TO, stable names) and a random reader through ..data. Today's writer (key.pem
    renamed, then cert.pem) gave them a new key with the old chain."""
    results = run_rotations(tmp_path, 30)
    assert {kind: counts["mismatches"] for kind, counts in results.items()} == dict.fromkeys(FILES_CONSUMERS, 0), (
        results
    )
    for kind in FILES_CONSUMERS:
        assert results[kind]["reads"] >= (30 if kind.startswith("random") else 10), (kind, results[kind])
