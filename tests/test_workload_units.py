"""wlidd.workload.units and .model: systemd's unit names and the unit a process's cgroup names, read from a
fake /proc tree (wlidd.workload.proc.ProcReader over tmp_path), and the selector values the config takes.

The expected units follow systemd's own table (src/test/test-cgroup-util.c: test_path_get_unit,
test_path_get_user_unit) and src/basic/cgroup-util.c for what a /proc/PID/cgroup file holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from wlidd.config import AccessRule, PolicyConfig
from wlidd.errors import InvalidValue
from wlidd.workload.model import Need, ProcessFacts, ProcessSelectors, check_executable, check_sha256
from wlidd.workload.proc import ProcReader
from wlidd.workload.units import (
    CgroupFacts,
    check_unit_selector,
    shift_path,
    template_of,
    unit_name_kind,
    unit_of_path,
    user_unit_of_path,
)

HYBRID_V1_ONLY = "12:pids:/system.slice/billing.service\n1:name=systemd:/system.slice/billing.service\n"

# (what the test names, /proc/PID/cgroup text, expected facts)
CGROUP_FILES: list[tuple[str, str, CgroupFacts]] = [
    (
        "a system service",
        "0::/system.slice/billing.service\n",
        CgroupFacts("/system.slice/billing.service", "billing.service"),
    ),
    (
        "a service's own sub-cgroup (Delegate=yes) still names the service",
        "0::/system.slice/billing.service/worker/x.service\n",
        CgroupFacts("/system.slice/billing.service/worker/x.service", "billing.service"),
    ),
    (
        "a template instance under its template's slice",
        "0::/system.slice/system-getty.slice/getty@tty1.service\n",
        CgroupFacts("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
    ),
    (
        "an escaped instance name stays as systemd writes it",
        "0::/system.slice/system-systemd\\x2dfsck.slice/systemd-fsck@dev-disk-by\\x2duuid-1234.service\n",
        CgroupFacts(
            "/system.slice/system-systemd\\x2dfsck.slice/systemd-fsck@dev-disk-by\\x2duuid-1234.service",
            "systemd-fsck@dev-disk-by\\x2duuid-1234.service",
        ),
    ),
    (
        "a name systemd escaped with a leading _ (it clashes with a controller's)",
        "0::/system.slice/_cpu.service\n",
        CgroupFacts("/system.slice/_cpu.service", "cpu.service"),
    ),
    (
        "a login session's scope",
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        CgroupFacts("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ),
    (
        "a user unit: the system unit is the user manager",
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n",
        CgroupFacts(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/x.service", "user@1000.service", "x.service"
        ),
    ),
    (
        "a unit started inside a login session is its user unit",
        "0::/user.slice/user-1000.slice/session-2.scope/foobar@pie.service/pa/po\n",
        CgroupFacts(
            "/user.slice/user-1000.slice/session-2.scope/foobar@pie.service/pa/po",
            "session-2.scope",
            "foobar@pie.service",
        ),
    ),
    (
        "the hybrid layout: the unified line counts, the v1 lines are ignored",
        "12:pids:/docker/abc\n1:name=systemd:/docker/abc\n0::/system.slice/billing.service\n",
        CgroupFacts("/system.slice/billing.service", "billing.service"),
    ),
    (
        "a container's cgroup is a path only",
        "0::/docker/0123456789abcdef\n",
        CgroupFacts("/docker/0123456789abcdef", problem="its cgroup /docker/0123456789abcdef names no systemd unit"),
    ),
    (
        "a path from outside wlidd's cgroup namespace names nothing",
        "0::/../../system.slice/billing.service\n",
        CgroupFacts(
            "/../../system.slice/billing.service",
            problem="its cgroup /../../system.slice/billing.service is outside wlidd's cgroup namespace",
        ),
    ),
    (
        "a v1-only (hybrid without a unified line) file names no unit",
        HYBRID_V1_ONLY,
        CgroupFacts(None, problem="it has no cgroup v2 (unified hierarchy) entry: a cgroup v1 only host"),
    ),
    ("the root cgroup names no unit", "0::/\n", CgroupFacts("/", problem="its cgroup / names no systemd unit")),
    (
        "a slice alone names no unit",
        "0::/system.slice\n",
        CgroupFacts("/system.slice", problem="its cgroup /system.slice names no systemd unit"),
    ),
    (
        "a zombie's ' (deleted)' suffix is cut",
        "0::/system.slice/billing.service (deleted)\n",
        CgroupFacts("/system.slice/billing.service", "billing.service"),
    ),
]


def fake_proc(root: Path, pid: int, cgroup: str, init: str | None = "0::/init.scope\n") -> ProcReader:
    """A /proc tree with /proc/<pid>/cgroup (and pid 1's, unless None) and a reader over it."""
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(cgroup)
    if init is not None:
        (root / "1").mkdir(exist_ok=True)
        (root / "1" / "cgroup").write_text(init)
    return ProcReader(root)


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in CGROUP_FILES], ids=[n for n, _, _ in CGROUP_FILES]
)
def test_a_proc_cgroup_file_gives_the_units_systemd_names(tmp_path: Path, text: str, expected: CgroupFacts) -> None:
    assert fake_proc(tmp_path, 4242, text).cgroup(4242) == expected


def test_paths_below_pid_1s_root_are_shifted_as_systemd_does_in_a_container_without_a_cgroup_namespace(
    tmp_path: Path,
) -> None:
    reader = fake_proc(
        tmp_path,
        77,
        "0::/machine.slice/libpod-1.scope/system.slice/app.service\n",
        "0::/machine.slice/libpod-1.scope/init.scope\n",
    )
    facts = reader.cgroup(77)
    assert facts.unit == "app.service" and facts.path == "/machine.slice/libpod-1.scope/system.slice/app.service"
    assert (
        shift_path("/foobar/waldo", "/foobar") == "/waldo" and shift_path("/foobar/waldo", "/other") == "/foobar/waldo"
    )


def test_without_pid_1s_cgroup_paths_are_taken_as_they_are(tmp_path: Path) -> None:
    assert fake_proc(tmp_path, 5, "0::/system.slice/a.service\n", init=None).cgroup(5).unit == "a.service"


# systemd's src/test/test-cgroup-util.c, test_path_get_unit and test_path_get_user_unit
SYSTEMD_UNITS = [
    ("/system.slice/foobar.service/sdfdsaf", "foobar.service"),
    ("/system.slice/getty@tty5.service/aaa/bbb", "getty@tty5.service"),
    ("/system.slice/getty@tty6.service/tty5", "getty@tty6.service"),
    ("sadfdsafsda", None),
    ("/system.slice/getty####@tty6.service/xxx", None),
    ("/system.slice/system-waldo.slice/foobar.service/sdfdsaf", "foobar.service"),
    ("/system.slice/system-waldo.slice/_cpu.service/sdfdsaf", "cpu.service"),
    ("/user.slice/user-1000.slice/user@1000.service/server.service", "user@1000.service"),
    ("/user.slice/user-1000.slice/user@.service/server.service", None),
]
SYSTEMD_USER_UNITS = [
    ("/user.slice/user-1000.slice/session-2.scope/foobar.service", "foobar.service"),
    ("/user.slice/user-1000.slice/session-2.scope/waldo.slice/foobar.service", "foobar.service"),
    ("/user.slice/user-1000.slice/session-2.scope/waldo/waldo/uuuux", None),
    ("/session-2.scope/foobar@pie.service/pa/po", "foobar@pie.service"),
    ("/xyz.slice/xyz-waldo.slice/session-77.scope/foobar@pie.service/pa/po", "foobar@pie.service"),
    ("/meh.service", None),
    ("/session-3.scope/_cpu.service", "cpu.service"),
    ("/user.slice/user-1000.slice/user@1000.service/server.service", "server.service"),
    ("/user.slice/user-1000.slice/user@.service/server.service", None),
    ("/user.slice/user-1000.slice/user@65535.service/server.service", None),  # the 16-bit -1 is no uid
    ("/system.slice/capsule@test.service/app.service", "app.service"),
]


@pytest.mark.parametrize(("path", "unit"), SYSTEMD_UNITS)
def test_the_system_unit_of_a_path_is_systemds(path: str, unit: str | None) -> None:
    assert unit_of_path(path) == unit


@pytest.mark.parametrize(("path", "unit"), SYSTEMD_USER_UNITS)
def test_the_user_unit_of_a_path_is_systemds(path: str, unit: str | None) -> None:
    assert user_unit_of_path(path) == unit


UNIT_NAMES = [
    ("billing.service", "plain"),
    ("session-3.scope", "plain"),
    ("getty@tty1.service", "instance"),
    ("getty@.service", "template"),
    ("systemd-fsck@dev-disk-by\\x2duuid.service", "instance"),
    ("a@b@c.service", "instance"),  # more @ in the instance
    ("billing", None),
    ("billing.unknown", None),
    (".service", None),
    ("@x.service", None),
    ("bill ing.service", None),
    ("billing/x.service", None),
    ("x" * 248 + ".service", None),  # 256 characters: systemd's names are shorter
    ("x" * 247 + ".service", "plain"),
]


@pytest.mark.parametrize(("name", "kind"), UNIT_NAMES)
def test_unit_names_follow_systemds_grammar(name: str, kind: str | None) -> None:
    assert unit_name_kind(name) == kind


def test_an_instance_names_its_template() -> None:
    assert template_of("getty@tty1.service") == "getty@.service"
    assert template_of("billing.service") is None and template_of("getty@.service") is None


def test_selector_values_are_refused_with_the_rule_they_break() -> None:
    with pytest.raises(InvalidValue, match="is not a systemd unit name") as unit:
        check_unit_selector("billing")
    assert unit.value.reason == "unit_name"
    with pytest.raises(InvalidValue, match="is a slice"):
        check_unit_selector("user.slice")
    for bad in ("usr/bin/app", "/usr/bin/../app", "/usr//bin/app", "/usr/bin/", "//usr/bin/app", "/", "/x (deleted)"):
        with pytest.raises(InvalidValue) as exe:
            check_executable(bad)
        assert exe.value.reason == "executable_path"
    assert check_executable("/usr/bin/app") == "/usr/bin/app"
    with pytest.raises(InvalidValue, match=r"64 hex digits \(lowercase\)"):
        check_sha256("A" * 64)
    with pytest.raises(InvalidValue, match="not a SHA-256 digest"):
        check_sha256("ab" * 31)
    assert check_sha256("ab" * 32) == "ab" * 32


def test_the_config_refuses_a_bad_selector_naming_its_key() -> None:
    with pytest.raises(ValidationError) as error:
        PolicyConfig.model_validate({"token": {"gcp": {"users": ["app"], "units": ["billing.service", "billing"]}}})
    assert "token.gcp.units" in str(error.value) and "'billing' is not a systemd unit name" in str(error.value)
    with pytest.raises(ValidationError, match="executables"):
        AccessRule.model_validate({"executables": ["bin/app"]})
    with pytest.raises(ValidationError, match="sha256"):
        AccessRule.model_validate({"sha256": ["xyz"]})
    rule = AccessRule.model_validate(
        {"units": ["worker@.service"], "executables": ["/usr/bin/app"], "sha256": ["0" * 64]}
    )
    assert (rule.units, rule.executables, rule.sha256) == (("worker@.service",), ("/usr/bin/app",), ("0" * 64,))


def test_selectors_say_which_kind_failed_first() -> None:
    selectors = ProcessSelectors(frozenset({"worker@.service"}), frozenset({"/usr/bin/app"}), frozenset({"a" * 64}))
    facts = ProcessFacts(9, Need.UNIT | Need.EXE | Need.SHA256, "/system.slice/worker@3.service", "worker@3.service")
    assert selectors.need == Need.UNIT | Need.EXE | Need.SHA256
    assert selectors.mismatch(facts) == "its executable was not read"
    facts = ProcessFacts(
        9, facts.read, facts.cgroup, facts.unit, exe="/usr/bin/app", sha256="b" * 64, exe_id=(8, 1), path_id=(8, 1)
    )
    assert selectors.mismatch(facts) == f"its executable's SHA-256 is {'b' * 64}"
    assert selectors.mismatch(facts, before_sha256=True) is None
    other = ProcessFacts(9, facts.read, unit="other.service", exe="/usr/bin/app")
    assert selectors.mismatch(other) == "its unit is other.service"
    nowhere = ProcessFacts(9, facts.read, unit_problem="its cgroup /docker/x names no systemd unit")
    assert selectors.mismatch(nowhere) == "its cgroup /docker/x names no systemd unit"


def test_an_executable_named_by_an_allowed_path_but_another_file_than_that_path_does_not_match() -> None:
    """/proc/PID/exe names a path in the caller's mount namespace: a bind mount there puts any file at the
    allowed path. The running file (st_dev, st_ino) must be the one the path names in wlidd's namespace."""
    selectors = ProcessSelectors(executables=frozenset({"/usr/bin/app"}))
    facts = ProcessFacts(9, Need.EXE, exe="/usr/bin/app", exe_id=(8, 99), path_id=(8, 1))
    assert selectors.mismatch(facts, before_file=True) is None  # by name alone it would
    assert "another file than /usr/bin/app in wlidd's mount namespace" in (selectors.mismatch(facts) or "")
    unchecked = ProcessFacts(9, Need.EXE, exe="/usr/bin/app", file_problem="its executable /usr/bin/app is on a fuse")
    assert selectors.mismatch(unchecked) == "its executable /usr/bin/app is on a fuse"
    same = ProcessFacts(9, Need.EXE, exe="/usr/bin/app", exe_id=(8, 1), path_id=(8, 1))
    assert selectors.mismatch(same) is None
