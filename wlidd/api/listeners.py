"""Listening sockets: the Unix socket with its mode and group (systemd activation comes later)."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
import tempfile
from pathlib import Path

from wlidd.errors import WlidError
from wlidd.sinks import open_dir


class ListenerError(WlidError):
    """A listener could not be set up (path in use, not a socket, bad group …)."""

    exit_code = 3
    reason = "listener"


def bind_unix_socket(
    path: Path, mode: int = 0o660, group: str | None = None, backlog: int = 128, owner: str | None = None
) -> socket.socket:
    """Bind a listening Unix socket at `path` with `mode`/`group`/`owner`, replacing only a stale socket.

    Every directory on the way must be one only root or the daemon's user can change (the sinks' rule,
    `wlidd.sinks.open_dir`: else another user could move the socket aside and put theirs in its place);
    missing ones are made. The socket is bound inside a private directory (0700, made next to `path`),
    given its owner, group and mode there — where no other user can swap the name for a link — and then
    renamed onto `path` in one step. So no chmod or chown ever follows a link another user planted, and the socket is never
    reachable with a wider mode than configured. Raises ListenerError naming the path and the reason.
    """
    gid = uid = None
    if owner is not None:
        try:
            uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise ListenerError(f"listeners.unix.owner: user {owner!r} does not exist") from None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenerError(f"listeners.unix.group: group {group!r} does not exist") from None
    try:  # every directory on the way: only root or our own user may change it (else refused)
        os.close(open_dir(path.parent, create=True))
    except OSError as exc:
        raise ListenerError(f"cannot bind Unix socket {path}: {exc.strerror or exc}") from None
    _remove_stale(path)
    try:
        private = Path(tempfile.mkdtemp(prefix=".wlidd-", dir=path.parent))  # 0700, ours
    except OSError as exc:
        raise ListenerError(f"cannot bind Unix socket {path}: {exc.strerror}") from None
    staged = private / "s"  # short: AF_UNIX paths are limited to 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(staged))
        if gid is not None or uid is not None:
            os.chown(staged, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
        os.chmod(staged, mode)  # a socket in our private directory: no one could have swapped it
        sock.listen(backlog)
        os.rename(staged, path)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind Unix socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
        with contextlib.suppress(OSError):
            os.unlink(staged)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenerError(f"{path}: cannot tell whether another daemon uses it: {exc.strerror}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        raise ListenerError(f"{path} is in use by another running process (is wlidd already running?)")
    finally:
        probe.close()
