"""Callers: a peer's credentials resolved for the policy (a `wlidd.policy.Caller`, on which it decides).

`CallerCache` turns a request's `Peer` (wlidd.api.peers) into a Caller: an mTLS peer by its SPIFFE ID, a
Unix peer by its kernel credentials (SO_PEERCRED, SO_PEERGROUPS: wlidd.api.peer_credentials), a loopback
TCP peer by its socket's owner (wlidd.api.tcp_owner) with NSS groups. Names and NSS groups are resolved
in a worker thread (`unix_caller`: passwd/group lookups may go over the network) and cached as records.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread

from wlidd.accounts import account_by_uid, member_of, user_name
from wlidd.api.peers import Peer
from wlidd.policy import Caller
from wlidd.svid.spiffeid import parse_spiffe_id


def unix_caller(pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
    """A caller from its kernel credentials. `groups` are its supplementary groups from SO_PEERGROUPS
    (the kernel's own, see wlidd.api.peer_credentials.peer_groups); its gid is always one of its groups. With `groups` None (a
    TCP peer, or a kernel without SO_PEERGROUPS) they are resolved from the passwd entry over NSS (a
    user without one has only its gid); with no gid either (a TCP peer), the passwd entry's primary
    group stands in. The user name is looked up in every case, for messages and audit lines only.
    Blocks on NSS: `CallerCache` runs it in a worker thread."""
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
class Credentials:
    """A caller's credentials as a cache key: everything the kernel said of a Unix peer (pid, uid, gid,
    SO_PEERGROUPS), or a TCP peer's uid alone (pid, gid and groups None: NSS decides the rest)."""

    pid: int | None
    uid: int
    gid: int | None
    groups: frozenset[int] | None


@dataclass(frozen=True)
class CachedCaller:
    """A resolved caller and the monotonic time (seconds) after which it is resolved again."""

    expires: float
    caller: Caller


@dataclass(frozen=True)
class CachedName:
    """A uid's user name and the monotonic time (seconds) after which it is looked up again."""

    expires: float
    user: str


_K = TypeVar("_K")
_V = TypeVar("_V")


class CallerCache:
    """Callers by their credentials, resolved in a worker thread (passwd/group lookups may go over NSS:
    a syscall or a network round trip) and kept for `ttl` seconds (of `clock`, monotonic by default).

    A caller with kernel groups (Unix sockets) is keyed by everything the kernel said (pid, uid, gid,
    groups): two processes of one uid with different groups are different callers. Only the user name
    is shared per uid. A caller without (TCP) is keyed by (uid, gid) and gets NSS groups. Every table
    holds at most `max_entries` (cleared when full: each entry is cheap to resolve again).
    """

    def __init__(self, ttl: float = 60.0, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._nss: dict[Credentials, CachedCaller] = {}  # (uid, gid) -> NSS-resolved caller
        self._names: dict[int, CachedName] = {}  # uid -> user name
        self._callers: dict[Credentials, CachedCaller] = {}  # everything the kernel said -> caller

    async def get(self, pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
        """The caller with these credentials; `groups` from SO_PEERGROUPS, or None to resolve them over NSS."""
        now = self.clock()
        key = Credentials(pid, uid, gid, groups)
        known = self._callers.get(key)
        if known is not None and known.expires >= now:
            return known.caller  # the hot path: the same process asking again
        if groups is not None and gid is not None:
            named = self._names.get(uid)
            if named is None or named.expires < now:
                resolved = await anyio.to_thread.run_sync(unix_caller, pid, uid, gid, groups)
                named = CachedName(now + self.ttl, resolved.user)
                self._remember(self._names, uid, named)
            caller = Caller(uid=uid, gid=gid, pid=pid, groups=groups | {gid}, user=named.user)
            expires = named.expires
        else:
            nss_key = Credentials(None, uid, gid, None)
            hit = self._nss.get(nss_key)
            if hit is None or hit.expires < now:
                hit = CachedCaller(now + self.ttl, await anyio.to_thread.run_sync(unix_caller, pid, uid, gid))
                self._remember(self._nss, nss_key, hit)
            caller = Caller(uid=uid, gid=hit.caller.gid, pid=pid, groups=hit.caller.groups, user=hit.caller.user)
            expires = hit.expires
        self._remember(self._callers, key, CachedCaller(expires, caller))
        return caller

    async def caller_of(self, peer: Peer) -> Caller:
        """The caller behind a request's `peer`: an mTLS peer by its SPIFFE ID (admitted by the mTLS gate,
        which set it; no lookup), a Unix peer by its kernel credentials (`get`), anyone else by its
        address alone (the policy grants it nothing that needs an identity)."""
        if peer.spiffe_id is not None:
            return Caller(spiffe_id=parse_spiffe_id(peer.spiffe_id), address=peer.address)
        if peer.uid is None or peer.gid is None or peer.pid is None:
            return Caller(address=peer.address)
        return await self.get(peer.pid, peer.uid, peer.gid, peer.groups)  # kernel groups

    def _remember(self, table: dict[_K, _V], key: _K, value: _V) -> None:
        if len(table) >= self.max_entries and key not in table:  # pids come and go: keep this bounded
            table.clear()
        table[key] = value
