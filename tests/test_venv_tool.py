"""packaging/venv_tool.py: the interpreter check and the relocation of `make install`'s virtualenv."""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("venv_tool", ROOT / "packaging" / "venv_tool.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()
UNIT_HIDDEN = tool.unit_hidden_paths((ROOT / "systemd" / "wlidd.service").read_text())


def test_the_shipped_unit_hides_home_root_run_user_and_tmp_from_the_service() -> None:
    assert set(UNIT_HIDDEN) == {"/home", "/root", "/run/user", "/tmp", "/var/tmp"}
    assert UNIT_HIDDEN["/root"] == "ProtectHome=yes" and UNIT_HIDDEN["/tmp"] == "PrivateTmp=yes"


def test_protect_home_read_only_hides_nothing_and_inaccessible_paths_add_and_reset() -> None:
    unit = "[Service]\nProtectHome=read-only\nInaccessiblePaths=/srv\nInaccessiblePaths=\nInaccessiblePaths=-/data /x\n"
    assert tool.unit_hidden_paths(unit) == {"/data": "InaccessiblePaths=", "/x": "InaccessiblePaths="}
    assert tool.unit_hidden_paths("[Unit]\nProtectHome=yes\n") == {}  # only [Service] counts


def test_hidden_by_matches_the_directory_and_what_is_below_it_only() -> None:
    assert tool.hidden_by("/root", UNIT_HIDDEN) == "ProtectHome=yes hides /root"
    assert tool.hidden_by("/root/.pyenv/versions/3.11.7/bin/python3.11", UNIT_HIDDEN) is not None
    assert tool.hidden_by("/home/alice/venv/bin/python", UNIT_HIDDEN) is not None
    assert tool.hidden_by("/rootfs/usr/bin/python3", UNIT_HIDDEN) is None
    assert tool.hidden_by("/usr/bin/python3.11", UNIT_HIDDEN) is None


def test_symlink_hops_lists_every_link_on_the_way_and_the_real_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text("")
    (tmp_path / "b").symlink_to("real")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    assert tool.symlink_hops(str(tmp_path / "a")) == [str(tmp_path / "a"), str(tmp_path / "b"), str(real)]


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "INSTALL_PYTHON", "ALLOW_HIDDEN_PYTHON")}
    return subprocess.run(
        ["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=environ, check=False
    )


def test_make_install_refuses_an_interpreter_the_units_sandbox_hides(tmp_path: Path) -> None:
    """A symlink in a directory the unit cannot see (here the test's tmp dir, under PrivateTmp=yes):
    the venv would link to it, so the service could not start; nothing is installed."""
    if tool.hidden_by(str(tmp_path), UNIT_HIDDEN) is None:
        pytest.skip(f"{tmp_path} is not under a directory the unit hides")
    link = tmp_path / "python3"
    link.symlink_to(sys.executable)
    result = _make("install", f"INSTALL_PYTHON={link}", f"DESTDIR={tmp_path / 'root'}")
    assert result.returncode != 0
    assert f"refused: the service could not run this interpreter: it lives at {link}" in result.stderr
    assert "ALLOW_HIDDEN_PYTHON=1" in result.stderr
    assert not (tmp_path / "root").exists()
    allowed = subprocess.run(
        [link, ROOT / "packaging" / "venv_tool.py", "check-interpreter", "--allow-hidden"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no /usr/bin/python3")
def test_make_install_refuses_a_prefix_that_is_not_a_virtualenv(tmp_path: Path) -> None:
    """`venv --clear` would empty it: a PREFIX such as /usr/local is refused, its files kept."""
    data = tmp_path / "root" / "srv" / "data"
    data.mkdir(parents=True)
    (data / "keep").write_text("x")
    result = _make("install", "PREFIX=/srv/data", f"DESTDIR={tmp_path / 'root'}")
    if "refused: the service could not run" in result.stderr or "wlidd needs >=" in result.stderr:
        pytest.skip("the system interpreter itself is refused here")
    assert result.returncode != 0
    assert "is not empty and is not a virtualenv" in result.stderr
    assert (data / "keep").read_text() == "x"


def _venv_with_staged_names(staged: Path) -> Path:
    """A small venv at `staged` as pip leaves it under DESTDIR: a script, bytecode and a
    direct_url.json naming the build location. Returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", staged], check=True)
    site = next(staged.glob("lib/python3*/site-packages"))
    (site / "mod.py").write_text("VALUE = 1\n")
    subprocess.run([staged / "bin" / "python", "-m", "compileall", "-q", site / "mod.py"], check=True)
    (staged / "bin" / "tool").write_text(f"#!{staged}/bin/python\nimport mod\n")
    dist = site / "app-1.0.dist-info"
    dist.mkdir()
    (dist / "direct_url.json").write_text(json.dumps({"url": f"file://{ROOT}", "dir_info": {}}))
    (dist / "RECORD").write_text("mod.py,,\napp-1.0.dist-info/direct_url.json,,\napp-1.0.dist-info/RECORD,,\n")
    return site


def test_finish_makes_a_staged_venv_name_only_its_final_location(tmp_path: Path) -> None:
    staged = tmp_path / "stage" / "opt" / "app"
    site = _venv_with_staged_names(staged)
    assert tool.finish(staged, "/opt/app", []) == 0
    assert (staged / "bin" / "tool").read_text().startswith("#!/opt/app/bin/python\n")
    pyvenv = (staged / "pyvenv.cfg").read_text()
    assert str(staged) not in pyvenv and " -m venv --without-pip /opt/app\n" in pyvenv
    assert not (site / "app-1.0.dist-info" / "direct_url.json").exists()
    assert "direct_url.json" not in (site / "app-1.0.dist-info" / "RECORD").read_text()
    pyc = next((site / "__pycache__").glob("mod.*.pyc")).read_bytes()
    assert int.from_bytes(pyc[4:8], "little") == 0b11  # PEP 552 checked-hash
    relative = site.relative_to(staged)
    assert marshal.loads(pyc[16:]).co_filename == f"/opt/app/{relative}/mod.py"
    assert tool.find_mentions(staged, [str(staged)]) == []


def test_finish_fails_on_a_binary_file_that_names_the_staging_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    staged = tmp_path / "stage" / "opt" / "app"
    site = _venv_with_staged_names(staged)
    (site / "native.so").write_bytes(b"\x7fELF\0" + str(staged).encode() + b"\0")
    assert tool.finish(staged, "/opt/app", []) == 1
    assert f"not relocatable: {site / 'native.so'}: names {staged}" in capsys.readouterr().err


def test_an_interpreter_older_than_requires_python_is_refused_naming_the_variable_to_set() -> None:
    problems = tool.interpreter_problems({}, (99, 0), "DEB_PYTHON")
    assert problems == [
        f"{sys.executable} is Python {sys.version_info[0]}.{sys.version_info[1]}; wlidd needs >= 99.0 "
        "(pass DEB_PYTHON=/usr/bin/python3.X, e.g. from the python3.X package)"
    ]
    assert tool.required_python(ROOT / "pyproject.toml") == (3, 11)


def test_finish_makes_a_venv_built_under_a_strict_umask_readable_by_the_service(tmp_path: Path) -> None:
    """Built under umask 027 (the CIS default), the venv was 0750/0640 root: the unit's user could not
    import wlidd. finish leaves every directory 0755, files 0644, programs 0755, nothing group/other-writable."""
    staged = tmp_path / "stage" / "opt" / "app"
    site = _venv_with_staged_names(staged)
    programs = set()
    for path in [staged, *staged.rglob("*")]:
        if not path.is_symlink():
            program = path.is_file() and bool(path.stat().st_mode & 0o100)
            programs |= {path} if program else set()
            path.chmod(0o750 if path.is_dir() or program else 0o640)
    (site / "mod.py").chmod(0o666)  # group- and world-writable: no one but the owner may write
    assert tool.finish(staged, "/opt/app", []) == 0
    for path in [staged, *staged.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        expected = 0o755 if path.is_dir() or path in programs else 0o644
        assert mode == expected, (path.relative_to(staged), oct(mode))
