"""Callers: a peer's credentials resolved for the policy (a `wlidd.policy.Caller`, on which it decides).

`CallerCache` turns a request's `Peer` (wlidd.api.peers) into a Caller: an mTLS peer by its SPIFFE ID, a
Unix peer by its kernel credentials (SO_PEERCRED, SO_PEERGROUPS: wlidd.api.peer_credentials), a loopback
TCP peer by its socket's owner (wlidd.api.tcp_owner) with NSS groups. Names and NSS groups are resolved
in a worker thread (`unix_caller`: passwd/group lookups may go over the network) and cached as records.

When the policy has rules on units, executables or sha256 (`caller_of(peer, policy)`), a Unix caller
also gets its process's facts (`Caller.process`, or why not: `Caller.process_problem`), read through a
pidfd by the daemon's one `ProcessIdentifier` (wlidd.workload.proc) once per connection, never cached by
pid (a pid is reused; a connection's process is not). Without such rules nothing of /proc is read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import anyio
import anyio.to_thread

from wlidd.accounts import account_by_uid, member_of, user_name
from wlidd.api.peers import Peer
from wlidd.policy import Caller, Policy
from wlidd.svid.spiffeid import parse_spiffe_id
from wlidd.workload.model import Need, ProcessFacts
from wlidd.workload.proc import PROCESSES, ProcessIdentifier


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

    def __init__(
        self,
        ttl: float = 60.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        processes: ProcessIdentifier | None = None,
    ) -> None:
        self.processes = processes if processes is not None else PROCESSES
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

    async def caller_of(self, peer: Peer, policy: Policy | None = None) -> Caller:
        """The caller behind a request's `peer`: an mTLS peer by its SPIFFE ID (admitted by the mTLS gate,
        which set it; no lookup), a Unix peer by its kernel credentials (`get`) and, when `policy` has rules
        on units, executables or sha256 that its uid and groups pass, its process (`Policy.needs_for`; the
        executable's file only when `Policy.file_need` wants it), anyone else by its address alone (the policy grants
        it nothing that needs an identity)."""
        if peer.spiffe_id is not None:
            return Caller(spiffe_id=parse_spiffe_id(peer.spiffe_id), address=peer.address)
        if peer.uid is None or peer.gid is None or peer.pid is None:
            return Caller(address=peer.address)
        caller = await self.get(peer.pid, peer.uid, peer.gid, peer.groups)  # kernel groups
        if policy is None or not policy.reads_processes or peer.process is None:
            if policy is not None:
                self.processes.wanted = False  # (after a reload) accepts record nothing more
            return caller  # the hot path: no rule reads a caller's process
        self.processes.wanted = True  # accepts record what the pidfd_open path needs (wlidd.workload.proc)
        decided = peer.process.decided
        if decided is not None and decided[0] is caller and decided[1] is policy:
            return cast(Caller, decided[2])  # the same connection asking again (keep-alive, another call)
        need = policy.needs_for(caller)
        if not need:
            return caller

        def file_need(facts: ProcessFacts) -> Need:
            return policy.file_need(dataclasses.replace(caller, process=facts))

        facts, problem = await self.processes.identify(
            peer.process, need, key=policy, hash_if=file_need, owner=caller.uid
        )
        identified = dataclasses.replace(caller, process=facts, process_problem=problem)
        if facts is not None:  # a failure is tried again (its cause may pass: descriptors, a retry)
            peer.process.decided = (caller, policy, identified)
        return identified

    def known(self, peer: Peer, policy: Policy | None = None) -> Caller | None:
        """`caller_of(peer, policy)` when it needs no wait (a server answering at once): a Unix caller this
        cache holds (the same process asking again) whose process no rule of `policy` reads; None for
        anything else, which `caller_of` resolves."""
        if peer.spiffe_id is not None or peer.uid is None or peer.gid is None or peer.pid is None:
            return None
        if policy is not None and policy.reads_processes and peer.process is not None:
            return None
        hit = self._callers.get(Credentials(peer.pid, peer.uid, peer.gid, peer.groups))
        if hit is None or hit.expires < self.clock():
            return None
        if policy is not None:
            self.processes.wanted = False  # as caller_of: no rule reads a caller's process
        return hit.caller

    def _remember(self, table: dict[_K, _V], key: _K, value: _V) -> None:
        if len(table) >= self.max_entries and key not in table:  # pids come and go: keep this bounded
            table.clear()
        table[key] = value
