"""The unit files, the example config and `make install`."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from wlidd.config import Config, load_config
from wlidd.svid.load.plans import read_certificate_config

ROOT = Path(__file__).resolve().parent.parent


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / name)
    return parser


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (.ci/run installs it)"
)
def test_the_service_unit_scores_an_exposure_of_at_most_2() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(ROOT / "systemd" / "wlidd.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for wlidd\.service: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) <= 2.0


def test_the_service_is_type_notify_with_reload_watchdog_and_its_directories() -> None:
    service = unit("wlidd.service")["Service"]
    assert service["Type"] == "notify" and service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"] and service["RuntimeDirectory"] == "wlidd" and service["StateDirectory"] == "wlidd"
    assert service["User"] == "wlidd" and service["ProtectSystem"] == "strict"
    assert "PrivateNetwork" not in service  # upstreams are reached over the network


def test_the_socket_unit_matches_the_default_unix_listener() -> None:
    socket_unit = unit("wlidd.socket")["Socket"]
    default = Config().listeners.unix
    assert socket_unit["ListenStream"] == str(default.path) and socket_unit["FileDescriptorName"] == "unix"
    assert socket_unit["SocketMode"] == "0660"


def _field_names(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[str]:
    """Every key of `model` and of the models its fields hold, at any depth of their types (a dict of a
    tagged union of models, as [identities.*] and [tokens.*], included)."""
    seen = seen if seen is not None else set()
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(name)
        types: list[object] = [field.annotation]
        while types:
            kind = types.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                if kind not in seen:
                    seen.add(kind)
                    names |= _field_names(kind, seen)
            else:
                types.extend(typing.get_args(kind))
    return names


def test_the_option_walk_reaches_the_keys_of_every_identity_source_and_token_flow() -> None:
    """The check below is only as good as this walk: the keys only one variant has are found."""
    assert {"dir", "certificate_config", "cert", "entra", "sts", "metadata", "tenant_id", "audience"} <= _field_names(
        Config
    )


def test_the_example_config_loads_and_names_every_option() -> None:
    config = load_config(ROOT / "etc" / "wlidd.toml", {})
    assert config.identities["default"].source == "gce"
    text = (ROOT / "etc" / "wlidd.toml").read_text()
    missing = sorted(name for name in _field_names(Config) if not re.search(rf"\b{name}\b", text))
    assert not missing, f"options missing from etc/wlidd.toml: {missing}"


def test_the_example_certificate_config_is_valid() -> None:
    cert, key = read_certificate_config(ROOT / "etc" / "certificate_config.json")
    assert cert.name == "cert.pem" and key.name == "key.pem"


SYSTEM_PYTHON = "/usr/bin/python3"  # what `make install` builds on by default


def _system_python_has_venv() -> bool:
    probe = [SYSTEM_PYTHON, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"]
    return Path(SYSTEM_PYTHON).exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(
    not _system_python_has_venv(), reason="needs /usr/bin/python3 >= 3.11 with venv (apt-get install python3-venv)"
)
def test_make_install_lays_out_a_relocatable_venv_on_the_system_python_units_and_config(tmp_path: Path) -> None:
    """Staged with DESTDIR, no installed file names DESTDIR or this checkout (scripts, pyvenv.cfg,
    bytecode, RECORD: every file read as bytes), and the venv's interpreter is the system one, which
    the unit's ProtectHome=yes / PrivateTmp=yes leave visible."""
    destdir = tmp_path / "root"
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "INSTALL_PYTHON", "ALLOW_HIDDEN_PYTHON")}
    result = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={destdir}", "PREFIX=/opt/wlidd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    prefix = destdir / "opt" / "wlidd"
    naming_the_build = [
        str(path)
        for path in destdir.rglob("*")
        if (path.is_symlink() and str(destdir) in os.readlink(path))
        or (path.is_file() and not path.is_symlink() and (str(destdir).encode() in path.read_bytes()))
        or (path.is_file() and not path.is_symlink() and str(ROOT).encode() in path.read_bytes())
    ]
    assert not naming_the_build, naming_the_build[:10]
    # bytecode shipped, compiled for /opt/wlidd
    assert any(prefix.rglob("wlidd/cli/__pycache__/__init__.cpython-*.pyc"))
    interpreter = os.path.realpath(prefix / "bin" / "python")
    hidden = ("/root/", "/home/", "/run/user/", "/tmp/", "/var/tmp/")
    assert interpreter.startswith("/usr/") and not any(h in interpreter + "/" for h in hidden), interpreter
    assert "home = /usr/bin" in (prefix / "pyvenv.cfg").read_text()
    assert (prefix / "bin" / "wlidd").read_text().startswith("#!/opt/wlidd/bin/python")
    version = subprocess.run(
        [prefix / "bin" / "python", prefix / "bin" / "wlidd", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("wlidd ")
    service = (destdir / "etc" / "systemd" / "system" / "wlidd.service").read_text()
    assert "ExecStart=/opt/wlidd/bin/wlidd run --config /etc/wlidd/wlidd.toml" in service
    assert (destdir / "etc" / "systemd" / "system" / "wlidd.socket").exists()
    installed = destdir / "etc" / "wlidd" / "wlidd.toml"
    assert (
        installed.read_text() == (ROOT / "etc" / "wlidd.toml").read_text()
        and oct(installed.stat().st_mode)[-3:] == "644"  # the unit runs as User=wlidd: it must read it
    )


def test_the_shipped_config_gives_the_socket_the_clients_group_the_service_belongs_to() -> None:
    """Without socket activation (wlidd.socket stopped, or wlidd started by hand) the socket wlidd binds was
    wlidd:wlidd 0660, and the members of wlidd-clients that the default [policy] allows got exit 4."""
    config = load_config(ROOT / "etc" / "wlidd.toml", {})
    group = unit("wlidd.socket")["Socket"]["SocketGroup"]
    assert config.listeners.unix.group == group
    assert group in unit("wlidd.service")["Service"]["SupplementaryGroups"].split()  # to chgrp the socket it binds
    assert group in config.policy.tokens.groups
