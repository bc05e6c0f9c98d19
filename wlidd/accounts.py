"""Users and groups of this host: names to ids and back, and a user's groups, over NSS.

Every passwd and group lookup wlidd makes goes through here (policy rules, sink owners and readers, the
Unix sockets' owner and group, callers' names in messages, the client's "permission denied" message and
`wlidd check`'s service-user check). A config names users and groups by name or by number (a string of
digits is a number, as chown(1) takes it); a name this host does not know is None, never an exception,
so each caller says in its own words what was refused. Lookups may block (NSS can reach a directory
server over the network): callers on the event loop run them in a worker thread.

Imports nothing but the standard library: `wlidd.client` uses it and stays light (pwd, grp, os).
"""

from __future__ import annotations

import grp
import os
import pwd


def user_id(value: str | int) -> int | None:
    """A uid from a number or a user name; None for a name this host does not know."""
    if isinstance(value, int) or value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        return None


def group_id(value: str | int) -> int | None:
    """A gid from a number or a group name; None for a name this host does not know."""
    if isinstance(value, int) or value.isdigit():
        return int(value)
    return group_named(value)


def group_named(name: str) -> int | None:
    """The gid of the group called `name`, taken as a name even when it is all digits; None if unknown."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def user_name(uid: int) -> str:
    """The name of `uid`, or the number itself (as text) where this host has no passwd entry for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def group_name(gid: int) -> str:
    """The name of `gid`, or the number itself (as text) where this host has no group entry for it."""
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return str(gid)


def owner_names(st: os.stat_result) -> str:
    """`<user>:<group>` owning a file (numbers where no name is known), as messages name an owner."""
    return f"{user_name(st.st_uid)}:{group_name(st.st_gid)}"


def account_by_uid(uid: int) -> pwd.struct_passwd | None:
    """The passwd entry of `uid` (pw_name, pw_uid, pw_gid …), or None where this host has none."""
    try:
        return pwd.getpwuid(uid)
    except (KeyError, OverflowError):
        return None


def account_by_name(name: str) -> pwd.struct_passwd | None:
    """The passwd entry of the user `name` (pw_name, pw_uid, pw_gid …), or None where this host has none."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def member_of(user: str, gid: int) -> frozenset[int]:
    """Every group `user` is in according to the group database, with `gid` (its primary group, or the
    one it runs with) always among them (getgrouplist(3))."""
    return frozenset(os.getgrouplist(user, gid)) | {gid}
