"""Who may have what: the resolved [policy], the callers it decides on, and its decisions. Pure.

A `Policy` is built from a PolicyConfig once, at start and at every reload (`Policy.from_config`): user
and group names become ids there, over NSS (`wlidd.accounts`), and SPIFFE ID matchers are parsed there
(`wlidd.svid.spiffeid`), so a decision is a few set lookups on values: no socket, no NSS lookup, no
clock. Names this host does not know are left out of their rule and kept (`unknown_names`): logged at
warning by `from_config`, printed by `wlidd check` (`policy_warnings`).

A `Caller` is who asks, as an edge identified it (wlidd.api.peers: SO_PEERCRED and SO_PEERGROUPS on Unix
sockets, the owner of a loopback TCP socket, an mTLS client's SPIFFE ID):

    local caller     uid, gid, groups (every group it is in), pid (None for a TCP peer), user (its name);
                     on a Unix socket, when a rule selects on them, `process`: its unit, executable and
                     that file's SHA-256 (wlidd.workload.model.ProcessFacts, read while a pidfd named it
                     alive: wlidd.workload.proc), or `process_problem`: why they are unknown
    mTLS caller      spiffe_id (already admitted by the listener's `allow`), address
    anyone else      address only: may have nothing that needs an identity

The decisions, each a `Decision` (allowed, or the reason naming the caller and what it asked for, never
a secret; the go-spiffe spiffeid/match.go shape):

    A rule admits a local caller when each kind of selector it gives matches (SPIRE's way): who (its
    users or groups: either), its units, its executables, its sha256 (any entry of a kind); a rule with
    units, executables or sha256 and no users or groups admits any uid they match, a TCP caller never.

    may_have_token(caller, name)           a local caller by [policy.token.<name>] else [policy.tokens];
                                           an mTLS caller by that rule's spiffe_ids (none listed: the
                                           default rule admits it, a per-name rule does not)
    may_have_credentials(caller, name)     the same over [policy.identity.<name>] else [policy.credentials],
                                           except that a default rule without spiffe_ids admits no mTLS
                                           caller (a private key goes only to callers named for it)
    identities_for(caller, names)          the identities of `names` whose credentials the caller may have
                                           (the Workload API serves those)
    may_read_status(caller)                always: /v1/status, /v1/health, /v1/identity/<name> and /metrics
                                           hold names, states and public certificates, never a key or a
                                           token; the listener's own gate (socket mode, `allow`) decides
    needs_for(caller), file_need(caller)   what must be read of a local caller's process before a
                                           decision: the selectors of the rules its uid and groups pass
                                           (nothing: no /proc read); what of its executable's file (its
                                           identity, its hash) a rule still wants, given the rest
    may_use_listener(spiffe_id, allow)     the mTLS listener's own gate, before any rule: an mTLS client
                                           by its SPIFFE ID against the listener's `allow` matchers
                                           (a function: `allow` is the listener's, not [policy]'s)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from wlidd.accounts import group_id, user_id
from wlidd.config import AccessRule, PolicyConfig
from wlidd.logs import get_logger
from wlidd.svid.spiffeid import Matcher, SpiffeId, match_any, parse_matcher
from wlidd.workload.exefile import script_interpreter
from wlidd.workload.model import Need, ProcessFacts, ProcessSelectors

log = get_logger("wlidd.authz")
# a Unix caller identified before a reload added a rule on its process (an open Workload API stream)
UNREAD = "its process was not read when it was identified (a rule on it is newer: reconnect)"
TCP_PROCESS = (
    "it connected over TCP, where wlidd cannot tell its process (units, executables, sha256: Unix sockets only)"
)


@dataclass(frozen=True)
class Caller:
    """Who asks (see the module docstring): a local caller has a uid and a gid, an mTLS caller a
    `spiffe_id`, anyone else neither (its `address` only). `groups` holds every group of a local caller,
    its gid included; `user` is its name (the uid as text where the host has none), for messages only."""

    uid: int | None = None
    gid: int | None = None
    groups: frozenset[int] = frozenset()
    pid: int | None = None
    user: str = ""
    spiffe_id: SpiffeId | None = None
    address: str = ""
    process: ProcessFacts | None = None
    process_problem: str = ""

    @property
    def local(self) -> bool:
        """A process of this host, identified by the kernel: rules name it by uid and groups."""
        return self.spiffe_id is None and self.uid is not None and self.gid is not None

    def describe(self) -> str:
        """The caller as messages name it: `uid 1000 (alice) pid 42`, a SPIFFE ID, or an address."""
        if self.spiffe_id is not None:
            return str(self.spiffe_id)
        if self.uid is not None:
            return f"uid {self.uid} ({self.user or self.uid})" + (f" pid {self.pid}" if self.pid else "")
        return self.address or "an unidentified caller"


@dataclass(frozen=True)
class Decision:
    """A decision on one request: `what` the caller asked for, as messages name it ("token 'gcp'", "the
    credentials of 'default'"), and `refusal`: None when allowed, else why not (it names the caller and
    `what`, never a secret)."""

    what: str
    refusal: str | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class Rule:
    """An AccessRule with names resolved to ids and matchers parsed once, at start or reload."""

    uids: frozenset[int]
    gids: frozenset[int]
    text: str
    matchers: tuple[Matcher, ...] = ()
    per_name: str = ""  # "policy.token.<name>" / "policy.identity.<name>" for a per-name rule, else ""
    unknown: tuple[tuple[str, str], ...] = ()  # ("user" | "group", name): names this host did not know
    process: ProcessSelectors = field(default_factory=ProcessSelectors)
    who: bool = True  # the rule names users or groups (known here or not); False: any uid its process selectors match
    need: Need = Need.NOTHING  # what its process selectors read (`process.need`, computed once)
    reads: bool = False  # bool(need), kept as a plain bool: the hot path tests it on every decision

    def admits_who(self, caller: Caller) -> bool:
        """Whether the rule's users or groups name the local caller (a rule without any: any uid, if it
        selects on the process)."""
        return caller.uid in self.uids or bool(caller.groups & self.gids) or (self.reads and not self.who)

    def check(self, caller: Caller, what: str) -> str | None:
        """For local callers: None if this rule admits the caller (its uid or one of its groups, and its
        process selectors), else why not, naming the selector that failed."""
        if caller.uid in self.uids or caller.groups & self.gids or (self.reads and not self.who):
            if not self.reads:
                return None  # the hot path: no process selector, nothing more to look at
            if caller.process is None:
                why = TCP_PROCESS if caller.pid is None else caller.process_problem or UNREAD
            elif (why_not := self.process.mismatch(caller.process)) is None:
                return None
            else:
                why = why_not
            return f"{caller.describe()} may not have {what}: {why} (allowed: {self.text})"
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

    def decide(self, caller: Caller, what: str, *, spiffe_default: bool) -> Decision:
        """This rule's decision on `caller` asking for `what`: an mTLS caller by spiffe_ids (a default
        rule without any lets `spiffe_default` decide, `check_spiffe`), a local caller by uid and
        groups (`check`), anyone else refused."""
        if caller.spiffe_id is not None:
            return Decision(what, self.check_spiffe(caller.spiffe_id, what, allow_without_matchers=spiffe_default))
        if not caller.local:
            return Decision(what, f"{what} is only handed to local Unix callers on this listener")
        return Decision(what, self.check(caller, what))


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
    process = ProcessSelectors(frozenset(rule.units), frozenset(rule.executables), frozenset(rule.sha256))
    matchers = tuple(parse_matcher(p) for p in rule.spiffe_ids)
    per_name = where if where.startswith(("policy.token.", "policy.identity.")) else ""
    text = "; ".join([*(p for p in parts if p), *process.describe()]) or "nobody"
    who = bool(rule.users or rule.groups)
    need = process.need
    return Rule(
        frozenset(uids), frozenset(gids), text, matchers, per_name, tuple(unknown), process, who, need, bool(need)
    )


class Policy:
    """The resolved [policy]: a rule per token and per identity's credentials, and the decisions.

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
        self._selective = [rule for _, rule in self._rules() if rule.reads]  # rules that read the process
        self.reads_processes = bool(self._selective)  # False: no decision reads anything of /proc
        self.process_needs = Need.NOTHING  # what any rule reads of a caller's process
        for rule in self._selective:
            self.process_needs |= rule.need

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
        """The rule of the token `name`: [policy.token.<name>], else [policy.tokens]."""
        return self._tokens.get(name, self._default_token)

    def credentials(self, identity: str) -> Rule:
        """The rule of the identity's credentials: [policy.identity.<name>], else [policy.credentials]."""
        return self._credentials.get(identity, self._default_credentials)

    # ---- what a decision needs read of the caller's process ------------------------------------------

    def needs_for(self, caller: Caller) -> Need:
        """The facts of a local caller's process that the rules its uid and groups pass select on (those
        a decision on it may read); nothing for other callers and when no rule selects on a process."""
        need = Need.NOTHING
        if caller.local:
            for rule in self._selective:
                if rule.admits_who(caller):
                    need |= rule.need
        return need

    def file_need(self, caller: Caller) -> Need:
        """What of its executable's file some rule still wants of a local caller whose process facts are
        read but for the file (its unit, its executable's path): EXE (the file's identity, for
        executables) and SHA256 (its hash), from the rules that admit it on everything cheaper. wlidd
        touches the file only then (wlidd.workload.proc: off the event loop; a hash costs a whole read)."""
        facts = caller.process
        need = Need.NOTHING
        if facts is None:
            return need
        for rule in self._selective:
            wants = rule.need & (Need.EXE | Need.SHA256)
            if wants and rule.admits_who(caller) and rule.process.mismatch(facts, before_file=True) is None:
                need |= wants
        return need

    def hashes_for(self, caller: Caller) -> bool:
        """Whether some rule with sha256 admits the caller on everything else (`file_need`)."""
        return Need.SHA256 in self.file_need(caller)

    # ---- the decisions ---------------------------------------------------------------------------

    def may_have_token(self, caller: Caller, name: str) -> Decision:
        """May `caller` have the token `name`? (an mTLS caller: a default rule without spiffe_ids admits it)"""
        return self.token(name).decide(caller, f"token {name!r}", spiffe_default=True)

    def may_have_credentials(self, caller: Caller, identity: str) -> Decision:
        """May `caller` have the credentials (the private key) of `identity`? (an mTLS caller: only when a
        rule's spiffe_ids name it)"""
        return self.credentials(identity).decide(caller, f"the credentials of {identity!r}", spiffe_default=False)

    def identities_for(self, caller: Caller, names: Iterable[str]) -> list[str]:
        """The identities among `names`, in their order, whose credentials `caller` may have."""
        return [name for name in names if self.may_have_credentials(caller, name).allowed]

    def may_read_status(self, caller: Caller) -> Decision:
        """May `caller` read the daemon's status and the public parts of identities? Always (see the
        module docstring): what is public is public to every caller a listener admits."""
        return Decision("the daemon's status")


def may_use_listener(spiffe_id: SpiffeId, allow: tuple[Matcher, ...]) -> Decision:
    """May the mTLS client `spiffe_id` (its certificate already checked) use the listener whose `allow`
    matchers are `allow` ([listeners.mtls] allow)? Refused, the reason names the ID and what is allowed."""
    what = "the mTLS listener"
    if match_any(spiffe_id, allow):
        return Decision(what)
    return Decision(what, f"{spiffe_id} is not allowed on this listener (allowed: {', '.join(m.text for m in allow)})")


PTRACE_DROP_IN = "/etc/systemd/system/wlidd.service.d/workloads.conf"  # the README's drop-in


def policy_warnings(
    policy: PolicyConfig, *, metadata_token: str | None = None, ptrace_granted: bool | None = None
) -> list[str]:
    """`wlidd check`'s warnings for a PolicyConfig: one line per user or group name that does not exist
    on this host (the rule ignores it, as the daemon does, which logs the same at warning); per
    `executables` entry that is not the path the kernel would name (a symlink: /proc/PID/exe names its
    target, a script: its interpreter) or does not exist; per rule with executables or sha256 and no
    users, groups or units (anyone who can run that file has it); when `metadata_token` (the metadata
    listener's token, served over TCP) has a rule with process selectors, which its TCP callers can never
    match; and when `ptrace_granted` is False (the daemon's unit grants no CAP_SYS_PTRACE; None: not
    known, no warning) and a rule has executables or sha256, which then refuse other users' processes."""
    resolved = Policy.from_config(policy, log_unknown=False)
    warnings = [
        f"{where}: {kind} {name!r} does not exist on this host; the rule ignores it (create it, then reload)"
        for where, kind, name in resolved.unknown_names()
    ]
    for where, rule in resolved._rules():
        for path in sorted(rule.process.executables):
            real = os.path.realpath(path)
            if not os.path.exists(path):
                warnings.append(f"{where}: executable {path!r} does not exist on this host")
            elif real != path:
                warnings.append(
                    f"{where}: executable {path!r} is a link to {real!r}; a process running it is named by "
                    f"that path (/proc/PID/exe), which the rule must list"
                )
            elif (interpreter := script_interpreter(path)) is not None:
                warnings.append(
                    f"{where}: executable {path!r} is a script (#!{interpreter}): a process running it is named "
                    f"by its interpreter (/proc/PID/exe), so this entry never matches; listing the interpreter "
                    f"would admit every script it runs (use units, or a binary)"
                )
        if (rule.process.executables or rule.process.sha256) and not (rule.who or rule.process.units):
            warnings.append(
                f"{where} selects on executables or sha256 only: anyone who can run that file has it (a process "
                f"that connects then execs it, or LD_PRELOADs into it, lends or takes its rights); add users, "
                f"groups or units"
            )
    if metadata_token is not None and resolved.token(metadata_token).need:
        where = f"policy.token.{metadata_token}" if metadata_token in policy.token else "policy.tokens"
        warnings.append(
            f"{where} selects on units, executables or sha256, which the metadata listener's TCP callers cannot "
            f"be checked against: it refuses them token {metadata_token!r} (use the Unix socket)"
        )
    hashed = [where for where, rule in resolved._rules() if rule.process.executables or rule.process.sha256]
    if hashed and ptrace_granted is False:
        warnings.append(
            f"{', '.join(hashed)} select on executables or sha256, which need CAP_SYS_PTRACE to read other "
            f"users' /proc/PID/exe, and the wlidd unit grants none: they refuse every other user's process "
            f"(add the README's drop-in {PTRACE_DROP_IN})"
        )
    return warnings
