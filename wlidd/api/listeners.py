"""Listening sockets: the Unix socket with its mode and group (systemd activation comes later)."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from pathlib import Path

from wlidd.errors import WlidError


class ListenerError(WlidError):
    """A listener could not be set up (path in use, not a socket, bad group …)."""

    exit_code = 3
    reason = "listener"


def bind_unix_socket(
    path: Path, mode: int = 0o660, group: str | None = None, backlog: int = 128, owner: str | None = None
) -> socket.socket:
    """Bind a listening Unix socket at `path` with `mode`/`group`, replacing only a stale socket.

    The socket is created under a tight umask, then opened up with chmod, so there is no window in
    which it is more open than configured.
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
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind Unix socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        if gid is not None or uid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot set up Unix socket {path}: {exc.strerror}") from None
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
