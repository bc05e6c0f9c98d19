"""Credential writers as real tools write them, syscall for syscall, for tests against a real daemon.

Every writer takes a payload (file name -> bytes, written in that order: chain, key, bundle) and
publishes it under its `visible_dir`, the directory whose entries a consumer opens by name:

- `KubernetesAtomicWriter`: kubelet's projected/secret volumes and CSI drivers built on it
  (kubernetes pkg/volume/util/atomic_writer.go, `AtomicWriter.Write`, v1.29): a new
  ``..<UTC timestamp>.<random>`` dir with the files, ``..data_tmp -> that dir`` renamed over
  ``..data``, the user-visible ``name -> ..data/name`` links made once, the old dir removed.
  GKE mounts /var/run/secrets/workload-spiffe-credentials this way.
- `RenameIntoDirWriter`: consul-template / Vault Agent (renderer/renderer.go `AtomicWrite`), one
  template per file: a temp file in the same directory, write, fsync, chmod, rename over the name.
  Each file is replaced separately, so a reader between two renames sees a mixed set.
- `InPlaceWriter`: cron + ``cp``: GNU cp opens an existing destination ``O_WRONLY|O_TRUNC`` and
  writes into it; here in two chunks with a pause between, so a reader can meet half a PEM.
- `GceSymlinkSwapWriter`: the GCE guest agent (wlidd.emulator.gce_writer, SPECS.md §1.2): a new
  contents dir, a symlink renamed over ``workload-spiffe-credentials``, the old dir deleted.
- `RepointedParentWriter`: release directories behind a re-pointed link (Capistrano-style
  ``ln -s v2 cur.tmp && mv -T cur.tmp cur``, alternatives): files under ``cur/``, the first write
  makes ``v1`` and ``cur -> v1``, the second ``v2`` and swaps ``cur -> v2`` keeping ``v1``, later writes
  update the files inside the current target (by rename, then in place, alternately).

`python -m tests.writers swap-mid-read MOUNT STAGE -- <wlidd args>` runs wlidd with an audit hook
that performs a Kubernetes atomic write of the files staged in STAGE into MOUNT exactly between two
credential-file opens of one read (the worst moment for a reader that resolves each file separately).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from wlidd.emulator.gce_writer import GceCredentialWriter

Payload = Mapping[str, bytes]

DATA_DIR = "..data"  # atomic_writer.go dataDirName
NEW_DATA_DIR = "..data_tmp"  # atomic_writer.go newDataDirName


class Writer(Protocol):
    """A credential writer: `write` publishes one generation under `visible_dir`."""

    @property
    def visible_dir(self) -> Path: ...

    def write(self, payload: Payload) -> None: ...


def _write_new(path: Path, data: bytes, mode: int, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """open(2) + write(2) + close(2), as Go's os.WriteFile does (no fsync)."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _go_temp_name(directory: Path, prefix: str, make: Callable[[Path], None]) -> Path:
    """Go's os.MkdirTemp / os.CreateTemp naming: prefix + a random uint32 in decimal, retried on EEXIST."""
    while True:
        candidate = directory / f"{prefix}{random.randrange(2**32)}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate


class KubernetesAtomicWriter:
    """kubernetes pkg/volume/util/atomic_writer.go `AtomicWriter.Write` (v1.29), steps numbered as there."""

    def __init__(self, target_dir: Path, *, mode: int = 0o644) -> None:
        self.target_dir = target_dir
        self.mode = mode  # a Secret volume's defaultMode
        target_dir.mkdir(parents=True, exist_ok=True)

    @property
    def visible_dir(self) -> Path:
        return self.target_dir

    def write(self, payload: Payload) -> None:
        target = self.target_dir
        data_dir = target / DATA_DIR
        # (2) the current timestamped directory, from the ..data link
        try:
            old_ts_dir = os.readlink(data_dir)
        except FileNotFoundError:
            old_ts_dir = ""
        old_ts_path = target / old_ts_dir
        paths_to_remove: set[str] = set()
        if old_ts_dir:
            # (3) paths of the old version absent from the payload; (4) skip an unchanged payload
            paths_to_remove = {p.name for p in old_ts_path.iterdir()} - set(payload)
            unchanged = all(
                (old_ts_path / name).is_file() and (old_ts_path / name).read_bytes() == data
                for name, data in payload.items()
            )
            if unchanged and not paths_to_remove:
                return
        # (5) os.MkdirTemp(targetDir, "..2006_01_02_15_04_05.") then chmod 0755
        stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        ts_dir = _go_temp_name(target, stamp, lambda p: os.mkdir(p, 0o700))
        os.chmod(ts_dir, 0o755)
        # (6) os.WriteFile then os.Chmod, per file
        for name, data in payload.items():
            _write_new(ts_dir / name, data, self.mode)
            os.chmod(ts_dir / name, self.mode)
        # (8) ..data_tmp -> the new dir (relative), (9) renamed over ..data
        new_data_dir = target / NEW_DATA_DIR
        os.symlink(ts_dir.name, new_data_dir)
        os.rename(new_data_dir, data_dir)
        # (10) user-visible links, made only when missing
        for name in payload:
            visible = target / name
            try:
                os.readlink(visible)
            except FileNotFoundError:
                os.symlink(f"{DATA_DIR}/{name}", visible)
        # (11) old user-visible paths, (12) the previous timestamped directory
        for name in sorted(paths_to_remove):
            os.remove(target / name)
        if old_ts_dir:
            shutil.rmtree(old_ts_path)


class RenameIntoDirWriter:
    """consul-template renderer.AtomicWrite, one file after another (Vault Agent: one template per file)."""

    def __init__(self, directory: Path, *, mode: int = 0o644) -> None:
        self.directory = directory
        self.mode = mode  # renderer.DefaultFilePerms
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def visible_dir(self) -> Path:
        return self.directory

    def write(self, payload: Payload) -> None:
        for name, data in payload.items():
            self.write_file(name, data)

    def write_file(self, name: str, data: bytes) -> None:
        path = self.directory / name
        # os.CreateTemp(parent, ""): O_RDWR|O_CREATE|O_EXCL, mode 0600, a random decimal name
        fd_box: list[int] = []
        temp = _go_temp_name(
            self.directory,
            "",
            lambda p: fd_box.append(os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)),
        )
        fd = fd_box[0]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # perms: the existing file's mode, else the default
        try:
            perms = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            perms = self.mode
        os.chmod(temp, perms)
        os.rename(temp, path)


class InPlaceWriter:
    """cron + ``cp new/* dir/``: truncate the existing file and write into it, file after file.

    GNU cp (copy.c copy_reg) opens an existing destination ``O_WRONLY|O_TRUNC`` and a missing one
    ``O_WRONLY|O_CREAT|O_EXCL``; each file's bytes go in two write(2)s `pause` seconds apart.
    """

    def __init__(self, directory: Path, *, pause: float = 0.15, mode: int = 0o644) -> None:
        self.directory = directory
        self.pause = pause
        self.mode = mode
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def visible_dir(self) -> Path:
        return self.directory

    def write(self, payload: Payload) -> None:
        for name, data in payload.items():
            self.write_file(self.directory / name, data)

    def write_file(self, path: Path, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_TRUNC if path.exists() else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags | os.O_CLOEXEC, self.mode)
        try:
            half = len(data) // 2
            os.write(fd, data[:half])
            time.sleep(self.pause)  # the writer is slow (a big copy, a loaded node): readers meet half a PEM
            os.write(fd, data[half:])
        finally:
            os.close(fd)


class GceSymlinkSwapWriter:
    """The GCE guest agent's writer (wlidd.emulator.gce_writer): contents dir, link swap, old dir removed."""

    def __init__(self, secrets_dir: Path) -> None:
        self.agent = GceCredentialWriter(secrets_dir)

    @property
    def visible_dir(self) -> Path:
        return self.agent.link

    def write(self, payload: Payload) -> None:
        self.agent.rotate(payload)


class RepointedParentWriter:
    """Release dirs behind a link that is re-pointed by rename; old releases are kept.

    Write 1: ``v1/`` with the files, ``cur -> v1``. Write 2: ``v2/``, then ``cur.tmp -> v2`` renamed over
    ``cur`` (v1 stays). Later writes edit the files inside the current release: by rename
    (`RenameIntoDirWriter`) on odd turns, in place (`InPlaceWriter`) on even ones.
    """

    def __init__(self, base: Path, *, pause: float = 0.15) -> None:
        self.base = base
        self.pause = pause
        self.writes = 0
        base.mkdir(parents=True, exist_ok=True)

    @property
    def visible_dir(self) -> Path:
        return self.base / "cur"

    def write(self, payload: Payload) -> None:
        self.writes += 1
        if self.writes <= 2:
            release = self.base / f"v{self.writes}"
            release.mkdir(mode=0o755)
            for name, data in payload.items():
                _write_new(release / name, data, 0o644)
            os.symlink(release.name, self.base / "cur.tmp")
            os.rename(self.base / "cur.tmp", self.base / "cur")
            return
        current = self.base / os.readlink(self.base / "cur")
        editor: Writer = (
            RenameIntoDirWriter(current) if self.writes % 2 == 1 else InPlaceWriter(current, pause=self.pause)
        )
        editor.write(payload)


# ---- a Kubernetes swap in the middle of the daemon's read -----------------------------------------


def install_swap_mid_read(mount: Path, stage: Path) -> None:
    """Audit hook: while `stage` (a dir of next-generation files) exists, the second open(2) of a file
    named like one in it is preceded by a Kubernetes atomic write of the staged files into `mount`;
    then `stage` is removed. Opens are matched by base name, however the reader spells the path
    (through the link, the resolved dir, or relative to a dir fd)."""
    state = threading.local()
    lock = threading.Lock()
    opens = [0]
    writer = KubernetesAtomicWriter(mount)

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event != "open" or getattr(state, "busy", False) or not args:
            return
        path = args[0]
        if not isinstance(path, str | bytes | os.PathLike):
            return
        name = os.path.basename(os.fsdecode(path))
        if not name or name.startswith(".") or not os.path.isdir(stage) or not os.path.exists(stage / name):
            return
        with lock:
            state.busy = True
            try:
                if not stage.is_dir():
                    return
                opens[0] += 1
                if opens[0] < 2:
                    return
                files = sorted(stage.iterdir())
                writer.write({f.name: f.read_bytes() for f in files})
                shutil.rmtree(stage)
                opens[0] = 0
            finally:
                state.busy = False

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "swap-mid-read" or argv[3] != "--":
        print("usage: python -m tests.writers swap-mid-read MOUNT STAGE -- <wlidd args>", file=sys.stderr)
        return 2
    install_swap_mid_read(Path(argv[1]), Path(argv[2]))
    from wlidd.cli import main as wlidd_main

    return wlidd_main(argv[4:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
