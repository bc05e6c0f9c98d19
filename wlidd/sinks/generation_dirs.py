"""The pieces of Kubernetes' atomic writer (pkg/volume/util/atomic_writer.go) that generations.py puts in
order: a generation directory `<dir>/..<UTC time>.<random>` (made, filled, checked, removed), the link
`..data -> ..<generation>` (made as `..data_tmp` and renamed over it) and the stable names
`<dir>/<file> -> ..data/<file>`. Every name is reached relative to the sink directory's descriptor, and
only what root or the daemon's user owns is removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from wlidd.safedir import OPEN_DIR, SinkRefused, trusted_uids
from wlidd.sinks.access import CAP_FOWNER, has_capability, held_by_other
from wlidd.sinks.files import fd_file_is, fill_file, new_file_ids
from wlidd.sinks.layouts import SinkFile

DATA_LINK = "..data"  # <dir>/..data -> ..<generation>: re-pointed by one rename per generation


DATA_TMP = "..data_tmp"  # the new ..data link, made beside it and renamed over it


# ..2026_07_01_12_00_00.1a2b3c4d5e6f: UTC time and a random part (Kubernetes: ..2006_01_02_15_04_05.<random>)
GENERATION = re.compile(r"\.\.\d{4}(?:_\d\d){5}\.[A-Za-z0-9]{6,16}")


_DEFAULT_ACL = "system.posix_acl_default"


@dataclass(frozen=True)
class Entry:
    """A file to put in a generation with its owner and ACL (-1: leave the id as created; None: no ACL)."""

    file: SinkFile
    uid: int
    gid: int
    acl: bytes | None


@contextlib.contextmanager
def opened(dir_fd: int, name: str) -> Iterator[int]:
    """The directory `name` in `dir_fd` (a generation), opened without following a link; closed on exit.
    OSError when it cannot be opened (gone, not a directory, a link)."""
    gen_fd = os.open(name, OPEN_DIR, dir_fd=dir_fd)
    try:
        yield gen_fd
    finally:
        os.close(gen_fd)


def current_generation(dir_fd: int) -> str | None:
    """The generation `..data` points to: a `..<time>.<random>` directory root or wlidd's user owns, reached
    through a link they own. None when there is no such link (first write, a wiped directory, an older
    wlidd's plain files) or it leads anywhere else."""
    try:
        st = os.stat(DATA_LINK, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) or st.st_uid not in trusted_uids():
            return None
        target = os.readlink(DATA_LINK, dir_fd=dir_fd)
        if not GENERATION.fullmatch(target):
            return None
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in trusted_uids():
        return None
    return target


def generation_holds(dir_fd: int, generation: str, entries: Sequence[Entry]) -> bool:
    """Whether `generation` holds exactly `entries`: the same names and no others, each a regular file with
    one link, the content, the mode, the owner (wlidd's user and the group a new file gets, when -1) and
    the ACL (none without readers) it would be written with."""
    try:
        with opened(dir_fd, generation) as gen_fd:
            st = os.fstat(gen_fd)
            if stat.S_IMODE(st.st_mode) != 0o755 or st.st_uid not in trusted_uids():
                return False  # chmod'ed or taken over: readers may no longer reach the files
            if sorted(os.listdir(gen_fd)) != sorted(e.file.name for e in entries):
                return False
            default_uid, default_gid = new_file_ids(gen_fd)
            for entry in entries:
                uid = default_uid if entry.uid == -1 else entry.uid
                gid = default_gid if entry.gid == -1 else entry.gid
                if not fd_file_is(gen_fd, entry.file.name, entry.file.data, entry.file.mode, uid, gid, entry.acl):
                    return False
            return True
    except OSError:
        return False


def is_data_link(dir_fd: int, name: str) -> bool:
    """Whether `name` is the link `..data/<name>`, owned by root or wlidd's user."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return (
            stat.S_ISLNK(st.st_mode)
            and st.st_uid in trusted_uids()
            and os.readlink(name, dir_fd=dir_fd) == f"{DATA_LINK}/{name}"
        )
    except OSError:
        return False


def spare_generation(dir_fd: int, current: str | None) -> str | None:
    """The next generation prepared by the last publication: `..data_tmp` (a link root or wlidd's user owns)
    leading to a `..<time>.<random>` directory of wlidd's user other than `current`; None without one."""
    try:
        st = os.stat(DATA_TMP, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) or st.st_uid not in trusted_uids():
            return None
        target = os.readlink(DATA_TMP, dir_fd=dir_fd)
        if target == current or not GENERATION.fullmatch(target):
            return None
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return target if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() else None


def new_generation_dir(dir_fd: int, directory: Path) -> str:
    """A new, empty generation directory `..<UTC time>.<random>` (mkdir: never anyone else's), mode 0755
    whatever the umask and without a default ACL (its files get exactly the ACLs set for them); its name.
    Everything that changes the directory itself (and so raises an event in `directory`) happens here,
    not when it is filled."""
    stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S")
    for _ in range(100):
        name = f"{stamp}.{secrets.token_hex(6)}"
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(directory)) from None
    else:
        raise FileExistsError(errno.EEXIST, "no free generation name", str(directory))
    try:
        with opened(dir_fd, name) as gen_fd:
            if os.fstat(gen_fd).st_uid != os.geteuid():
                raise SinkRefused(f"{directory / name} is not a directory of wlidd's user")
            with contextlib.suppress(OSError):
                os.removexattr(gen_fd, _DEFAULT_ACL)
            os.fchmod(gen_fd, 0o755)
    except BaseException:
        remove_generation(dir_fd, name)
        raise
    return name


def write_generation(dir_fd: int, directory: Path, entries: Sequence[Entry]) -> str:
    """A new generation directory holding `entries`, fsynced; its name. On failure it is removed and the
    error (its filename: the stable path) raised."""
    name = new_generation_dir(dir_fd, directory)
    try:
        fill_generation(dir_fd, directory, name, entries)
    except BaseException:
        remove_generation(dir_fd, name)
        raise
    return name


def fill_generation(dir_fd: int, directory: Path, name: str, entries: Sequence[Entry]) -> None:
    """Write `entries` into the generation directory `name` (made by new_generation_dir; emptied first),
    each file written and fsynced as _write_new_file does, then the directory fsynced. Nothing here changes
    the directory's own attributes unless they changed since (no event in the sink directory)."""
    with opened(dir_fd, name) as gen_fd:
        st = os.fstat(gen_fd)
        if st.st_uid != os.geteuid():
            raise SinkRefused(f"{directory / name} is not a directory of wlidd's user")
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.fchmod(gen_fd, 0o755)
        for leftover in os.listdir(gen_fd):
            os.unlink(leftover, dir_fd=gen_fd)
        for entry in entries:
            _write_new_file(gen_fd, entry, directory / entry.file.name)
        os.fsync(gen_fd)


def _write_new_file(dir_fd: int, entry: Entry, shown: Path) -> None:
    """Create `entry`'s file (O_EXCL, not following links) with its mode, ACL, owner, content, fsynced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(entry.file.name, flags, 0o600, dir_fd=dir_fd)
        try:
            fill_file(fd, entry.file.data, entry.file.mode, entry.acl, entry.uid, entry.gid, shown)
        finally:
            os.close(fd)
    except OSError as exc:
        if isinstance(exc, SinkRefused):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(shown)) from None


def link_data_tmp(dir_fd: int, directory: Path, generation: str) -> None:
    """The link `..data_tmp -> generation` (replacing a leftover of ours; another user's is refused)."""
    try:
        try:
            os.symlink(generation, DATA_TMP, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(DATA_TMP, dir_fd=dir_fd, follow_symlinks=False)
            held = held_by_other(st, os.fstat(dir_fd))
            if held and not has_capability(CAP_FOWNER):
                raise SinkRefused(f"{directory / DATA_TMP} {held}; nothing written") from None
            os.unlink(DATA_TMP, dir_fd=dir_fd)
            os.symlink(generation, DATA_TMP, dir_fd=dir_fd)
    except OSError as exc:
        if isinstance(exc, SinkRefused):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(directory / DATA_TMP)) from None


def rename_data(dir_fd: int, directory: Path) -> None:
    """Rename `..data_tmp` over `..data` (the atomic step), then fsync the directory."""
    rename_link(dir_fd, DATA_TMP, DATA_LINK, directory / DATA_LINK)
    os.fsync(dir_fd)


def swap_data(dir_fd: int, directory: Path, generation: str) -> None:
    """`..data_tmp -> generation`, renamed over `..data`."""
    link_data_tmp(dir_fd, directory, generation)
    rename_data(dir_fd, directory)


def make_links(dir_fd: int, directory: Path, names: Sequence[str]) -> None:
    """Make each stable name the link `..data/<name>` (left alone when it already is): a temp link
    `.<name>.<random>.tmp`, renamed over the name (atomic, also over a plain file)."""
    for name in names:
        if is_data_link(dir_fd, name):
            continue
        for _ in range(100):
            tmp = f".{name}.{secrets.token_hex(6)}.tmp"
            try:
                os.symlink(f"{DATA_LINK}/{name}", tmp, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory / name))
        rename_link(dir_fd, tmp, name, directory / name)


def rename_link(dir_fd: int, tmp: str, name: str, shown: Path) -> None:
    """Rename the link `tmp` over `name` in the directory (atomic, also over a plain file). On failure
    `tmp` is removed and the OSError names `shown` (the stable path), never the temp name."""
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise OSError(exc.errno, exc.strerror or str(exc), str(shown)) from None


def generation_names(dir_fd: int, generation: str) -> list[str]:
    """The names of the files in `generation` ([] when it cannot be opened)."""
    try:
        gen_fd = os.open(generation, OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        return []
    try:
        return os.listdir(gen_fd)
    finally:
        os.close(gen_fd)


def empty_generation(dir_fd: int, name: str) -> bool:
    """Remove every file from the generation directory `name` (wlidd's user's); True when it is empty.
    Never the generation `..data` leads to (another writer may just have made it current)."""
    if current_generation(dir_fd) == name:
        return False
    try:
        with opened(dir_fd, name) as gen_fd:
            if os.fstat(gen_fd).st_uid != os.geteuid():
                return False
            for entry in os.listdir(gen_fd):
                os.unlink(entry, dir_fd=gen_fd)
            return True
    except OSError:
        return False


def remove_generation(dir_fd: int, name: str) -> bool:
    """Remove a generation directory (its files, then itself) when root or wlidd's user owns it, without
    following links; True when it is gone. Errors are swallowed (a leftover is swept at a later write).
    Never the generation `..data` leads to (another writer may just have made it current)."""
    if current_generation(dir_fd) == name:
        return False
    try:
        with opened(dir_fd, name) as gen_fd:
            if os.fstat(gen_fd).st_uid not in trusted_uids():
                return False
            for entry in os.listdir(gen_fd):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(entry, dir_fd=gen_fd)
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:  # already gone (another writer removed it)
        return True
    except OSError:
        return False
    return True
