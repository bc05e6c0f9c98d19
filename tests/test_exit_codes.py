"""Every exit code of the real `wlidd` process is named, listed in `--help`, and a socket the caller may not
use is told apart from a daemon that is not running (issue 16, faults 5 and 6)."""

from __future__ import annotations

import grp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FileSet
from tests.test_cli import run_cli, write_config
from wlidd.emulator.ca import CertificateAuthority

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")


def as_nobody(*command: str, groups: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`command` as uid/gid 65534 with exactly `groups` as supplementary groups, importing this tree's wlidd."""
    drop = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree's wlidd, not whichever one is installed
    return subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), *drop, *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=env,
    )


def run_as_nobody(*args: str, groups: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`python -m wlidd ARGS` as nobody."""
    return as_nobody(sys.executable, "-m", "wlidd", *args, groups=groups)


@pytest.fixture(scope="module")
def nobody_can_run_this_tree() -> None:
    """The tests that drop to nobody need this tree (not an installed copy) readable by that user."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return
    probe = as_nobody(sys.executable, "-c", "import wlidd; print(wlidd.__file__)")
    if probe.returncode != 0 or not probe.stdout.strip().startswith(str(REPO)):
        pytest.skip(
            f"uid {NOBODY} cannot import wlidd from {REPO} (a private directory?): {probe.stdout}{probe.stderr}"
        )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may search (pytest's tmp_path is 0700, which would hide the socket's own mode)."""
    path = Path(tempfile.mkdtemp(prefix="wlidd-exit-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listening_socket(path: Path, mode: int, gid: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    os.chown(path, 0, gid)
    path.chmod(mode)
    return sock


def test_every_error_exit_code_hint_is_a_named_exit_code() -> None:
    from wlidd.api.listeners import ListenerError
    from wlidd.cli.exit_codes import EXIT_CODE_MEANING, ExitCode
    from wlidd.errors import ConfigError, WlidError

    assert set(EXIT_CODE_MEANING) == set(ExitCode)
    assert ExitCode(ConfigError.exit_code) is ExitCode.CONFIG and ExitCode(ListenerError.exit_code) is ExitCode.LISTENER

    def subclasses(cls: type[WlidError]) -> list[type[WlidError]]:
        return [cls, *(found for sub in cls.__subclasses__() for found in subclasses(sub))]

    for cls in subclasses(WlidError):
        assert cls.exit_code in set(ExitCode), cls


def test_help_lists_every_exit_code_with_its_meaning() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    epilog = result.stdout.split("exit codes:", 1)[1]
    for code, name in (
        (0, "ok"),
        (1, "failure"),
        (2, "config"),
        (3, "listener"),
        (4, "no_access"),
        (130, "interrupted"),
    ):
        assert f"\n  {code:<4} {name}" in epilog, (code, epilog)
    assert "socket in use" in epilog


def test_a_socket_in_use_exits_3_as_listed(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    with listening_socket(tmp_path / "wlidd.sock", 0o660):  # another live process holds the path
        result = run_cli("run", "--config", str(write_config(tmp_path, files)))
    assert result.returncode == 3, result.stderr
    assert "is in use by another running process" in result.stderr and "Traceback" not in result.stderr
    assert "  3    listener" in run_cli("--help").stdout


def test_no_socket_says_the_daemon_is_not_running(tmp_path: Path) -> None:
    absent = tmp_path / "absent.sock"
    result = run_cli("status", "--socket", str(absent))
    assert result.returncode == 1
    assert f"wlidd: error: cannot reach wlidd at {absent}: no such socket (is the daemon running?)" in result.stderr


def test_a_socket_nobody_listens_on_says_the_daemon_is_not_running(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    listening_socket(stale, 0o660).close()  # the file stays, nothing listens
    result = run_cli("token", "gcp", "--socket", str(stale))
    assert result.returncode == 1
    assert f"cannot reach wlidd at {stale}: nothing listens on it (is the daemon running?)" in result.stderr


async def test_the_async_client_tells_not_running_apart(tmp_path: Path) -> None:
    from wlidd.client import AsyncClient, ClientError

    async with AsyncClient(tmp_path / "absent.sock") as client:
        with pytest.raises(ClientError) as caught:
            await client.status()
    assert caught.value.reason == "not_running" and caught.value.status == 0


@needs_root
def test_a_socket_the_caller_may_not_use_names_owner_group_and_mode(
    open_dir: Path, nobody_can_run_this_tree: None
) -> None:
    sock_path = open_dir / "wlidd.sock"
    with listening_socket(sock_path, 0o600):
        result = run_as_nobody("status", "--socket", str(sock_path))
    assert result.returncode == 4, result.stderr
    assert "is the daemon running" not in result.stderr and "Traceback" not in result.stderr
    assert (
        f"wlidd: error: cannot reach wlidd at {sock_path}: permission denied: {sock_path} is owned by root:root"
        f" mode 0600; you (uid {NOBODY} nobody) are not its owner nor in group root, and its mode gives others"
        " no write access"
    ) in result.stderr


@needs_root
def test_a_member_of_the_socket_group_is_told_the_mode_shuts_the_group_out(
    open_dir: Path, nobody_can_run_this_tree: None
) -> None:
    group = next((g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY)), None)
    if group is None:
        pytest.skip("no group other than root and nogroup")
    sock_path = open_dir / "wlidd.sock"
    with listening_socket(sock_path, 0o640, gid=group.gr_gid):
        result = run_as_nobody("status", "--socket", str(sock_path), groups=(group.gr_gid,))
    assert result.returncode == 4, result.stderr
    assert f"{sock_path} is owned by root:{group.gr_name} mode 0640" in result.stderr
    assert f"are in group {group.gr_name} but its mode gives the group no write access" in result.stderr


@needs_root
def test_a_directory_the_caller_may_not_search_is_named(open_dir: Path, nobody_can_run_this_tree: None) -> None:
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    sock_path = private / "wlidd.sock"
    with listening_socket(sock_path, 0o666):
        result = run_as_nobody("creds", "default", "--out", "/nonexistent", "--socket", str(sock_path))
    assert result.returncode == 4, result.stderr
    assert (
        f"permission denied: {private} is owned by root:root mode 0700; you (uid {NOBODY} nobody) may not search it"
        in result.stderr
    )


@pytest.mark.parametrize("command", [["run"], ["run", "--oneshot"], ["check"]])
def test_a_config_that_serves_nothing_is_a_config_error_exit_2(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "wlidd.toml"
    path.write_text(f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n')
    result = run_cli(*command, "--config", str(path))
    assert result.returncode == 2 and "nothing to serve" in result.stderr + result.stdout


def test_check_fails_when_the_sockets_group_does_not_exist(tmp_path: Path) -> None:
    """The shipped config names the wlidd-clients group for the socket: on a host without it `wlidd run`
    exits 3, so `wlidd check` says so (it passed before)."""
    path = tmp_path / "wlidd.toml"
    path.write_text(
        '[tokens.m]\nflow = "gce-metadata"\n'
        f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\ngroup = "no-such-group-wlidd"\n'
    )
    result = run_cli("check", "--config", str(path))
    assert (
        result.returncode == 1 and "listeners.unix.group: group 'no-such-group-wlidd' does not exist" in result.stdout
    )
