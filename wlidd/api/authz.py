"""Who is calling, and may they have it.

Unix callers are identified by the kernel, from the accepted socket: SO_PEERCRED (pid, uid, gid)
and SO_PEERGROUPS (the supplementary groups), both as they were when the caller called connect()
(socket(7), unix(7)). These are the groups the kernel itself checks the process against: a process
stripped of its groups (setgroups) has none, one given a group by systemd SupplementaryGroups= has it.
Only where the kernel offers nothing (a loopback TCP peer on the metadata listener, or a kernel older
than Linux 4.13 without SO_PEERGROUPS) do the groups come from the uid's passwd and group entries
(`wlidd.accounts`, over NSS). A rule names users and groups by name or number, and mTLS callers by
SPIFFE ID matchers (`wlidd.svid.spiffeid`); its checks return None (allowed) or a reason that names the
caller and what was refused, never a secret (go-spiffe spiffeid/match.go shape).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from wlidd.accounts import account_by_uid, group_id, member_of, user_id, user_name
from wlidd.config import AccessRule, PolicyConfig
from wlidd.logs import AuditOnce, get_logger
from wlidd.svid.model import SpiffeId
from wlidd.svid.spiffeid import Matcher, match_any, parse_matcher

log = get_logger("wlidd.authz")
audit = get_logger("wlidd.audit")


@dataclass(frozen=True)
class Caller:
    """A local caller: its ids and every group it belongs to (pid unknown for TCP peers)."""

    uid: int
    gid: int
    pid: int | None
    groups: frozenset[int]
    user: str

    def describe(self) -> str:
        return f"uid {self.uid} ({self.user})" + (f" pid {self.pid}" if self.pid else "")


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13 (include/uapi/asm-generic/socket.h)
_GROUPS_MAX = 65536  # NGROUPS_MAX on Linux (include/uapi/linux/limits.h)
_peergroups_missing_logged = False


def peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The supplementary groups of a Unix socket's peer as the kernel recorded them at connect()
    (SO_PEERGROUPS: an array of gid_t). None when the kernel offers nothing: not a Unix socket, or a
    kernel without SO_PEERGROUPS (then callers fall back to NSS groups, see `unix_caller`).

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


def unix_caller(pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
    """A caller from its kernel credentials. `groups` are its supplementary groups from SO_PEERGROUPS
    (the kernel's own, see `peer_groups`); its gid is always one of its groups. With `groups` None (a
    TCP peer, or a kernel without SO_PEERGROUPS) they are resolved from the passwd entry over NSS (a
    user without one has only its gid); with no gid either (a TCP peer), the passwd entry's primary
    group stands in. The user name is looked up in every case, for messages and audit lines only."""
    if groups is not None:
        assert gid is not None, "kernel groups come with the kernel's gid"
        return Caller(uid=uid, gid=gid, pid=pid, groups=groups | {gid}, user=user_name(uid))
    account = account_by_uid(uid)
    if account is None:
        gid = uid if gid is None else gid
        return Caller(uid=uid, gid=gid, pid=pid, groups=frozenset({gid}), user=str(uid))
    gid = account.pw_gid if gid is None else gid
    return Caller(uid=uid, gid=gid, pid=pid, groups=member_of(account.pw_name, gid), user=account.pw_name)


@dataclass(frozen=True)
class Rule:
    """An AccessRule with names resolved to ids and matchers parsed once, at start or reload."""

    uids: frozenset[int]
    gids: frozenset[int]
    text: str
    matchers: tuple[Matcher, ...] = ()
    per_name: str = ""  # "policy.token.<name>" / "policy.identity.<name>" for a per-name rule, else ""
    unknown: tuple[tuple[str, str], ...] = ()  # ("user" | "group", name): names this host did not know

    def check(self, caller: Caller, what: str) -> str | None:
        if caller.uid in self.uids or caller.groups & self.gids:
            return None
        return f"{caller.describe()} may not have {what} (allowed: {self.text})"

    def check_spiffe(self, spiffe_id: SpiffeId, what: str, *, allow_without_matchers: bool) -> str | None:
        """For mTLS callers (already admitted by the listener's `allow`): None if this rule's spiffe_ids
        match, else why not. A rule without spiffe_ids admits them only if it is a default rule
        ([policy.tokens], [policy.credentials]) and `allow_without_matchers`: a per-name rule
        ([policy.token.X], [policy.identity.X]) names everyone it admits, so without spiffe_ids it
        admits no mTLS caller (users and groups say nothing about SPIFFE IDs)."""
        if not self.matchers:
            if self.per_name:
                return f"{spiffe_id} may not have {what} ([{self.per_name}] lists no spiffe_ids)"
            return None if allow_without_matchers else f"{spiffe_id} may not have {what} (no spiffe_ids allowed for it)"
        if match_any(spiffe_id, self.matchers):
            return None
        return f"{spiffe_id} may not have {what} (allowed: {', '.join(m.text for m in self.matchers)})"


def resolve_rule(rule: AccessRule, where: str) -> Rule:
    """Names to ids. A name that does not exist on this host is left out and kept in `Rule.unknown`
    (Policy.from_config logs each at warning, `wlidd check` prints them: `policy_warnings`). `where` is
    the rule's place in the config; "policy.token.<name>" and "policy.identity.<name>" make it a
    per-name rule (see Rule.check_spiffe). No logging here: resolving is pure but for the NSS lookups."""
    uids, gids, unknown = set(), set(), []
    for user in rule.users:
        if (uid := user_id(user)) is None:
            unknown.append(("user", str(user)))
        else:
            uids.add(uid)
    for group in rule.groups:
        if (gid := group_id(group)) is None:
            unknown.append(("group", str(group)))
        else:
            gids.add(gid)
    parts = [
        f"users {', '.join(map(str, rule.users))}" if rule.users else "",
        f"groups {', '.join(map(str, rule.groups))}" if rule.groups else "",
    ]
    matchers = tuple(parse_matcher(p) for p in rule.spiffe_ids)
    per_name = where if where.startswith(("policy.token.", "policy.identity.")) else ""
    text = "; ".join(p for p in parts if p) or "nobody"
    return Rule(frozenset(uids), frozenset(gids), text, matchers, per_name, tuple(unknown))


class Policy:
    """The resolved [policy]: a rule per token and per identity's credentials.

    Resolved once at start and at every reload (names may have been created or removed on the host
    since), never per request. Two policies are equal when they would decide every request alike and
    name the same unknown names: the daemon compares them to log "policy reloaded" only on a change.
    """

    def __init__(
        self, tokens: dict[str, Rule], credentials: dict[str, Rule], default_token: Rule, default_credentials: Rule
    ) -> None:
        self._tokens = tokens
        self._credentials = credentials
        self._default_token = default_token
        self._default_credentials = default_credentials

    @classmethod
    def from_config(cls, policy: PolicyConfig, *, log_unknown: bool = True) -> Policy:
        """Resolve a PolicyConfig; each user or group name this host does not know is logged at warning
        (once per call: per start or reload, bounded by the config's size), unless `log_unknown` is False."""
        resolved = cls._resolve(policy)
        if log_unknown:
            for where, kind, name in resolved.unknown_names():
                log.warning(f"policy names a {kind} that does not exist; ignored", policy=where, **{kind: name})
        return resolved

    @classmethod
    def _resolve(cls, policy: PolicyConfig) -> Policy:
        return cls(
            {name: resolve_rule(rule, f"policy.token.{name}") for name, rule in policy.token.items()},
            {name: resolve_rule(rule, f"policy.identity.{name}") for name, rule in policy.identity.items()},
            resolve_rule(policy.tokens, "policy.tokens"),
            resolve_rule(policy.credentials, "policy.credentials"),
        )

    def _rules(self) -> list[tuple[str, Rule]]:
        """(where in the config, rule) for every rule, in config order: defaults first."""
        return [
            ("policy.tokens", self._default_token),
            ("policy.credentials", self._default_credentials),
            *((f"policy.token.{name}", rule) for name, rule in self._tokens.items()),
            *((f"policy.identity.{name}", rule) for name, rule in self._credentials.items()),
        ]

    def unknown_names(self) -> list[tuple[str, str, str]]:
        """(where, "user" | "group", name) for every name a rule gives that this host did not know."""
        return [(where, kind, name) for where, rule in self._rules() for kind, name in rule.unknown]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return (self._tokens, self._credentials, self._default_token, self._default_credentials) == (
            other._tokens,
            other._credentials,
            other._default_token,
            other._default_credentials,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable holder: equality only

    def token(self, name: str) -> Rule:
        return self._tokens.get(name, self._default_token)

    def credentials(self, identity: str) -> Rule:
        return self._credentials.get(identity, self._default_credentials)


def policy_warnings(policy: PolicyConfig) -> list[str]:
    """`wlidd check`'s warnings for a PolicyConfig: one line per user or group name that does not exist
    on this host (the rule ignores it, as the daemon does, which logs the same at warning)."""
    return [
        f"{where}: {kind} {name!r} does not exist on this host; the rule ignores it (create it, then reload)"
        for where, kind, name in Policy.from_config(policy, log_unknown=False).unknown_names()
    ]


_K = TypeVar("_K")
_V = TypeVar("_V")


class CallerCache:
    """Callers by their credentials, resolved in a worker thread (passwd/group lookups may go over NSS:
    a syscall or a network round trip) and kept for `ttl` seconds.

    A caller with kernel groups (Unix sockets) is keyed by everything the kernel said (pid, uid, gid,
    groups): two processes of one uid with different groups are different callers. Only the user name
    is shared per uid. A caller without (TCP) is keyed by (uid, gid) and gets NSS groups. Every table
    holds at most `max_entries` (cleared when full: each entry is cheap to resolve again).
    """

    def __init__(self, ttl: float = 60.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._nss: dict[tuple[int, int | None], tuple[float, Caller]] = {}  # (uid, gid) -> NSS-resolved caller
        self._names: dict[int, tuple[float, str]] = {}  # uid -> user name
        self._callers: dict[tuple[int | None, int, int | None, frozenset[int] | None], tuple[float, Caller]] = {}

    async def get(self, pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
        """The caller with these credentials; `groups` from SO_PEERGROUPS, or None to resolve them over NSS."""
        now = time.monotonic()
        key = (pid, uid, gid, groups)
        known = self._callers.get(key)
        if known is not None and known[0] >= now:
            return known[1]  # the hot path: the same process asking again
        if groups is not None and gid is not None:
            named = self._names.get(uid)
            if named is None or named[0] < now:
                resolved = await anyio.to_thread.run_sync(unix_caller, pid, uid, gid, groups)
                named = (now + self.ttl, resolved.user)
                self._remember(self._names, uid, named)
            caller = Caller(uid=uid, gid=gid, pid=pid, groups=groups | {gid}, user=named[1])
            expiry = named[0]
        else:
            hit = self._nss.get((uid, gid))
            if hit is None or hit[0] < now:
                hit = (now + self.ttl, await anyio.to_thread.run_sync(unix_caller, pid, uid, gid))
                self._remember(self._nss, (uid, gid), hit)
            caller = Caller(uid=uid, gid=hit[1].gid, pid=pid, groups=hit[1].groups, user=hit[1].user)
            expiry = hit[0]
        self._remember(self._callers, key, (expiry, caller))
        return caller

    def _remember(self, table: dict[_K, _V], key: _K, value: _V) -> None:
        if len(table) >= self.max_entries and key not in table:  # pids come and go: keep this bounded
            table.clear()
        table[key] = value


def caller_fields(caller: Caller | str) -> dict[str, object]:
    """Audit fields naming a caller: uid, gid, pid and user of a local caller, or an mTLS SPIFFE ID."""
    if isinstance(caller, str):
        return {"spiffe_id": caller}
    return {"uid": caller.uid, "gid": caller.gid, "pid": caller.pid, "user": caller.user}


def handout_audit(
    seen: AuditOnce, event: str, caller: Caller | str, what: str, marker: Hashable, **fields: Any
) -> None:
    """Audit a secret handed out, at most once per uid (or SPIFFE ID), `what` and secret (`marker`: a
    token's expiry, a certificate's serial): the first hand-out is always a line naming the caller; the
    same secret to another process of that uid is a line through the repeat limiter (3 a minute, then
    counted: wlidd.logs), so a loop — even one that forks a process per request — cannot flood the trail.
    """
    who: Hashable = caller if isinstance(caller, str) else caller.uid
    first = seen.changed((event, who, what), marker)
    this_process = isinstance(caller, str) or seen.changed((event, who, what, caller.pid), marker)
    if first:
        audit.info(event, **fields, **caller_fields(caller))
    elif this_process and not isinstance(caller, str):
        audit.limited("info", event, key={"uid": caller.uid, "what": what}, pid=caller.pid, user=caller.user, **fields)
