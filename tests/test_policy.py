"""wlidd.policy: who may have what, decided on values alone (no socket, no NSS lookup, no clock).

One table of (decision, caller, name) rows against one resolved policy whose rules name users and groups
by number, so building it asks NSS nothing either. The edges (the local API's routes, the metadata API,
the Workload API) decide through these methods only: a test below reads their source to hold them to it.
"""

from __future__ import annotations

import ast
import grp
import os
import pwd
from pathlib import Path

import pytest

from wlidd.config import AccessRule, PolicyConfig
from wlidd.policy import Caller, Decision, Policy, may_use_listener
from wlidd.svid.spiffeid import parse_matcher, parse_spiffe_id

ROOT_DIR = Path(__file__).resolve().parents[1]

CONFIG = PolicyConfig(
    tokens=AccessRule(users=("1000",), groups=("2000",)),  # [policy.tokens]: the default token rule
    credentials=AccessRule(users=("0",)),  # [policy.credentials]: no spiffe_ids
    token={
        "gcp": AccessRule(users=("1001",), spiffe_ids=("spiffe://example.org/ci/*",)),
        "plain": AccessRule(users=("1002",)),  # per-name, no spiffe_ids: no mTLS caller at all
    },
    identity={"web": AccessRule(groups=("3000",), spiffe_ids=("spiffe://example.org/web",))},
)

ALICE = Caller(uid=1000, gid=1000, groups=frozenset({1000}), pid=10, user="alice")
IN_GROUP = Caller(uid=1500, gid=1500, groups=frozenset({1500, 2000}), pid=11, user="bob")
ROOT = Caller(uid=0, gid=0, groups=frozenset({0}), pid=1, user="root")
WEB_GROUP = Caller(uid=33, gid=33, groups=frozenset({33, 3000}), pid=12, user="www-data")
TCP_PEER = Caller(uid=1001, gid=1001, groups=frozenset({1001}), user="carol")  # metadata: no pid
CI = Caller(spiffe_id=parse_spiffe_id("spiffe://example.org/ci/build"), address="127.0.0.1:40000")
WEB = Caller(spiffe_id=parse_spiffe_id("spiffe://example.org/web"), address="127.0.0.1:40001")
ANONYMOUS = Caller(address="10.0.0.7:5555")


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_config(CONFIG, log_unknown=False)


# (decision, caller, name, the refusal or None when allowed)
TABLE: list[tuple[str, Caller, str, str | None]] = [
    # tokens: a local caller by uid or group, [policy.token.<name>] replacing [policy.tokens]
    ("token", ALICE, "other", None),
    ("token", IN_GROUP, "other", None),
    ("token", ROOT, "other", "uid 0 (root) pid 1 may not have token 'other' (allowed: users 1000; groups 2000)"),
    ("token", ALICE, "gcp", "uid 1000 (alice) pid 10 may not have token 'gcp' (allowed: users 1001)"),
    ("token", TCP_PEER, "gcp", None),
    ("token", IN_GROUP, "plain", "uid 1500 (bob) pid 11 may not have token 'plain' (allowed: users 1002)"),
    # tokens: an mTLS caller by spiffe_ids; a default rule without any admits it, a per-name one does not
    ("token", CI, "gcp", None),
    (
        "token",
        WEB,
        "gcp",
        "spiffe://example.org/web may not have token 'gcp' (allowed: spiffe://example.org/ci/*)",
    ),
    ("token", CI, "other", None),
    (
        "token",
        CI,
        "plain",
        "spiffe://example.org/ci/build may not have token 'plain' ([policy.token.plain] lists no spiffe_ids)",
    ),
    # anyone else: nothing that needs an identity
    ("token", ANONYMOUS, "other", "token 'other' is only handed to local Unix callers on this listener"),
    # credentials: a default rule without spiffe_ids admits no mTLS caller (a key goes to callers named for it)
    ("credentials", ROOT, "default", None),
    (
        "credentials",
        ALICE,
        "default",
        "uid 1000 (alice) pid 10 may not have the credentials of 'default' (allowed: users 0)",
    ),
    (
        "credentials",
        CI,
        "default",
        "spiffe://example.org/ci/build may not have the credentials of 'default' (no spiffe_ids allowed for it)",
    ),
    ("credentials", WEB, "web", None),
    ("credentials", WEB_GROUP, "web", None),
    ("credentials", ROOT, "web", "uid 0 (root) pid 1 may not have the credentials of 'web' (allowed: groups 3000)"),
    (
        "credentials",
        ANONYMOUS,
        "default",
        "the credentials of 'default' is only handed to local Unix callers on this listener",
    ),
]


def decide(policy: Policy, decision: str, caller: Caller, name: str) -> Decision:
    if decision == "token":
        return policy.may_have_token(caller, name)
    return policy.may_have_credentials(caller, name)


@pytest.mark.parametrize(("decision", "caller", "name", "refusal"), TABLE)
def test_each_decision_allows_or_refuses_with_a_reason_naming_the_caller_and_what_it_asked_for(
    policy: Policy, decision: str, caller: Caller, name: str, refusal: str | None
) -> None:
    decided = decide(policy, decision, caller, name)
    assert decided.refusal == refusal
    assert decided.allowed is (refusal is None)
    assert decided.what == (f"token {name!r}" if decision == "token" else f"the credentials of {name!r}")


def test_the_workload_api_gets_the_identities_whose_credentials_the_caller_may_have_in_order(policy: Policy) -> None:
    names = ["web", "default", "db"]
    assert policy.identities_for(ROOT, names) == ["default", "db"]  # [policy.credentials] for the unnamed ones
    assert policy.identities_for(WEB_GROUP, names) == ["web"]
    assert policy.identities_for(ALICE, names) == []
    assert policy.identities_for(WEB, names) == ["web"]


@pytest.mark.parametrize("caller", [ALICE, ROOT, CI, ANONYMOUS], ids=["local", "root", "mtls", "anonymous"])
def test_the_status_is_public_to_every_caller_a_listener_admits(policy: Policy, caller: Caller) -> None:
    assert policy.may_read_status(caller).allowed


def test_a_decision_asks_nss_nothing_names_are_resolved_when_the_policy_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Built from names, then every passwd and group lookup fails: the decisions still come out alike."""
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    named = Policy.from_config(
        PolicyConfig(tokens=AccessRule(users=(me,), groups=(group,)), credentials=AccessRule(groups=(group,))),
        log_unknown=False,
    )

    def refuse(*_: object) -> object:
        raise AssertionError("a decision looked a name up")

    for module, name in [
        (pwd, "getpwnam"),
        (pwd, "getpwuid"),
        (grp, "getgrnam"),
        (grp, "getgrgid"),
        (os, "getgrouplist"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    me_caller = Caller(uid=os.getuid(), gid=os.getgid(), groups=frozenset({os.getgid()}), pid=1, user=me)
    other = Caller(uid=4242, gid=4242, groups=frozenset({4242}), pid=2, user="4242")
    assert named.may_have_token(me_caller, "any").allowed
    assert named.may_have_credentials(me_caller, "any").allowed
    assert not named.may_have_token(other, "any").allowed
    assert named.identities_for(other, ["a", "b"]) == []


def test_caller_describe_names_a_local_caller_an_mtls_caller_and_an_address() -> None:
    assert ALICE.describe() == "uid 1000 (alice) pid 10"
    assert TCP_PEER.describe() == "uid 1001 (carol)"
    assert CI.describe() == "spiffe://example.org/ci/build"
    assert ANONYMOUS.describe() == "10.0.0.7:5555"
    assert ALICE.local and TCP_PEER.local and not CI.local and not ANONYMOUS.local


def test_two_policies_from_one_config_are_equal_and_a_changed_rule_is_not(policy: Policy) -> None:
    assert Policy.from_config(CONFIG, log_unknown=False) == policy
    changed = CONFIG.model_copy(update={"tokens": AccessRule(users=("1000",))})
    assert Policy.from_config(changed, log_unknown=False) != policy


# ---- the edges decide through wlidd.policy -------------------------------------------------------------
EDGES = ["wlidd/api/routes.py", "wlidd/api/metadata.py", "wlidd/workload_api/server.py"]


@pytest.mark.parametrize("path", EDGES)
def test_no_edge_applies_a_rule_itself_every_decision_is_a_policy_method(path: str) -> None:
    """Rule.check and Rule.check_spiffe are the policy's own steps: an edge that calls them decides
    beside the policy (as the routes, the metadata API and the Workload API each did)."""
    tree = ast.parse((ROOT_DIR / path).read_text())
    calls = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"check", "check_spiffe", "decide"}
    ]
    assert not calls, f"{path} applies a policy rule itself at lines {calls}: call a wlidd.policy.Policy decision"


# ---- the mTLS listener's own gate: its `allow` matchers --------------------------------------------------
LISTENER_ALLOW = (parse_matcher("spiffe://example.org/ci/*"), parse_matcher("spiffe://partner.org"))


@pytest.mark.parametrize(
    ("spiffe_id", "refusal"),
    [
        ("spiffe://example.org/ci/build", None),
        ("spiffe://partner.org/any/path", None),
        (
            "spiffe://example.org/web",
            "spiffe://example.org/web is not allowed on this listener "
            "(allowed: spiffe://example.org/ci/*, spiffe://partner.org)",
        ),
        (
            "spiffe://other.org/ci/build",
            "spiffe://other.org/ci/build is not allowed on this listener "
            "(allowed: spiffe://example.org/ci/*, spiffe://partner.org)",
        ),
    ],
)
def test_the_mtls_listener_admits_a_spiffe_id_its_allow_matches_and_names_the_allowed_ones_otherwise(
    spiffe_id: str, refusal: str | None
) -> None:
    decision = may_use_listener(parse_spiffe_id(spiffe_id), LISTENER_ALLOW)
    assert decision == Decision("the mTLS listener", refusal)
    assert decision.allowed is (refusal is None)


def test_the_mtls_gate_decides_its_allow_through_the_policy_not_by_matching_itself() -> None:
    """wlidd.api.mtls asks `may_use_listener`; a `match_any` of its own would decide beside the policy."""
    tree = ast.parse((ROOT_DIR / "wlidd/api/mtls.py").read_text())
    called = {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert "may_use_listener" in called and "match_any" not in called
