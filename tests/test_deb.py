"""The Debian package's sources (debian/) agree with the project: version, paths, users, units.

Building and installing the package is packaging/ci-deb-check.sh's job (root, about a minute)."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

import wlidd

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "debian"


def unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / name)
    return parser["Service" if name.endswith(".service") else "Socket"]


def exec_start() -> list[str]:
    return shlex.split(unit("wlidd.service")["ExecStart"])


def test_the_changelog_version_is_the_projects_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"^wlidd \(([^)]+)\) ", first)
    assert match, first
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert match.group(1) == project == wlidd.__version__


def test_the_virtualenv_goes_where_the_units_exec_start_runs_wlidd() -> None:
    rules = (DEBIAN / "rules").read_text()
    root = re.search(r"^export DH_VIRTUALENV_INSTALL_ROOT := (\S+)$", rules, re.MULTILINE)
    suffix = re.search(r"--install-suffix (\S+)", rules)
    assert root and suffix
    assert exec_start()[0] == f"{root.group(1)}/{suffix.group(1)}/bin/wlidd"
    assert re.search(rf"venv_tool\.py finish \S+ {root.group(1)}/{suffix.group(1)} ", rules)
    assert "--python $(PYTHON_BIN) --builtin-venv" in rules
    assert "$(or $(WLIDD_DEB_PYTHON),/usr/bin/python3)" in rules


def test_the_config_is_installed_where_the_unit_reads_it() -> None:
    source, target = (DEBIAN / "wlidd.install").read_text().split()
    argv = exec_start()
    assert "/" + target.rstrip("/") + "/" + Path(source).name == argv[argv.index("--config") + 1]
    assert source == "etc/wlidd.toml"


def test_postinst_creates_the_units_user_and_group_and_the_sockets_client_group() -> None:
    postinst = (DEBIAN / "wlidd.postinst").read_text()
    groups = set(re.findall(r"addgroup --system --quiet (\S+)", postinst))
    users = re.findall(r"adduser --system --quiet --ingroup (\S+) \\\n\s+--home (\S+) .*? (\S+)\n", postinst)
    service = unit("wlidd.service")
    assert groups == {service["Group"], unit("wlidd.socket")["SocketGroup"]}
    assert users == [(service["Group"], f"/var/lib/{service['StateDirectory']}", service["User"])]
    policy = tomllib.loads((ROOT / "etc" / "wlidd.toml").read_text())["policy"]["tokens"]
    assert unit("wlidd.socket")["SocketGroup"] in policy["groups"]


def test_the_units_are_neither_enabled_nor_started_and_are_stopped_on_removal() -> None:
    rules = (DEBIAN / "rules").read_text()
    assert "dh_installsystemd --no-enable --no-start --restart-after-upgrade" in rules
    prerm = (DEBIAN / "wlidd.prerm").read_text()
    assert "deb-systemd-invoke stop wlidd.service wlidd.socket" in prerm and '"$1" = remove' in prerm


def test_purge_removes_config_state_and_runtime_dirs_and_keeps_the_user() -> None:
    postrm = (DEBIAN / "wlidd.postrm").read_text()
    purge = re.search(r"^\s+purge\)\n(.*?);;", postrm, re.MULTILINE | re.DOTALL)
    assert purge
    service = unit("wlidd.service")
    removed = set(purge.group(1).split()) - {"rm", "-rf"}
    assert removed == {
        str(Path(exec_start()[0]).parent.parent),
        str(Path(exec_start()[exec_start().index("--config") + 1]).parent),
        f"/var/lib/{service['StateDirectory']}",
        f"/run/{service['RuntimeDirectory']}",
    }
    code = [line for line in postrm.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "deluser" in line or "delgroup" in line]


@pytest.mark.parametrize("script", ["wlidd.postinst", "wlidd.postrm", "wlidd.prerm", "../packaging/ci-deb-check.sh"])
def test_the_maintainer_scripts_and_the_ci_check_parse(script: str) -> None:
    path = DEBIAN / script
    shell = "bash" if path.suffix == ".sh" else "sh"
    assert path.read_text().startswith("#!/usr/bin/env bash\n" if shell == "bash" else "#!/bin/sh\n")
    subprocess.run([shell, "-n", path], check=True)
