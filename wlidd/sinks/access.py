"""Who may read and own a sink's files: `readers` resolved to ids and granted through POSIX ACLs
(wlidd.posix_acl) on files and directories, `owner`/`group` resolved to ids, this process's capabilities
(CAP_CHOWN, CAP_FOWNER: capabilities(7)), and names another user holds in a sticky directory.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from wlidd import posix_acl
from wlidd.accounts import group_id, user_id
from wlidd.config import CredentialSinkConfig, SinkConfig, SinkReaders
from wlidd.errors import InvalidValue
from wlidd.safedir import SinkRefused, trusted_uids

CAP_CHOWN, CAP_FOWNER = 0, 3  # capability numbers (linux/capability.h)


@dataclass(frozen=True)
class Readers:
    """Numeric ids granted read access (resolved from a sink's `readers` at write time)."""

    users: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)


def held_by_other(st: os.stat_result, parent: os.stat_result) -> str:
    """'belongs to uid N in a sticky directory: another user holds the name' when another user owns
    the entry in a sticky directory, else ''."""
    if st.st_uid in trusted_uids() or not parent.st_mode & stat.S_ISVTX:
        return ""
    return f"belongs to uid {st.st_uid} in a sticky directory: another user holds the name"


def set_acl(fd: int, acl: bytes, path: Path | str) -> None:
    try:
        os.setxattr(fd, posix_acl.XATTR, acl)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise OSError(
                exc.errno,
                "the file system does not support POSIX ACLs, which readers needs; files left as they were",
                str(path),
            ) from None
        raise


def grant_directory(dir_fd: int, readers: Readers, shown: str) -> None:
    """Give `readers` read and traverse (r-x) on the directory, unless everyone already has them.
    Entries already in its ACL are kept; its mask is only widened by r-x (wlidd.posix_acl.with_readers)."""
    st = os.fstat(dir_fd)
    if (st.st_mode & 0o005) == 0o005:  # everyone may already read and traverse it
        return
    try:
        base = posix_acl.decode(os.getxattr(dir_fd, posix_acl.XATTR))
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        base = posix_acl.from_mode(st.st_mode)
    except InvalidValue as exc:
        raise SinkRefused(f"directory {shown} has an ACL wlidd cannot read ({exc}): readers not granted") from None
    wanted = posix_acl.with_readers(base, readers.users, readers.groups, posix_acl.READ | posix_acl.EXECUTE)
    if wanted != sorted(base):
        set_acl(dir_fd, posix_acl.encode(wanted), shown)


def has_capability(bit: int) -> bool:
    """Whether this process holds capability number `bit` (CapEff in /proc/self/status,
    capabilities(7)); without /proc, whether it is root."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def owner_ids(sink: CredentialSinkConfig | SinkConfig) -> tuple[int, int]:
    """The sink's owner and group as ids (-1: leave as is); KeyError for a name this host does not know."""
    uid = -1 if sink.owner is None else user_id(sink.owner)
    gid = -1 if sink.group is None else group_id(sink.group)
    if uid is None:
        raise KeyError(f"no user {sink.owner!r}")
    if gid is None:
        raise KeyError(f"no group {sink.group!r}")
    return uid, gid


def resolve_readers(readers: SinkReaders) -> Readers:
    """Names to ids; KeyError for a user or group this host does not know (the sink is then not written:
    a missing reader is a configuration error, not a reason to hand out fewer rights silently)."""
    users, groups = [], []
    for user in readers.users:
        if (uid := user_id(user)) is None:
            raise KeyError(f"no user {user!r} (readers)")
        users.append(uid)
    for group in readers.groups:
        if (gid := group_id(group)) is None:
            raise KeyError(f"no group {group!r} (readers)")
        groups.append(gid)
    return Readers(tuple(sorted(set(users))), tuple(sorted(set(groups))))
