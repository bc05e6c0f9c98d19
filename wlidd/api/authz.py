"""Who is calling, and may they have it.

Unix callers are identified by SO_PEERCRED (uid, gid, pid) on the accepted socket; their
supplementary groups come from the uid's passwd and group entries (os.getgrouplist). A rule
names users and groups by name or number; matchers return None (allowed) or a reason that names
the caller and what was refused, never a secret (go-spiffe spiffeid/match.go shape).
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from dataclasses import dataclass

import anyio
import anyio.to_thread

from wlidd.config import AccessRule
from wlidd.errors import SvidError
from wlidd.logs import get_logger
from wlidd.svid.model import SpiffeId
from wlidd.svid.spiffeid import parse_spiffe_id, parse_trust_domain

log = get_logger("wlidd.authz")


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


def _proc_net_address(host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} writes it: the IP's bytes in host order as hex, ':', the port in hex."""
    import ipaddress
    import struct

    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        hexed = f"{struct.unpack('=I', ip.packed)[0]:08X}"
    else:
        hexed = "".join(f"{struct.unpack('=I', ip.packed[i : i + 4])[0]:08X}" for i in range(0, 16, 4))
    return f"{hexed}:{port:04X}"


def loopback_peer_uid(remote: tuple[str, int], local: tuple[str, int], proc: str = "/proc/net") -> int | None:
    """The uid owning the client end of a loopback TCP connection (its local address is our remote).

    The kernel lists both ends; the client's has local = `remote` and rem = `local`. Returns None when
    no such socket is visible (another network namespace, or the client already closed).
    """
    wanted_local, wanted_remote = _proc_net_address(*remote), _proc_net_address(*local)
    candidates = []
    if ":" in remote[0]:
        candidates.append("tcp6")
    else:
        candidates += ["tcp", "tcp6"]  # an IPv4 client may sit on a dual-stack socket
        v4 = f"0000000000000000FFFF0000{wanted_local[:8]}{wanted_local[8:]}"
        v4_remote = f"0000000000000000FFFF0000{wanted_remote[:8]}{wanted_remote[8:]}"
    for table in candidates:
        try:
            with open(f"{proc}/{table}") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if len(fields) < 8:
                        continue
                    if (fields[1], fields[2]) == (wanted_local, wanted_remote) or (
                        table == "tcp6" and ":" not in remote[0] and (fields[1], fields[2]) == (v4, v4_remote)
                    ):
                        return int(fields[7])
        except OSError:
            continue
    return None


def unix_caller(pid: int | None, uid: int, gid: int | None) -> Caller:
    """Resolve a peer's groups from its passwd entry (a user without one has only its gid). With no
    gid (a TCP peer), the passwd entry's primary group stands in."""
    try:
        entry = pwd.getpwuid(uid)
        user = entry.pw_name
        gid = entry.pw_gid if gid is None else gid
        groups = frozenset(os.getgrouplist(user, gid)) | {gid}
    except KeyError:
        gid = uid if gid is None else gid
        user, groups = str(uid), frozenset({gid})
    return Caller(uid=uid, gid=gid, pid=pid, groups=groups, user=user)


@dataclass(frozen=True)
class Matcher:
    """A SPIFFE ID matcher: an exact ID, a trust domain (spiffe://td: any member), or a path pattern
    in which '*' is exactly one segment and a final '**' is one or more segments."""

    trust_domain: str
    segments: tuple[str, ...] | None  # None: any member of the trust domain
    text: str

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        if self.segments is None:
            return True
        parts = spiffe_id.path[1:].split("/") if spiffe_id.path else []
        pattern = self.segments
        if pattern and pattern[-1] == "**":
            head = pattern[:-1]
            return len(parts) > len(head) and all(p == "*" or p == s for p, s in zip(head, parts, strict=False))
        return len(parts) == len(pattern) and all(p == "*" or p == s for p, s in zip(pattern, parts, strict=True))


def parse_matcher(pattern: str) -> Matcher:
    """Parse a matcher, or ValueError saying what is wrong with it."""
    if not pattern.startswith("spiffe://"):
        raise ValueError(f"{pattern!r} is not a SPIFFE ID matcher (must start with spiffe://)")
    trust_domain, slash, path = pattern.removeprefix("spiffe://").partition("/")
    try:
        parse_trust_domain(trust_domain)
    except SvidError as exc:
        raise ValueError(f"{pattern!r}: {exc.message}") from None
    if not slash:
        return Matcher(trust_domain, None, pattern)
    segments = tuple(path.split("/"))
    for index, segment in enumerate(segments):
        if segment == "**" and index != len(segments) - 1:
            raise ValueError(f"{pattern!r}: '**' may only be the last segment")
        if segment not in ("*", "**"):
            try:
                parse_spiffe_id(f"spiffe://{trust_domain}/{segment}")
            except SvidError as exc:
                raise ValueError(f"{pattern!r}: {exc.message}") from None
    return Matcher(trust_domain, segments, pattern)


def match_any(spiffe_id: SpiffeId, matchers: tuple[Matcher, ...]) -> bool:
    return any(m.matches(spiffe_id) for m in matchers)


@dataclass(frozen=True)
class Rule:
    """An AccessRule with names resolved to ids and matchers parsed once, at start or reload."""

    uids: frozenset[int]
    gids: frozenset[int]
    text: str
    matchers: tuple[Matcher, ...] = ()

    def check(self, caller: Caller, what: str) -> str | None:
        if caller.uid in self.uids or caller.groups & self.gids:
            return None
        return f"{caller.describe()} may not have {what} (allowed: {self.text})"

    def check_spiffe(self, spiffe_id: SpiffeId, what: str, *, allow_without_matchers: bool) -> str | None:
        """For mTLS callers (already admitted by the listener's `allow`): this rule's spiffe_ids, if any."""
        if not self.matchers:
            return None if allow_without_matchers else f"{spiffe_id} may not have {what} (no spiffe_ids allowed for it)"
        if match_any(spiffe_id, self.matchers):
            return None
        return f"{spiffe_id} may not have {what} (allowed: {', '.join(m.text for m in self.matchers)})"


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
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        return None


def resolve_rule(rule: AccessRule, where: str) -> Rule:
    """Names to ids. A name that does not exist on this host is left out, with a warning once."""
    uids, gids = set(), set()
    for user in rule.users:
        if (uid := user_id(user)) is None:
            log.warning("policy names a user that does not exist; ignored", policy=where, user=str(user))
        else:
            uids.add(uid)
    for group in rule.groups:
        if (gid := group_id(group)) is None:
            log.info("policy names a group that does not exist; ignored", policy=where, group=str(group))
        else:
            gids.add(gid)
    parts = [
        f"users {', '.join(map(str, rule.users))}" if rule.users else "",
        f"groups {', '.join(map(str, rule.groups))}" if rule.groups else "",
    ]
    matchers = tuple(parse_matcher(p) for p in rule.spiffe_ids)
    return Rule(frozenset(uids), frozenset(gids), "; ".join(p for p in parts if p) or "nobody", matchers)


class Policy:
    """The resolved [policy]: a rule per token and per identity's credentials."""

    def __init__(
        self, tokens: dict[str, Rule], credentials: dict[str, Rule], default_token: Rule, default_credentials: Rule
    ) -> None:
        self._tokens = tokens
        self._credentials = credentials
        self._default_token = default_token
        self._default_credentials = default_credentials

    @classmethod
    def from_config(cls, policy: object) -> Policy:
        from wlidd.config import PolicyConfig

        assert isinstance(policy, PolicyConfig)
        return cls(
            {name: resolve_rule(rule, f"policy.token.{name}") for name, rule in policy.token.items()},
            {name: resolve_rule(rule, f"policy.identity.{name}") for name, rule in policy.identity.items()},
            resolve_rule(policy.tokens, "policy.tokens"),
            resolve_rule(policy.credentials, "policy.credentials"),
        )

    def token(self, name: str) -> Rule:
        return self._tokens.get(name, self._default_token)

    def credentials(self, identity: str) -> Rule:
        return self._credentials.get(identity, self._default_credentials)


class CallerCache:
    """Caller lookups (passwd/group, possibly over NSS) cost a syscall or a network round trip:
    do them in a worker thread, and keep each answer for `ttl` seconds."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[int, int | None], tuple[float, frozenset[int], str, int]] = {}
        self._callers: dict[tuple[int | None, int, int | None], tuple[float, Caller]] = {}

    async def get(self, pid: int | None, uid: int, gid: int | None) -> Caller:
        now = time.monotonic()
        known = self._callers.get((pid, uid, gid))
        if known is not None and known[0] >= now:
            return known[1]  # the hot path: the same process asking again
        hit = self._cache.get((uid, gid))
        if hit is None or hit[0] < now:
            resolved = await anyio.to_thread.run_sync(unix_caller, pid, uid, gid)
            hit = (now + self.ttl, resolved.groups, resolved.user, resolved.gid)
            self._cache[(uid, gid)] = hit
        caller = Caller(uid=uid, gid=hit[3], pid=pid, groups=hit[1], user=hit[2])
        if len(self._callers) >= 4096:  # pids come and go: keep this bounded
            self._callers.clear()
        self._callers[(pid, uid, gid)] = (hit[0], caller)
        return caller
