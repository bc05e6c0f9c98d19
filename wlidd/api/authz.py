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
from dataclasses import dataclass

import structlog

from wlidd.config import AccessRule

log = structlog.get_logger("wlidd.authz")


@dataclass(frozen=True)
class Caller:
    """A Unix caller: its ids and every group it belongs to."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int]
    user: str

    def describe(self) -> str:
        return f"uid {self.uid} ({self.user}) pid {self.pid}"


def unix_caller(pid: int, uid: int, gid: int) -> Caller:
    """Resolve a peer's supplementary groups from its passwd entry (a user without one has only its gid)."""
    try:
        entry = pwd.getpwuid(uid)
        user = entry.pw_name
        groups = frozenset(os.getgrouplist(user, gid)) | {gid}
    except KeyError:
        user, groups = str(uid), frozenset({gid})
    return Caller(uid=uid, gid=gid, pid=pid, groups=groups, user=user)


@dataclass(frozen=True)
class Rule:
    """An AccessRule with names resolved to ids once, at start or reload."""

    uids: frozenset[int]
    gids: frozenset[int]
    text: str

    def check(self, caller: Caller, what: str) -> str | None:
        if caller.uid in self.uids or caller.groups & self.gids:
            return None
        return f"{caller.describe()} may not have {what} (allowed: {self.text})"


def _uid(value: str | int) -> int | None:
    if isinstance(value, int) or value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        return None


def _gid(value: str | int) -> int | None:
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
        if (uid := _uid(user)) is None:
            log.warning("policy names a user that does not exist; ignored", policy=where, user=str(user))
        else:
            uids.add(uid)
    for group in rule.groups:
        if (gid := _gid(group)) is None:
            log.info("policy names a group that does not exist; ignored", policy=where, group=str(group))
        else:
            gids.add(gid)
    parts = [
        f"users {', '.join(map(str, rule.users))}" if rule.users else "",
        f"groups {', '.join(map(str, rule.groups))}" if rule.groups else "",
    ]
    return Rule(frozenset(uids), frozenset(gids), "; ".join(p for p in parts if p) or "nobody")


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
        self._cache: dict[tuple[int, int], tuple[float, frozenset[int], str]] = {}

    async def get(self, pid: int, uid: int, gid: int) -> Caller:
        import anyio
        import anyio.to_thread

        now = anyio.current_time()
        hit = self._cache.get((uid, gid))
        if hit is None or hit[0] < now:
            resolved = await anyio.to_thread.run_sync(unix_caller, pid, uid, gid)
            hit = (now + self.ttl, resolved.groups, resolved.user)
            self._cache[(uid, gid)] = hit
        return Caller(uid=uid, gid=gid, pid=pid, groups=hit[1], user=hit[2])
