"""POSIX access ACLs as the kernel stores them: the `system.posix_acl_access` extended attribute.

Pure encoding and decoding, so sinks can grant `readers` without a C library (pylibacl has no binary
wheel). The format is linux/posix_acl_xattr.h: a little-endian u32 version (2), then one 8-byte entry
per rule: u16 tag, u16 permission bits (r=4, w=2, x=1), u32 id (a uid or gid for USER and GROUP
entries, 0xFFFFFFFF otherwise). Entries are sorted by tag, then id; the kernel refuses anything else
(fs/posix_acl.c: posix_acl_valid): exactly one USER_OBJ, GROUP_OBJ and OTHER, a MASK whenever there
is a named USER or GROUP entry, ids unique within a tag.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wlidd.errors import InvalidValue

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
READ, WRITE, EXECUTE = 4, 2, 1
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
_NAMED = (USER, GROUP)


@dataclass(frozen=True, order=True)
class Entry:
    """One ACL rule; ordering (tag, then id) is the kernel's required order."""

    tag: int
    id: int
    perm: int


def encode(entries: Iterable[Entry]) -> bytes:
    """The xattr value for `entries` (sorted here). InvalidValue ("posix_acl") for an ACL the kernel would refuse."""
    ordered = sorted(entries)
    _validate(ordered)
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in ordered)


def decode(data: bytes) -> list[Entry]:
    """Entries of an xattr value. InvalidValue ("posix_acl") for a wrong version, a truncated value or an
    invalid ACL."""
    if len(data) < _HEADER.size or (len(data) - _HEADER.size) % _ENTRY.size:
        raise _refused(f"a POSIX ACL xattr is 4 + 8n bytes, not {len(data)}")
    (version,) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise _refused(f"POSIX ACL xattr version {version}, expected {VERSION}")
    entries = []
    for offset in range(_HEADER.size, len(data), _ENTRY.size):
        tag, perm, ident = _ENTRY.unpack_from(data, offset)
        entries.append(Entry(tag, ident, perm))
    _validate(entries)
    return entries


def from_mode(mode: int) -> list[Entry]:
    """The minimal ACL equivalent to a file mode's permission bits."""
    return [
        Entry(USER_OBJ, UNDEFINED_ID, (mode >> 6) & 7),
        Entry(GROUP_OBJ, UNDEFINED_ID, (mode >> 3) & 7),
        Entry(OTHER, UNDEFINED_ID, mode & 7),
    ]


def with_readers(base: Sequence[Entry], users: Iterable[int], groups: Iterable[int], perm: int) -> list[Entry]:
    """`base` plus `perm` for each named user and group, never taking a right away from anyone.

    The mask gains `perm`; when `base` had no mask, it becomes GROUP_OBJ's bits plus `perm` (what
    `setfacl -m` computes). An existing mask is only widened by `perm`, so a named entry it held back
    (say a `w`) stays held back.
    """
    named = {(e.tag, e.id): e.perm for e in base if e.tag in _NAMED}
    for uid in users:
        named[(USER, uid)] = named.get((USER, uid), 0) | perm
    for gid in groups:
        named[(GROUP, gid)] = named.get((GROUP, gid), 0) | perm
    fixed = {e.tag: e.perm for e in base if e.tag not in _NAMED}
    if MASK in fixed:
        mask = fixed[MASK] | perm
    else:
        mask = fixed.get(GROUP_OBJ, 0)
        for bits in named.values():
            mask |= bits
    entries = [Entry(tag, UNDEFINED_ID, bits) for tag, bits in fixed.items() if tag != MASK]
    entries += [Entry(tag, ident, bits) for (tag, ident), bits in named.items()]
    if named or MASK in fixed:
        entries.append(Entry(MASK, UNDEFINED_ID, mask))
    return sorted(entries)


def file_acl(mode: int, users: Iterable[int], groups: Iterable[int]) -> bytes:
    """The xattr value that gives a new file `mode` plus read access for `users` and `groups`."""
    return encode(with_readers(from_mode(mode), users, groups, READ))


def _validate(entries: Sequence[Entry]) -> None:
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        if entry.tag not in _TAGS:
            raise _refused(f"unknown POSIX ACL tag {entry.tag:#x}")
        if not 0 <= entry.perm <= 7:
            raise _refused(f"POSIX ACL permission {entry.perm} is not 0-7")
        if entry.tag in _NAMED:
            if not 0 <= entry.id < UNDEFINED_ID:
                raise _refused(f"POSIX ACL id {entry.id} out of range")
        elif entry.id != UNDEFINED_ID:
            raise _refused(f"POSIX ACL tag {entry.tag:#x} carries id {entry.id}")
        key = (entry.tag, entry.id)
        if key in seen:
            raise _refused(f"POSIX ACL repeats tag {entry.tag:#x} id {entry.id}")
        seen.add(key)
    tags = [e.tag for e in entries]
    if list(entries) != sorted(entries):
        raise _refused("POSIX ACL entries out of order")
    for required in (USER_OBJ, GROUP_OBJ, OTHER):
        if tags.count(required) != 1:
            raise _refused(f"a POSIX ACL needs exactly one entry with tag {required:#x}")
    if (USER in tags or GROUP in tags) and MASK not in tags:
        raise _refused("a POSIX ACL with named users or groups needs a mask")


def _refused(message: str) -> InvalidValue:
    return InvalidValue("posix_acl", message)
