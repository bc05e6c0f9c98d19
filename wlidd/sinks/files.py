"""Writing one file in one rename (write_atomic: token sinks, a certificate_config.json outside its sink's
directory), and telling whether a file already holds what a write would make it (file_is, fd_file_is: the
cheap check that lets every sink be brought up to date on every SIGHUP or timer tick).

Every path is walked from / one component at a time (wlidd.safedir.open_dir); files are created O_EXCL
with a random temp name, given their mode, ACL and owner before any content, fsynced, and renamed relative
to the directory's descriptor. Temp files a crash left behind are swept when root or the daemon's user
owns them (sweep_once).
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wlidd import posix_acl
from wlidd.errors import InvalidValue
from wlidd.logs import get_logger
from wlidd.safedir import SinkRefused, open_dir, trusted_uids
from wlidd.sinks.access import CAP_FOWNER, Readers, grant_directory, has_capability, held_by_other, set_acl
from wlidd.sinks.problems import reason

log = get_logger("wlidd.sinks")

_SWEPT_LIMIT = 4096  # (directory, name) pairs remembered as swept of stale temp files


_swept: set[tuple[int, int, str]] = set()


def write_atomic(
    path: Path, data: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1, *, readers: Readers | None = None
) -> None:
    """Replace `path` with `data` in one rename (token sinks; a certificate_config.json outside its sink's
    directory). The temp file beside it gets its mode, ACL (`readers`: read access, and read/traverse on the
    directory), owner and content, and is fsynced, before the rename; so the file never exists with a
    wider mode, another owner or another ACL, and a failure while writing (a full disk, a refused path, a
    file system without ACLs) leaves the old file and no temp file. Missing directories are created (0755).

    Raises SinkRefused when a directory on the way could be changed by another user (see open_dir) or the
    name is held by another user; another OSError from the kernel, whose filename is `path` (never a temp
    file's). EOPNOTSUPP: a file system without POSIX ACLs, with `readers`.
    """
    acl = posix_acl.file_acl(mode, readers.users, readers.groups) if readers else None
    item = _stage(path, data, mode, uid, gid, readers, acl)
    try:
        _check_target(item)
        try:
            os.replace(item.tmp, item.path.name, src_dir_fd=item.dir_fd, dst_dir_fd=item.dir_fd)
        except OSError as exc:
            raise _target_error(item, exc) from None
        item.renamed = True
        os.fsync(item.dir_fd)
    finally:
        if not item.renamed:
            with contextlib.suppress(OSError):
                os.unlink(item.tmp, dir_fd=item.dir_fd)
        os.close(item.dir_fd)


@dataclass
class _Staged:
    """A file written to `tmp` in the directory `dir_fd`, waiting to be renamed to `path`."""

    path: Path
    dir_fd: int
    tmp: str
    renamed: bool = False


def _stage(
    path: Path, data: bytes, mode: int, uid: int, gid: int, readers: Readers | None, acl: bytes | None
) -> _Staged:
    """Write `data` to a new temp file beside `path` (created O_EXCL with a random name, so nobody
    else's file is ever opened), with its mode, ACL and owner set before the data and fsynced."""
    name = path.name
    if name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, "not a file name", str(path))
    dir_fd = open_dir(path.parent, create=True)
    try:
        shown = str(path.parent)
        sweep_once(dir_fd, name, shown)
        if readers:
            grant_directory(dir_fd, readers, shown)
        tmp, fd = _create_temp(dir_fd, name, path)
        try:
            try:
                fill_file(fd, data, mode, acl, uid, gid, path)
            finally:
                os.close(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(exc, OSError) and not isinstance(exc, SinkRefused):
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return _Staged(path, dir_fd, tmp)


def fill_file(fd: int, data: bytes, mode: int, acl: bytes | None, uid: int, gid: int, shown: Path) -> None:
    """Give a new, empty file its mode, ACL and owner (-1: leave as created) before any content, then the
    content, fsynced: the file never holds the data with wider access than `mode` and `acl` give."""
    os.fchmod(fd, mode)
    if acl is not None:
        set_acl(fd, acl, shown)  # before the chown: only the owner (or CAP_FOWNER) may set it
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _create_temp(dir_fd: int, name: str, path: Path) -> tuple[str, int]:
    """A new empty file `.name.<random>.tmp` (mode 0600, O_EXCL: a name someone else holds is skipped,
    never opened or removed): its name and a write descriptor (the caller closes it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return tmp, os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def _check_target(item: _Staged) -> None:
    """Refuse, before the rename, a target that the rename would fail on: a directory at its name, or a
    name another user holds in a sticky directory when this process may not replace it (no CAP_FOWNER).
    A regular file or link of another user is otherwise replaced (the rename swaps the name, never
    writes through it)."""
    try:
        st = os.stat(item.path.name, dir_fd=item.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    parent = os.fstat(item.dir_fd)
    held = held_by_other(st, parent)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(
            errno.EISDIR, f"{item.path} is a directory" + (f" that {held}" if held else "") + "; nothing renamed"
        )
    if held and not has_capability(CAP_FOWNER):
        raise SinkRefused(f"{item.path} {held}; nothing renamed (choose a directory only root or wlidd can write)")


def _target_error(item: _Staged, exc: OSError) -> OSError:
    """The rename's error, naming the target and, when another user holds its name, saying so."""
    with contextlib.suppress(OSError):
        st = os.stat(item.path.name, dir_fd=item.dir_fd, follow_symlinks=False)
        held = held_by_other(st, os.fstat(item.dir_fd))
        if held:
            return SinkRefused(f"{item.path} {held}")
    return OSError(exc.errno, exc.strerror or str(exc), str(item.path))


def sweep_once(dir_fd: int, name: str, shown: str) -> None:
    """Remove `.name.*.tmp` files an earlier run left behind (a crash between create and rename), the
    first time this process writes `name` in this directory. Only regular files and links that root
    or the daemon's user own are removed: a name another user planted (in a sticky directory) is left
    alone and never blocks the write (temp names are random and created O_EXCL). One log line with
    the counts, however many there were; errors are logged, never raised."""
    st = os.fstat(dir_fd)
    key = (st.st_dev, st.st_ino, name)
    if key in _swept:
        return
    if len(_swept) >= _SWEPT_LIMIT:
        _swept.clear()
    _swept.add(key)
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{6,16}}\.tmp")
    trusted = trusted_uids()
    removed = foreign = failed = 0
    error = ""
    try:
        with os.scandir(dir_fd) as entries:
            stale = [entry.name for entry in entries if pattern.fullmatch(entry.name)]
    except OSError as exc:
        log.warning("stale temporary files not looked for", dir=shown, file=name, error=reason(exc))
        return
    for stale_name in stale:
        try:
            entry = os.stat(stale_name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(entry.st_mode):
                continue
            if entry.st_uid not in trusted:
                foreign += 1
                continue
            os.unlink(stale_name, dir_fd=dir_fd)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed += 1
            error = reason(exc)
    if removed or foreign or failed:
        log.info(
            "stale temporary files swept",
            dir=shown,
            file=name,
            removed=removed,
            left_to_other_users=foreign,
            failed=failed,
            **({"error": error} if error else {}),
        )


ADOPT_LIMIT = 1 << 20  # bytes of a plain file left by an older wlidd that are carried into the first generation


def new_file_ids(dir_fd: int) -> tuple[int, int]:
    """The owner and group a file created in this directory gets: wlidd's user, and the directory's group
    when it has the set-group-ID bit, else wlidd's group."""
    st = os.fstat(dir_fd)
    return os.geteuid(), st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()


def fd_file_is(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int,
    uid: int,
    gid: int,
    acl: bytes | None,
    same: Callable[[bytes, bytes], bool] = operator.eq,
) -> bool:
    """Whether `name` in the directory is a regular file (one link, not followed) whose content is `data`
    (by `same(on_disk, data)`), with this mode, owner, group and ACL (None: none beyond the mode)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > ADOPT_LIMIT:
            return False
        if same is operator.eq and st.st_size != len(data):
            return False
        if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (_mode_with_acl(mode, acl), uid, gid):
            return False
        if _acl_of(fd) != (None if acl is None else sorted(posix_acl.decode(acl))):
            return False
        content = bytearray()
        while len(content) <= ADOPT_LIMIT and (chunk := os.read(fd, 65536)):
            content += chunk
        return same(bytes(content), data)
    except (OSError, InvalidValue):  # InvalidValue: an ACL wlidd cannot read
        return False
    finally:
        os.close(fd)


def _mode_with_acl(mode: int, acl: bytes | None) -> int:
    """The mode the kernel shows for a file given `mode` and then `acl`: with named users or groups, the
    group bits are the ACL's mask (POSIX.1e; fs/posix_acl.c posix_acl_update_mode), so a 0600 key read
    by `readers` shows 0640."""
    if acl is None:
        return mode
    mask = next((e.perm for e in posix_acl.decode(acl) if e.tag == posix_acl.MASK), None)
    return mode if mask is None else (mode & ~0o070) | (mask << 3)


def _acl_of(fd: int) -> list[posix_acl.Entry] | None:
    """The file's access ACL entries, sorted; None when it has none beyond its mode. InvalidValue
    ("posix_acl") for one wlidd cannot read."""
    try:
        entries = posix_acl.decode(os.getxattr(fd, posix_acl.XATTR))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise
    if all(e.tag not in (posix_acl.USER, posix_acl.GROUP, posix_acl.MASK) for e in entries):
        return None  # the minimal ACL: what the mode says
    return sorted(entries)


def file_is(
    path: Path,
    data: bytes,
    mode: int,
    uid: int,
    gid: int,
    readers: Readers | None,
    same: Callable[[bytes, bytes], bool] = operator.eq,
) -> bool:
    """Whether `path` (its directory walked as open_dir does, the file not followed) already holds `data`
    (by `same`) with this mode, owner and group (-1: as a new file would get them) and the ACL for
    `readers`."""
    try:
        dir_fd = open_dir(path.parent, create=False)
    except OSError:
        return False
    try:
        default_uid, default_gid = new_file_ids(dir_fd)
        acl = posix_acl.file_acl(mode, readers.users, readers.groups) if readers else None
        uid, gid = default_uid if uid == -1 else uid, default_gid if gid == -1 else gid
        return fd_file_is(dir_fd, path.name, data, mode, uid, gid, acl, same)
    finally:
        os.close(dir_fd)
