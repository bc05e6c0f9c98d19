"""Listening sockets: the Unix socket with its mode and group, where a socket accepts, and the process's
open files limit that the listeners' connection caps need (systemd activation: wlidd.systemd.listen_fds)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import resource
import socket
import stat
from pathlib import Path

from wlidd.accounts import group_named, user_id
from wlidd.errors import ListenerError
from wlidd.logs import get_logger
from wlidd.safedir import open_dir

log = get_logger("wlidd.api.listeners")


def bind_unix_socket(
    path: Path,
    mode: int = 0o660,
    group: str | None = None,
    backlog: int = socket.SOMAXCONN,
    owner: str | None = None,
) -> socket.socket:
    """Bind a listening Unix socket at `path` with `mode`/`group`/`owner` (the owner by name or number, the
    group by name), replacing only a stale socket.

    Every directory on the way must be one only root or the daemon's user can change (the sinks' rule,
    `wlidd.safedir.open_dir`: else another user could move the socket aside and put theirs in its place,
    or swap its name for a link before a chmod); missing ones are made. The socket file is born 0600
    (umask) and then given its mode and owner through an O_PATH descriptor opened without following
    links (`_set_mode_and_owner`). So it is never reachable with a wider mode than configured, and no
    link steers a chmod or chown. Raises ListenerError naming the path and the reason.
    """
    uid = None if owner is None else user_id(owner)
    if owner is not None and uid is None:
        raise ListenerError(f"listeners.unix.owner: user {owner!r} does not exist")
    gid = None if group is None else group_named(group)
    if group is not None and gid is None:
        raise ListenerError(f"listeners.unix.group: group {group!r} does not exist")
    try:  # every directory on the way: only root or our own user may change it (else refused)
        os.close(open_dir(path.parent, create=True))
    except OSError as exc:
        raise ListenerError(f"cannot bind Unix socket {path}: {exc.strerror or exc}") from None
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: never wider than configured, whatever happens next
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind Unix socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        _set_mode_and_owner(path, mode, uid, gid)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot set up Unix socket {path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _set_mode_and_owner(path: Path, mode: int, uid: int | None, gid: int | None) -> None:
    """chmod/chown the socket file just bound, through an O_PATH descriptor opened without following
    links and checked to be a socket: a link planted at `path` is refused, never followed."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, f"{path} is no longer the socket just bound")
        target = f"/proc/self/fd/{fd}"  # the very inode opened (fchmod does not take O_PATH descriptors)
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)
        os.chmod(target, mode)
    finally:
        os.close(fd)


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


def socket_address(sock: socket.socket) -> str:
    """Where a listening socket accepts: "127.0.0.1:9464", "[::1]:9464", or a Unix socket's path."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return name.decode(errors="replace").replace("\0", "@", 1) if isinstance(name, bytes) else str(name)
    host, port = str(name[0]), int(name[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(address: str) -> bool:
    """Whether "host:port" (as socket_address writes it) is a loopback address (IPv4-mapped ones too)."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def raise_open_files_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a local flood must meet our connection caps, not
    EMFILE); warn when even that is below `needed` descriptors. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit", soft=soft, hard=hard, error=str(exc))
    if soft < needed:
        log.warning(
            "the open files limit is below what the listeners' connection caps may hold; accept() may hit "
            "EMFILE first (handled, but set LimitNOFILE= higher)",
            limit=soft,
            needed=needed,
        )
    return soft
