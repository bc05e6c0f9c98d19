"""Reaching a directory without following anyone else's links: the path walk every file wlidd writes or
binds goes through (credential and token sinks, pid files, the Unix sockets' directories).

The daemon may run as root while the directories it writes into are reachable by other users, so a path is
walked from / one component at a time (openat with O_NOFOLLOW), and each directory on the way must belong
to root or to the daemon's own user and must not be writable by anyone else (a sticky, world-writable
directory such as /tmp is accepted: others cannot move what root or the daemon put there, but any user may
hold a name there first, which is reported as such). A symbolic link is followed only when it, too, belongs
to root or the daemon's user. The caller then works relative to the descriptor it got, so nothing can swap
a parent midway. Otherwise a user could move a file or socket aside and put theirs in its place, or swap
a name for a link before a write, chmod or chown (CWE-59; openat(2), path_resolution(7)).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from wlidd.errors import SinkRefused as SinkRefused  # defined with every error (wlidd.errors); sinks import it here

MAX_SYMLINKS = 40  # links followed in one path walk, as the kernel's ELOOP limit (path_resolution(7))
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def trusted_uids() -> frozenset[int]:
    """The owners a directory, link or file on a written path may have: root and the daemon's effective uid."""
    return frozenset({0, os.geteuid()})


def _check_owner(st: os.stat_result, shown: str, what: str, *, sticky_parent: bool = False) -> None:
    """Refuse (SinkRefused) a `what` ("directory", "symbolic link" …) at `shown` that root or the daemon's user
    does not own; `sticky_parent` says it sits in a sticky directory, where another user may hold a name first."""
    if st.st_uid not in trusted_uids():
        held = " in a sticky directory: another user holds the name" if sticky_parent else ""
        raise SinkRefused(
            f"{what} {shown} belongs to uid {st.st_uid}{held}; every directory on the way must belong to root"
            f" or to wlidd's user (uid {os.geteuid()}), or its owner could swap in a link and steer the write"
        )


def _check_dir(st: os.stat_result, shown: str, *, sticky_parent: bool = False) -> None:
    """Refuse a directory that someone other than root or the daemon's user could change."""
    _check_owner(st, shown, "directory", sticky_parent=sticky_parent)
    writable = st.st_mode & 0o022
    if writable and not st.st_mode & stat.S_ISVTX:
        group = "its group (or a user or group its ACL names)"
        who = f"{group} and others" if writable == 0o022 else group if writable & 0o020 else "others"
        raise SinkRefused(
            f"directory {shown} (mode {stat.S_IMODE(st.st_mode):04o}) is writable by {who} without the sticky bit:"
            " they could replace the files or links in it; remove the group/other write bit"
        )


# long: one walk from / whose state (descriptor, components left, links followed) does not split
def open_dir(path: Path, *, create: bool) -> int:
    """A descriptor (O_DIRECTORY, close-on-exec; the caller closes it) for `path`, reached from / one
    component at a time with O_NOFOLLOW, each directory checked (`_check_dir`) on the descriptor that
    was opened. Links owned by root or the daemon's user are followed (at most MAX_SYMLINKS), others
    refused. With `create`, missing directories are made, mode 0755 whatever the umask (the files'
    own modes and ACLs decide who reads them).

    Raises SinkRefused for a path another user could steer, FileNotFoundError (without `create`),
    NotADirectoryError, or another OSError from the kernel.
    """
    todo = list(reversed(Path(os.path.abspath(path)).parts[1:]))  # a stack: next component last
    resolved: list[str] = []
    links = 0
    fd = _open_root()
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                    os.close(fd)
                    fd = -1
                    fd = _reopen(resolved)
                continue
            shown = "/" + "/".join([*resolved, name])
            created = False
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", shown) from None
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass  # made meanwhile: checked below like any other
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            sticky_parent = bool(os.fstat(fd).st_mode & stat.S_ISVTX)
            if stat.S_ISLNK(st.st_mode):
                _check_owner(st, shown, "symbolic link", sticky_parent=sticky_parent)
                links += 1
                if links > MAX_SYMLINKS:
                    raise SinkRefused(f"more than {MAX_SYMLINKS} symbolic links on the way to {path}")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = _open_root()
                    resolved = []
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", shown)
            child = os.open(name, OPEN_DIR, dir_fd=fd)
            try:
                opened = os.fstat(child)
                if created and opened.st_uid == os.geteuid():
                    os.fchmod(child, 0o755)
                    opened = os.fstat(child)
                _check_dir(opened, shown, sticky_parent=sticky_parent)
            except BaseException:
                os.close(child)
                raise
            os.close(fd)
            fd, resolved = child, [*resolved, name]
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _open_root() -> int:
    fd = os.open("/", OPEN_DIR)
    try:
        _check_dir(os.fstat(fd), "/")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopen(components: list[str]) -> int:
    """The directory /components..., whose every part was already walked (and checked) once."""
    fd = _open_root()
    try:
        for index, name in enumerate(components):
            child = os.open(name, OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            _check_dir(os.fstat(fd), "/" + "/".join(components[: index + 1]))
    except BaseException:
        os.close(fd)
        raise
    return fd
