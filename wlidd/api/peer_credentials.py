"""A Unix socket peer's credentials, the kernel's: SO_PEERCRED (pid, uid, gid) and SO_PEERGROUPS (the
supplementary groups), both as they were when the caller called connect() (socket(7), unix(7)).

These are the groups the kernel itself checks the process against: a process stripped of its groups
(setgroups) has none, one given a group by systemd SupplementaryGroups= has it. Only where the kernel
offers nothing (a kernel older than Linux 4.13 without SO_PEERGROUPS) do the groups come from the uid's
passwd and group entries (`wlidd.accounts`, over NSS: wlidd.api.callers.unix_caller).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from wlidd.logs import get_logger

log = get_logger("wlidd.authz")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13 (include/uapi/asm-generic/socket.h)
_GROUPS_MAX = 65536  # NGROUPS_MAX on Linux (include/uapi/linux/limits.h)
_peergroups_missing_logged = False


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix socket peer, from SO_PEERCRED; None for other families."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The supplementary groups of a Unix socket's peer as the kernel recorded them at connect()
    (SO_PEERGROUPS: an array of gid_t). None when the kernel offers nothing: not a Unix socket, or a
    kernel without SO_PEERGROUPS (then callers fall back to NSS groups, see wlidd.api.callers.unix_caller).

    getsockopt(2) fails with ERANGE when the buffer is too small and then reports the size needed;
    Python's socket.getsockopt caps its buffer at 1024 bytes (256 groups), so a peer with more groups
    is read again through libc. A read that still fails gives no supplementary groups at all: group
    rights are never granted on a guess.
    """
    global _peergroups_missing_logged
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno == errno.ERANGE:
            return _peer_groups_libc(sock.fileno())
        if exc.errno != errno.ENOPROTOOPT:
            return frozenset()  # the peer is gone (ENOTCONN …): nothing to grant
        if not _peergroups_missing_logged:
            _peergroups_missing_logged = True
            log.warning("the kernel has no SO_PEERGROUPS (Linux < 4.13): callers' groups come from NSS instead")
        return None
    count = len(raw) // 4
    return frozenset(struct.unpack(f"={count}I", raw[: count * 4]))


def _peer_groups_libc(fd: int) -> frozenset[int]:
    """SO_PEERGROUPS for a peer with more than 256 groups, through libc getsockopt (see peer_groups)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = ctypes.c_uint32(_GROUPS_MAX * 4)
        buffer = (ctypes.c_uint32 * _GROUPS_MAX)()
        if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return frozenset(buffer[: size.value // 4])
    except (OSError, AttributeError) as exc:
        log.warning("cannot read a caller's groups; it is granted no group rights", error=str(exc))
        return frozenset()
