"""wlidd.policy with rules on units, executables and sha256: each kind a rule gives must match (AND), any
entry of a kind may (OR), as SPIRE's selectors; decided on values alone (the callers below carry the facts
wlidd.workload.proc would have read), with the refusal naming the selector that failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FileSet
from tests.test_cli import run_cli, write_config
from wlidd.config import AccessRule, PolicyConfig
from wlidd.emulator.ca import CertificateAuthority
from wlidd.policy import TCP_PROCESS, UNREAD, Caller, Policy, policy_warnings
from wlidd.svid.spiffeid import parse_spiffe_id
from wlidd.workload.model import Need, ProcessFacts

APP_HASH = "a" * 64
OTHER_HASH = "b" * 64
ALL = Need.UNIT | Need.EXE | Need.SHA256

CONFIG = PolicyConfig(
    tokens=AccessRule(users=("1000",)),
    credentials=AccessRule(users=("0",)),
    token={
        "billing": AccessRule(units=("billing.service",)),  # any uid in that unit
        "worker": AccessRule(users=("1000",), units=("worker@.service", "cron.service")),  # a template: any instance
        "binary": AccessRule(executables=("/usr/bin/app", "/usr/local/bin/app"), sha256=(APP_HASH,)),
        "all": AccessRule(
            groups=("2000",), units=("billing.service",), executables=("/usr/bin/app",), sha256=(APP_HASH,)
        ),
        "ghost": AccessRule(users=("no-such-user-wlidd",), units=("billing.service",)),  # who names nobody here
    },
)


def caller(uid: int = 1000, *, groups: frozenset[int] = frozenset(), **facts: object) -> Caller:
    """A local Unix caller whose process facts were read (ProcessFacts fields as keywords); a known exe is
    the file at its path in wlidd's namespace unless `exe_id`/`path_id` say otherwise."""
    if facts.get("exe") is not None:
        facts = {"exe_id": (8, 1), "path_id": (8, 1), **facts}
    process = ProcessFacts(4242, ALL, **facts)  # type: ignore[arg-type]
    return Caller(uid=uid, gid=uid, groups=groups | {uid}, pid=4242, user=f"u{uid}", process=process)


BILLING = caller(unit="billing.service", exe="/usr/bin/app", sha256=APP_HASH)
BILLING_AS_OTHER_UID = caller(
    1500, groups=frozenset({2000}), unit="billing.service", exe="/usr/bin/app", sha256=APP_HASH
)
REPORTS = caller(unit="reports.service", exe="/usr/bin/app", sha256=APP_HASH)  # same uid, another service
WORKER_3 = caller(unit="worker@3.service", exe="/usr/bin/worker")
REBUILT = caller(unit="billing.service", exe="/usr/local/bin/app", sha256=OTHER_HASH)
DELETED = caller(
    unit="billing.service",
    exe_problem="its executable was deleted or replaced since it started (/usr/bin/app (deleted))",
    sha256_problem="its executable was deleted or replaced since it started (/usr/bin/app (deleted))",
)
IN_CONTAINER = caller(cgroup="/docker/abc", unit_problem="its cgroup /docker/abc names no systemd unit")
EXITED = Caller(
    uid=1000,
    gid=1000,
    groups=frozenset({1000}),
    pid=4242,
    user="u1000",
    process_problem="the caller exited during identification",
)
TCP = Caller(uid=1000, gid=1000, groups=frozenset({1000}), user="u1000")  # the metadata listener: no pid, no process
MTLS = Caller(spiffe_id=parse_spiffe_id("spiffe://example.org/billing"), address="127.0.0.1:1")
WHO = "uid 1000 (u1000) pid 4242"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_config(CONFIG, log_unknown=False)


TABLE: list[tuple[Caller, str, str | None]] = [
    # units only: any uid in the unit, nobody outside it
    (BILLING, "billing", None),
    (BILLING_AS_OTHER_UID, "billing", None),
    (
        REPORTS,
        "billing",
        f"{WHO} may not have token 'billing': its unit is reports.service (allowed: units billing.service)",
    ),
    (
        IN_CONTAINER,
        "billing",
        f"{WHO} may not have token 'billing': its cgroup /docker/abc names no systemd unit (allowed: units billing.service)",
    ),
    # users AND units; a template entry admits every instance
    (WORKER_3, "worker", None),
    (
        BILLING,
        "worker",
        f"{WHO} may not have token 'worker': its unit is billing.service "
        "(allowed: users 1000; units cron.service, worker@.service)",
    ),
    (
        caller(1500, unit="worker@3.service"),
        "worker",
        "uid 1500 (u1500) pid 4242 may not have token 'worker' (allowed: users 1000; units cron.service, worker@.service)",
    ),
    # executables AND sha256, either executable
    (BILLING, "binary", None),
    (
        REBUILT,
        "binary",
        f"{WHO} may not have token 'binary': its executable's SHA-256 is {OTHER_HASH} "
        f"(allowed: executables /usr/bin/app, /usr/local/bin/app; sha256 {APP_HASH})",
    ),
    (
        WORKER_3,
        "binary",
        f"{WHO} may not have token 'binary': its executable is /usr/bin/worker "
        f"(allowed: executables /usr/bin/app, /usr/local/bin/app; sha256 {APP_HASH})",
    ),
    (
        DELETED,
        "binary",
        f"{WHO} may not have token 'binary': its executable was deleted or replaced since it started "
        f"(/usr/bin/app (deleted)) (allowed: executables /usr/bin/app, /usr/local/bin/app; sha256 {APP_HASH})",
    ),
    # every kind: groups AND unit AND executable AND hash
    (BILLING_AS_OTHER_UID, "all", None),
    (
        BILLING,
        "all",
        f"{WHO} may not have token 'all' (allowed: groups 2000; units billing.service; executables /usr/bin/app; "
        f"sha256 {APP_HASH})",
    ),
    # who names nobody on this host: process selectors alone do not open the rule to every uid
    (
        BILLING,
        "ghost",
        f"{WHO} may not have token 'ghost' (allowed: users no-such-user-wlidd; units billing.service)",
    ),
    # a process that could not be read, a TCP caller: refused by any process selector, saying why
    (
        EXITED,
        "billing",
        f"{WHO} may not have token 'billing': the caller exited during identification (allowed: units billing.service)",
    ),
    (TCP, "billing", f"uid 1000 (u1000) may not have token 'billing': {TCP_PROCESS} (allowed: units billing.service)"),
    # identified before a reload added the rule (an open Workload API stream): refused until it reconnects
    (
        Caller(uid=1000, gid=1000, groups=frozenset({1000}), pid=4242, user="u1000"),
        "billing",
        f"{WHO} may not have token 'billing': {UNREAD} (allowed: units billing.service)",
    ),
    # rules without process selectors decide as before, on uid and groups alone
    (TCP, "other", None),
    (EXITED, "other", None),
    # mTLS callers are decided by spiffe_ids only: a per-name rule without any admits none
    (
        MTLS,
        "billing",
        "spiffe://example.org/billing may not have token 'billing' ([policy.token.billing] lists no spiffe_ids)",
    ),
]


@pytest.mark.parametrize(("who", "name", "refusal"), TABLE)
def test_each_kind_of_selector_must_match_and_the_refusal_names_the_one_that_did_not(
    policy: Policy, who: Caller, name: str, refusal: str | None
) -> None:
    assert policy.may_have_token(who, name).refusal == refusal


def test_a_caller_is_read_only_for_the_selectors_of_rules_its_uid_and_groups_pass(policy: Policy) -> None:
    base = Caller(uid=1000, gid=1000, groups=frozenset({1000}), pid=1, user="u1000")
    assert policy.needs_for(base) == Need.UNIT | Need.EXE | Need.SHA256  # billing, worker, binary
    stranger = Caller(uid=1700, gid=1700, groups=frozenset({1700}), pid=2, user="u1700")
    assert policy.needs_for(stranger) == Need.UNIT | Need.EXE | Need.SHA256  # rules for any uid
    assert policy.needs_for(MTLS) == Need.NOTHING and policy.process_needs == ALL and policy.reads_processes
    plain = Policy.from_config(PolicyConfig(), log_unknown=False)
    assert plain.needs_for(base) == Need.NOTHING and not plain.reads_processes
    only_users = Policy.from_config(
        PolicyConfig(token={"t": AccessRule(users=("1000",), units=("a.service",))}), log_unknown=False
    )
    assert only_users.needs_for(stranger) == Need.NOTHING and only_users.needs_for(base) == Need.UNIT


def test_an_executable_is_hashed_only_for_a_caller_a_sha256_rule_admits_on_everything_else(policy: Policy) -> None:
    assert policy.hashes_for(caller(unit="x.service", exe="/usr/bin/app"))  # "binary": any uid, that path
    assert not policy.hashes_for(caller(unit="x.service", exe="/usr/bin/other"))
    assert not policy.hashes_for(TCP)


def test_a_policy_with_process_selectors_differs_from_one_without(policy: Policy) -> None:
    assert policy == Policy.from_config(CONFIG, log_unknown=False)
    changed = CONFIG.model_copy(update={"token": {**CONFIG.token, "billing": AccessRule(units=("other.service",))}})
    assert policy != Policy.from_config(changed, log_unknown=False)


def test_wlidd_check_warns_of_a_linked_or_missing_executable_and_of_selectors_on_the_metadata_token(
    tmp_path: Path,
) -> None:
    real = tmp_path / "app-1.2"
    real.write_bytes(b"\x7fELF")
    link = tmp_path / "app"
    link.symlink_to(real)
    config = PolicyConfig(
        tokens=AccessRule(users=("0",)),
        token={"gcp": AccessRule(users=("0",), executables=(str(link), str(real), str(tmp_path / "gone")))},
    )
    warnings = policy_warnings(config, metadata_token="gcp")
    assert warnings == [
        f"policy.token.gcp: executable '{link}' is a link to '{real}'; a process running it is named by that "
        "path (/proc/PID/exe), which the rule must list",
        f"policy.token.gcp: executable '{tmp_path / 'gone'}' does not exist on this host",
        "policy.token.gcp selects on units, executables or sha256, which the metadata listener's TCP callers "
        "cannot be checked against: it refuses them token 'gcp' (use the Unix socket)",
    ]
    assert policy_warnings(config, metadata_token="other") == warnings[:2]


def test_wlidd_check_warns_that_executables_or_sha256_alone_admit_anyone_who_can_run_the_file() -> None:
    alone = PolicyConfig(token={"gcp": AccessRule(sha256=("a" * 64,))})
    assert policy_warnings(alone) == [
        "policy.token.gcp selects on executables or sha256 only: anyone who can run that file has it (a process "
        "that connects then execs it, or LD_PRELOADs into it, lends or takes its rights); add users, groups or units"
    ]
    for bounded in (AccessRule(users=("0",), sha256=("a" * 64,)), AccessRule(units=("a.service",), sha256=("a" * 64,))):
        assert policy_warnings(PolicyConfig(token={"gcp": bounded})) == []


def test_wlidd_check_warns_that_rules_on_executables_need_cap_sys_ptrace_unless_the_unit_grants_it() -> None:
    config = PolicyConfig(token={"gcp": AccessRule(users=("0",), sha256=("a" * 64,))})
    (warning,) = policy_warnings(config, ptrace_granted=False)
    assert warning.startswith("policy.token.gcp select on executables or sha256, which need CAP_SYS_PTRACE")
    assert "/etc/systemd/system/wlidd.service.d/workloads.conf" in warning
    assert policy_warnings(config, ptrace_granted=True) == policy_warnings(config) == []
    units_only = PolicyConfig(token={"gcp": AccessRule(units=("a.service",))})
    assert policy_warnings(units_only, ptrace_granted=False) == []


def test_wlidd_check_warns_that_rules_on_units_need_the_unit_to_show_other_users_processes() -> None:
    """Under the shipped unit's ProtectProc=invisible, /proc/PID of another user's process is hidden: a rule
    on units refuses everyone but wlidd's own user, and `wlidd check` said nothing of it."""
    from wlidd.cli import hidden_process_warnings

    units_only = PolicyConfig(token={"gcp": AccessRule(units=("a.service",))})
    (warning,) = hidden_process_warnings(units_only, False)
    assert warning.startswith("policy.token.gcp select on units") and "ProtectProc=invisible" in warning
    assert "/etc/systemd/system/wlidd.service.d/workloads.conf" in warning
    assert hidden_process_warnings(units_only, True) == hidden_process_warnings(units_only, None) == []
    users_only = PolicyConfig(token={"gcp": AccessRule(users=("0",))})
    assert hidden_process_warnings(users_only, False) == []


def test_wlidd_check_prints_the_metadata_listeners_warning(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    extra = """
[tokens.gcp]
flow = "gce-metadata"
[policy.token.gcp]
units = ["app.service"]
[listeners.metadata]
token = "gcp"
email = "app@project.iam.gserviceaccount.com"
"""
    result = run_cli("check", "--config", str(write_config(tmp_path, files, extra)))
    assert (
        "warning: policy.token.gcp selects on units, executables or sha256, which the metadata listener's TCP "
        "callers cannot be checked against: it refuses them token 'gcp' (use the Unix socket)"
    ) in result.stdout.splitlines()
