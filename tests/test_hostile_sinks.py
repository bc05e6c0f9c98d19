"""File sinks against a hostile local user (issue 13): pid files that aim signals, parents that redirect
writes, on_change commands that see too much, and `readers` for a daemon without privileges.

Most tests need root (real throw-away uids, chown, setuid children) and skip without it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import FileSet
from tests.conftest import as_user as conftest_as_user
from wlidd import posix_acl
from wlidd.config import CredentialSinkConfig, SinkConfig
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid
from wlidd.emulator.produced import find_leak
from wlidd.errors import InvalidValue, SinkRefused
from wlidd.logs import REDACTED, configure_logging, reset_logging
from wlidd.sinks.access import Readers, grant_directory
from wlidd.sinks.commands import COMMAND_ENV, OUTPUT_LIMIT, output_tail, run_command
from wlidd.sinks.credentials import publish_credentials, write_credentials
from wlidd.sinks.files import fd_file_is, write_atomic
from wlidd.sinks.signals import signal_after_rotation
from wlidd.sinks.tokens import publish_token
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.tlsctx import TlsContexts
from wlidd.tokens.model import Token
from wlidd.watch import IdentityState

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: throw-away uids, chown, setuid")
APP, OTHER, DAEMON = 65534, 65533, 65532  # the app's user, a bystander, an unprivileged daemon user

Events = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def events() -> Iterator[Events]:
    """The daemon's log lines (JSON) written so far, as dicts."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        reset_logging()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp (tmp_path's parents are 0700: other uids cannot reach it)."""
    path = Path(tempfile.mkdtemp(prefix="wlidd-sinks-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def identity_state(svid: IssuedSvid, bundle: bytes) -> IdentityState:
    now = dt.datetime.now(dt.UTC)
    identity = build_identity(CredentialFiles("test", svid.chain_pem, svid.key_pem, own_bundle=bundle), now)
    return IdentityState("default", identity, TlsContexts.build(identity), 1, now)


def sink(directory: Path, **options: Any) -> CredentialSinkConfig:
    return CredentialSinkConfig.model_validate({"dir": str(directory), **options})


def as_user(uid: int, action: Callable[[], str]) -> str:
    """Run `action` as `uid` with no supplementary groups (conftest.as_user); what it returned, or
    "ERROR <exception>"."""
    result = conftest_as_user(uid, action)
    return "ERROR " + result.removeprefix("CHILD-ERROR ") if result.startswith("CHILD-ERROR ") else result


def read_as(uid: int, path: Path) -> str:
    return as_user(uid, lambda: f"read {len(path.read_bytes())} bytes")


def refusals(events: Events, event: str) -> list[str]:
    return [e.get("reason") or e.get("error") or "" for e in events() if e["event"] == event]


# ---- item 8: pid_file ------------------------------------------------------------------------------

TARGET = """
import signal, time
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append("SIGUSR1"))
signal.signal(signal.SIGUSR2, lambda signum, frame: got.append("SIGUSR2"))
print("ready", flush=True)
while "SIGUSR2" not in got:
    time.sleep(0.05)
print(" ".join(sorted(got)), flush=True)
"""


class Target:
    """A process that records the signals it gets. `received()` ends it with SIGUSR2 and lists them, sorted:
    a SIGUSR1 sent earlier has been delivered by then (the kernel delivers pending signals before the
    process runs on, lower numbers first), so no sleep is needed."""

    def __init__(self, uid: int | None = None) -> None:
        drop = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        self.process = subprocess.Popen([*drop, sys.executable, "-c", TARGET], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline() == "ready\n"
        self.pid = self.process.pid

    def received(self) -> list[str]:
        self.process.send_signal(signal.SIGUSR2)
        out, _ = self.process.communicate(timeout=10)
        return out.split()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


@pytest.fixture
def target() -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(uid: int | None = None) -> Target:
        started.append(Target(uid))
        return started[-1]

    try:
        yield start
    finally:
        for t in started:
            t.close()


@needs_root
async def test_a_pid_file_in_a_directory_the_app_user_owns_is_refused_and_nothing_is_signalled(
    tmp_path: Path, ca: CertificateAuthority, events: Events, target: Callable[..., Target]
) -> None:
    victim = target()
    app_run = tmp_path / "run-app"
    app_run.mkdir()
    os.chown(app_run, APP, APP)
    (app_run / "app.pid").write_text(f"{victim.pid}\n")  # the app user could have written any pid here
    config = sink(tmp_path / "out", signal="SIGUSR1", pid_file=str(app_run / "app.pid"))
    await publish_credentials((config,), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert victim.received() == ["SIGUSR2"]
    [reason] = refusals(events, "signal after rotation refused")
    assert f"directory {app_run} belongs to uid {APP}" in reason


@needs_root
async def test_a_pid_file_writable_by_group_or_others_is_refused(
    tmp_path: Path, ca: CertificateAuthority, events: Events, target: Callable[..., Target]
) -> None:
    victim = target()
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(str(victim.pid))
    pid_file.chmod(0o666)
    config = sink(tmp_path / "out", signal="SIGUSR1", pid_file=str(pid_file))
    await publish_credentials((config,), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert victim.received() == ["SIGUSR2"]
    [reason] = refusals(events, "signal after rotation refused")
    assert "mode 0666) is writable by group or others" in reason


@needs_root
async def test_a_pid_file_that_is_a_symbolic_link_is_refused(
    tmp_path: Path, ca: CertificateAuthority, events: Events, target: Callable[..., Target]
) -> None:
    victim = target()
    (tmp_path / "real.pid").write_text(str(victim.pid))
    (tmp_path / "app.pid").symlink_to(tmp_path / "real.pid")
    config = sink(tmp_path / "out", signal="SIGUSR1", pid_file=str(tmp_path / "app.pid"))
    await publish_credentials((config,), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert victim.received() == ["SIGUSR2"]
    assert refusals(events, "signal after rotation refused") == [f"pid file {tmp_path / 'app.pid'} is a symbolic link"]


@needs_root
@pytest.mark.parametrize("content", ["1", "0", "-1", "junk", ""])
async def test_a_pid_of_one_or_less_or_no_pid_is_refused(
    tmp_path: Path, ca: CertificateAuthority, events: Events, content: str
) -> None:
    """SIGWINCH (ignored by default) so that even a wrongly sent signal harms nothing."""
    (tmp_path / "app.pid").write_text(content)
    config = sink(tmp_path / "out", signal="SIGWINCH", pid_file=str(tmp_path / "app.pid"))
    await publish_credentials((config,), identity_state(ca.issue_svid(), ca.bundle_pem))
    [reason] = refusals(events, "signal after rotation refused")
    expected = "a pid of 1 or less would signal" if content.lstrip("-").isdigit() else "does not hold a process id"
    assert expected in reason


@needs_root
async def test_a_process_of_a_user_the_sink_does_not_serve_is_not_signalled_and_a_reader_is(
    tmp_path: Path, ca: CertificateAuthority, events: Events, target: Callable[..., Target]
) -> None:
    """Without owner or readers only root's and the daemon's processes may be signalled; naming the
    app's user as a reader lets its process be signalled (through a pidfd)."""
    app = target(APP)
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(str(app.pid))
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    await publish_credentials((sink(tmp_path / "a", signal="SIGUSR1", pid_file=str(pid_file)),), state)
    [reason] = refusals(events, "signal after rotation refused")
    assert f"process {app.pid} runs as uid {APP}, not one this sink serves" in reason

    served = sink(tmp_path / "b", signal="SIGUSR1", pid_file=str(pid_file), readers={"users": [APP]})
    await publish_credentials((served,), state)
    assert app.received() == ["SIGUSR1", "SIGUSR2"]


@needs_root
def test_the_signal_goes_through_a_pidfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: Callable[..., Target]
) -> None:
    """The process whose owner was checked is the one signalled: os.kill (a bare pid) is not used."""
    app = target()
    (tmp_path / "app.pid").write_text(str(app.pid))

    def no_kill(pid: int, signum: int) -> None:
        raise AssertionError("os.kill used instead of a pidfd")

    with monkeypatch.context() as patch:
        patch.setattr(os, "kill", no_kill)
        config = sink(tmp_path / "out", signal="SIGUSR1", pid_file=str(tmp_path / "app.pid"))
        assert signal_after_rotation(config) == app.pid
    assert app.received() == ["SIGUSR1", "SIGUSR2"]


# ---- sink directories ---------------------------------------------------------------------------------


@needs_root
async def test_a_link_planted_in_a_directory_another_user_owns_is_not_followed(
    tmp_path: Path, ca: CertificateAuthority, events: Events
) -> None:
    victim, shared = tmp_path / "victim", tmp_path / "shared"
    victim.mkdir()
    shared.mkdir()
    os.chown(shared, APP, APP)
    (shared / "creds").symlink_to(victim)  # what the app user would do in a directory it owns
    os.lchown(shared / "creds", APP, APP)
    await publish_credentials((sink(shared / "creds"),), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert list(victim.iterdir()) == []
    [error] = refusals(events, "credential sink write failed")
    assert f"directory {shared} belongs to uid {APP}" in error


@needs_root
async def test_another_users_link_in_a_sticky_world_writable_directory_is_not_followed_but_roots_dir_is_used(
    tmp_path: Path, ca: CertificateAuthority, events: Events
) -> None:
    """The /tmp case: others may create names in a sticky directory, so a link there counts only when
    root or the daemon's user owns it; a directory root made there is safe (others cannot move it)."""
    victim, sticky = tmp_path / "victim", tmp_path / "sticky"
    victim.mkdir()
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "creds").symlink_to(victim)
    os.lchown(sticky / "creds", APP, APP)
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    await publish_credentials((sink(sticky / "creds"), sink(sticky / "mine")), state)
    assert list(victim.iterdir()) == []
    [error] = refusals(events, "credential sink write failed")
    assert f"symbolic link {sticky / 'creds'} belongs to uid {APP}" in error
    assert sorted(sinks_stable_names(sticky / "mine")) == [
        "bundle.pem",
        "cert.pem",
        "certificate_config.json",
        "key.pem",
    ]


@needs_root
async def test_a_group_writable_parent_without_the_sticky_bit_is_refused_with_the_reason(
    tmp_path: Path, ca: CertificateAuthority, events: Events
) -> None:
    parent = tmp_path / "team"
    parent.mkdir()
    parent.chmod(0o775)
    await publish_credentials((sink(parent / "creds"),), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert not (parent / "creds").exists()
    [error] = refusals(events, "credential sink write failed")
    assert f"directory {parent} (mode 0775) is writable by its group (or a user or group its ACL names)" in error
    assert "without the sticky bit" in error


@needs_root
def test_a_link_owned_by_root_in_a_safe_directory_is_followed(tmp_path: Path) -> None:
    """Like /var/run -> /run: root's links in root's directories are walked (and their targets checked)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "run").symlink_to("real")
    write_atomic(tmp_path / "run" / "x" / "f", b"data", 0o640)
    st = (tmp_path / "real" / "x" / "f").stat()
    assert (tmp_path / "real" / "x" / "f").read_bytes() == b"data" and stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "real" / "x").stat().st_mode) == 0o755  # created 0755 whatever the umask


def test_temp_files_left_by_a_crash_are_removed_at_the_first_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = [".key.pem.a8_x0q2z.tmp", ".key.pem.0123456789ab.tmp"]  # tempfile's and wlidd's own names
    kept = [".key.pem.bak", ".key.pem.bak.0123456789ab.tmp", "notes.tmp"]
    for name in stale + kept:
        (out / name).write_bytes(b"old")
    write_atomic(out / "key.pem", b"new")
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "key.pem"])


# ---- on_change ----------------------------------------------------------------------------------------


async def test_on_change_gets_a_minimal_environment_not_the_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_DATABASE_PASSWORD", "hunter2")
    dump = tmp_path / "env.json"
    code = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"
    await run_command([sys.executable, "-c", code, str(dump)], 30, "default")
    assert json.loads(dump.read_text()) == COMMAND_ENV == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


async def test_on_change_output_is_drained_but_only_a_bounded_tail_is_kept() -> None:
    code = "import sys; sys.stdout.write('o' * 4_000_000); sys.stdout.flush(); sys.stderr.write('e' * 1_000_000); sys.exit(3)"
    result = await run_command([sys.executable, "-c", code], 30, "default")
    assert result is not None
    assert (result.returncode, result.output_bytes) == (3, 5_000_000)
    assert result.output == b"e" * OUTPUT_LIMIT


async def test_an_on_change_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    result = await run_command(["/bin/sh", "-c", 'sleep 300 & echo $! > "$0"; wait', str(pid_file)], 0.5, "default")
    child = int(pid_file.read_text())
    with anyio.fail_after(10):
        while _alive(child):
            await anyio.sleep(0.02)
    assert result is not None and result.timed_out and result.returncode is None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def test_a_failing_on_change_logs_a_scrubbed_tail_without_the_key(
    tmp_path: Path, ca: CertificateAuthority, events: Events
) -> None:
    out = tmp_path / "out"
    script = 'cat "$0/key.pem" "$0/cert.pem"; echo "reload failed: no such unit"; exit 4'
    config = sink(out, on_change=["/bin/sh", "-c", script, str(out)])
    await publish_credentials((config,), identity_state(ca.issue_svid(), ca.bundle_pem))
    [failed] = [e for e in events() if e["event"] == "on_change command failed"]
    assert failed["returncode"] == 4 and failed["output"].endswith("reload failed: no such unit")
    assert find_leak(json.dumps(events())) is None


async def test_a_failing_on_change_of_a_token_sink_does_not_log_the_token(tmp_path: Path, events: Events) -> None:
    now = dt.datetime.now(dt.UTC)
    value = "ya29.c." + "Qx7Lm2Np9Rt4Vw6Yz1Bd3Fh5Jk8Sa0Gc" * 3
    token = Token(value, now + dt.timedelta(hours=1), now, "gcp")
    path = tmp_path / "gcp.token"
    config = SinkConfig.model_validate(
        {"path": str(path), "on_change": ["/bin/sh", "-c", 'cat "$0"; exit 1', str(path)]}
    )
    await publish_token((config,), token, now, "gcp")
    [failed] = [e for e in events() if e["event"] == "on_change command failed"]
    assert failed["output"] == REDACTED and value[20:44] not in json.dumps(events())


# ---- readers: handing keys over without privileges ----------------------------------------------------


@needs_root
def test_readers_get_the_key_through_an_acl_when_the_daemon_runs_unprivileged(
    public_dir: Path, ca: CertificateAuthority
) -> None:
    """The shipped unit's situation: wlidd's own user, no capabilities. A reader can read the key, a
    bystander cannot; the file keeps key_mode for everyone else."""
    os.chown(public_dir, DAEMON, DAEMON)
    out = public_dir / "creds" / "app"
    config = sink(out, readers={"users": [APP]}, key_mode="0600")
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    assert as_user(DAEMON, lambda: (write_credentials(config, state), "written")[1]) == "written"
    key = out / "key.pem"
    assert key.stat().st_uid == DAEMON
    assert read_as(APP, key) == f"read {len(key.read_bytes())} bytes"
    assert read_as(OTHER, key).startswith("ERROR PermissionError")
    assert read_as(OTHER, out / "cert.pem").startswith("read ")  # certificates stay world-readable (mode 0644)
    acl = os.getxattr(key, posix_acl.XATTR)
    assert acl == posix_acl.file_acl(0o600, [APP], [])


@needs_root
async def test_token_sink_readers_by_group_can_read_a_0600_token(tmp_path: Path, public_dir: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    token = Token("opaque-" + "t" * 30, now + dt.timedelta(hours=1), now, "gcp")
    path = public_dir / "tokens" / "gcp.token"
    config = SinkConfig.model_validate({"path": str(path), "mode": "0600", "readers": {"groups": [APP]}})
    await publish_token((config,), token, now, "gcp")
    assert read_as(APP, path) == f"read {len(token.value)} bytes"
    assert read_as(OTHER, path).startswith("ERROR PermissionError")


@needs_root
def test_readers_get_read_and_traverse_on_a_private_sink_directory(public_dir: Path, ca: CertificateAuthority) -> None:
    """A sink directory made 0700 (UMask=0077, or by an earlier version) gets r-x for the readers only."""
    out = public_dir / "creds"
    out.mkdir(mode=0o700)
    write_credentials(sink(out, readers={"users": [APP]}), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert read_as(APP, out / "key.pem").startswith("read ")
    assert read_as(OTHER, out / "cert.pem").startswith("ERROR PermissionError")
    entries = posix_acl.decode(os.getxattr(out, posix_acl.XATTR))
    assert posix_acl.Entry(posix_acl.USER, APP, 5) in entries


def test_readers_on_a_file_system_without_acls_keep_the_last_good_files(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = identity_state(ca.issue_svid(), ca.bundle_pem)
    write_credentials(sink(out), first)
    before = sink_files(out)

    def unsupported(*args: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    with pytest.raises(OSError, match="does not support POSIX ACLs, which readers needs"):
        write_credentials(sink(out, readers={"users": [0]}), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert sink_files(out) == before  # the same generation, and no temp file or generation left either


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (package acl) not installed")
@pytest.mark.parametrize(
    ("mode", "users", "groups"),
    [(0o600, [APP], []), (0o644, [APP, 7], [OTHER]), (0o400, [], [5]), (0o640, [1, 2], [3, 4])],
)
def test_the_acl_encoder_matches_setfacl_byte_for_byte(
    tmp_path: Path, mode: int, users: list[int], groups: list[int]
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    path.chmod(mode)
    spec = ",".join([*(f"u:{u}:r" for u in users), *(f"g:{g}:r" for g in groups)])
    subprocess.run(["setfacl", "-m", spec, str(path)], check=True)
    made = os.getxattr(path, posix_acl.XATTR)
    assert posix_acl.file_acl(mode, users, groups) == made
    assert posix_acl.encode(posix_acl.decode(made)) == made


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (package acl) not installed")
def test_granting_a_directory_keeps_its_acl_and_widens_its_mask_only_by_r_x(tmp_path: Path) -> None:
    """An admin's `user:9:rwx` held back to r-x by the mask stays held back (setfacl -n: no recalculation)."""
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    subprocess.run(["setfacl", "-m", "u:9:rwx,g:8:r,m::r", str(directory)], check=True)
    base = posix_acl.decode(os.getxattr(directory, posix_acl.XATTR))
    subprocess.run(["setfacl", "-n", "-m", f"u:{APP}:rx,m::rx", str(directory)], check=True)
    granted = posix_acl.with_readers(base, [APP], [], posix_acl.READ | posix_acl.EXECUTE)
    assert posix_acl.encode(granted) == os.getxattr(directory, posix_acl.XATTR)


def test_the_acl_decoder_refuses_what_the_kernel_would() -> None:
    good = posix_acl.file_acl(0o600, [1], [])
    for bad in (good[:-1], b"\x01\0\0\0" + good[4:], good[:4] + good[12:20] + good[4:12] + good[20:]):
        with pytest.raises(InvalidValue) as refused:
            posix_acl.decode(bad)
        assert refused.value.reason == "posix_acl"


def test_an_acl_wlidd_cannot_read_refuses_readers_on_the_directory_and_makes_a_file_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder's refusal is caught where it always was: granting `readers` on the directory is refused
    (SinkRefused, nothing written), and a file whose ACL cannot be read is not "already up to date"."""
    directory = tmp_path / "out"
    directory.mkdir(mode=0o750)
    (directory / "f").write_bytes(b"data")
    os.chmod(directory / "f", 0o600)
    monkeypatch.setattr(os, "getxattr", lambda *_args, **_kwargs: b"\x01\0\0\0")  # version 1: unreadable
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SinkRefused, match="has an ACL wlidd cannot read"):
            grant_directory(dir_fd, Readers((APP,), ()), str(directory))
        st = os.stat(directory / "f")
        assert fd_file_is(dir_fd, "f", b"data", 0o600, st.st_uid, st.st_gid, None) is False
    finally:
        os.close(dir_fd)


# ---- wlidd check ---------------------------------------------------------------------------------------


@needs_root
def test_check_warns_that_an_unprivileged_daemon_cannot_chown_and_points_at_readers(
    public_dir: Path, ca: CertificateAuthority
) -> None:
    svid = ca.issue_svid()
    for name, data in (("chain.pem", svid.chain_pem), ("key.pem", svid.key_pem), ("bundle.pem", ca.bundle_pem)):
        (public_dir / name).write_bytes(data)
        (public_dir / name).chmod(0o644)
    config = public_dir / "wlidd.toml"
    config.write_text(
        f"""
[identities.default]
source = "files"
cert = "{public_dir}/chain.pem"
key = "{public_dir}/key.pem"
bundle = "{public_dir}/bundle.pem"
[[identities.default.sinks]]
dir = "/run/wlidd/creds"
owner = "root"
"""
    )
    config.chmod(0o644)

    from wlidd import cli

    def check() -> str:
        """`wlidd check` run by the unprivileged daemon user: in a forked child (conftest.as_user), so it
        does not depend on that user being able to read this checkout's virtualenv (CI's clone may sit
        in a private directory)."""

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            cli.main(["check", "--config", str(config)])
        return printed.getvalue()

    check()  # once here first: the forked child may not read this checkout to import what check needs
    stdout = conftest_as_user(DAEMON, check)
    assert "identities.default.sinks[0] (/run/wlidd/creds): owner/group need root or CAP_CHOWN" in stdout
    assert "readers = {" in stdout


# ---- on_change output: no secret whatever its formatting ----------------------------------------------

FORMAT_KEY = r"""
import base64, json, re, sys, textwrap
pem = open(sys.argv[1]).read()
fmt = sys.argv[2]
body = "".join(pem.strip().splitlines()[1:-1])
der = base64.b64decode(body)
def fold(text, width):
    return "\n".join(chunk for line in text.splitlines() for chunk in textwrap.wrap(line, width) or [""])
if fmt.startswith("fold"):
    print(fold(pem, int(fmt[4:])))
elif fmt == "one-line":
    print(body)
elif fmt == "base64url":
    print(fold(base64.urlsafe_b64encode(der).decode().rstrip("="), 76))
elif fmt == "hex-colons":
    print(fold(":".join(f"{b:02x}" for b in der), 45))
elif fmt == "hex-spaces":
    print(fold(" ".join(f"{b:02x}" for b in der), 48))
elif fmt == "hex-plain":
    print(fold(der.hex(), 60))
elif fmt == "json":
    print(json.dumps({"key": pem}))
elif fmt == "crlf":
    sys.stdout.write(pem.replace("\n", "\r\n"))
print("reload failed: no such unit")
sys.exit(4)
"""

KEY_FORMATS = ["fold40", "fold50", "fold76", "one-line", "base64url", "hex-colons", "hex-spaces", "hex-plain"]
KEY_FORMATS += ["json", "crlf", "openssl-text"]


def _b64_normal(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+/]", "", text.replace("-", "+").replace("_", "/"))


def fragment_found(logged: str, *, b64: str = "", der: bytes = b"", b64_window: int = 10) -> str:
    """What of a secret is in `logged`: "base64" when `b64_window` characters of `b64` are (as base64 or
    base64url), "hex" when 4 bytes of `der` are (hex with any separators), else "". Callers assert on
    this word only, so a failing test never prints the secret."""
    text_b64, text_hex = _b64_normal(logged), re.sub(r"[^0-9a-f]", "", logged.lower())
    secret_hex = der.hex()
    if any(b64[i : i + b64_window] in text_b64 for i in range(len(b64) - b64_window + 1)):
        return "base64"
    if any(secret_hex[i : i + 8] in text_hex for i in range(0, len(secret_hex) - 7, 2)):
        return "hex"
    return ""


@pytest.mark.parametrize("fmt", KEY_FORMATS)
async def test_a_failing_on_change_never_logs_the_key_however_the_command_formats_it(
    tmp_path: Path, ca: CertificateAuthority, events: Events, fmt: str
) -> None:
    """Folded at any width, on one line, base64url, hex dumps, openssl's text form: the logged tail has
    the command's own message and not one fragment of the private key (its scalar, its DER, its base64)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path / "out"
    if fmt == "openssl-text":
        if shutil.which("openssl") is None:
            pytest.skip("openssl not installed")
        script = 'openssl pkey -in "$0/key.pem" -text -noout; echo "reload failed: no such unit"; exit 4'
        command = ["/bin/sh", "-c", script, str(out)]
    else:
        command = [sys.executable, "-c", FORMAT_KEY, str(out / "key.pem"), fmt]
    svid = ca.issue_svid()
    await publish_credentials((sink(out, on_change=command),), identity_state(svid, ca.bundle_pem))
    [failed] = [e for e in events() if e["event"] == "on_change command failed"]
    own_message_kept = failed["returncode"] == 4 and failed["output"].endswith("reload failed: no such unit")
    assert own_message_kept  # (a bare bool: a failing assertion must not print the logged output)
    key = serialization.load_pem_private_key(svid.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    body = "".join(svid.key_pem.decode().strip().splitlines()[1:-1])
    logged = json.dumps(events())
    found = fragment_found(logged, der=scalar) or fragment_found(logged, b64=body)
    assert found == ""


FORMAT_TOKEN = r"""
import base64, sys, textwrap
token = open(sys.argv[1]).read()
fmt = sys.argv[2]
if fmt.startswith("fold"):
    print("\n".join(textwrap.wrap(token, int(fmt[4:]))))
elif fmt == "reversed":
    print("tok=" + token[::-1])
elif fmt == "quoted":
    print(f"curl: (22) header Authorization: {token!r} rejected")
elif fmt == "hex":
    print(token.encode().hex())
else:
    print(token)
print("reload failed: no such unit")
sys.exit(1)
"""


@pytest.mark.parametrize("fmt", ["plain", "fold40", "fold50", "fold76", "reversed", "quoted", "hex"])
async def test_a_failing_on_change_never_logs_the_token_however_the_command_formats_it(
    tmp_path: Path, events: Events, fmt: str
) -> None:
    import secrets as random

    from wlidd.emulator.produced import remember

    now = dt.datetime.now(dt.UTC)
    value = "ya29.c." + random.token_urlsafe(120)
    remember("access token", value)  # the conftest leak check looks for it too
    path = tmp_path / "gcp.token"
    command = [sys.executable, "-c", FORMAT_TOKEN, str(path), fmt]
    await publish_token(
        (SinkConfig.model_validate({"path": str(path), "on_change": command}),),
        Token(value, now + dt.timedelta(hours=1), now, "gcp"),
        now,
        "gcp",
    )
    [failed] = [e for e in events() if e["event"] == "on_change command failed"]
    own_message_kept = failed["output"].endswith("reload failed: no such unit")
    assert own_message_kept
    logged = json.dumps(events())
    found = fragment_found(logged, b64=_b64_normal(value)) or fragment_found(logged, b64=_b64_normal(value[::-1]))
    found = found or fragment_found(logged, der=value.encode())
    assert found == ""


def test_an_ordinary_failure_message_is_logged_as_it_is() -> None:
    """Words, paths and error names stay readable: only what could be secret is masked."""
    message = (
        b"FileNotFoundError: [Errno 2] No such file or directory: '/etc/app/app.conf'\nJob for app.service failed.\n"
    )
    assert output_tail(message, hide=("ya29.c.secretsecretsecret",)) == message.decode().strip()


# ---- sticky, world-writable directories: names any user may hold -------------------------------------


@pytest.fixture
def sticky_dir(public_dir: Path) -> Path:
    """A root-owned 1777 directory every uid can reach: /tmp's situation."""
    path = public_dir / "sticky"
    path.mkdir()
    path.chmod(0o1777)
    return path


def plant(uid: int, action: Callable[[], object]) -> None:
    """Do `action` as `uid` (the attacker), failing the test if it could not."""
    result = as_user(uid, lambda: (action(), "done")[1])
    assert result == "done", result


@needs_root
def test_stale_temp_names_another_user_planted_do_not_block_an_unprivileged_daemons_write(sticky_dir: Path) -> None:
    """A name of the temp-file pattern that another user holds cannot be removed (EPERM in a sticky
    directory): it is skipped, never unlinked, and the write goes through a fresh random name."""
    planted = [f".app.token.{i:012x}.tmp" for i in range(20)] + [".app.token.a8_x0q2z.tmp"]
    plant(APP, lambda: [(sticky_dir / name).write_bytes(b"x") for name in planted])
    target = sticky_dir / "app.token"
    assert as_user(DAEMON, lambda: (write_atomic(target, b"new"), "written")[1]) == "written"
    assert target.read_bytes() == b"new" and target.stat().st_uid == DAEMON
    assert sorted(p.name for p in sticky_dir.iterdir()) == sorted([*planted, "app.token"])


@needs_root
def test_a_flood_of_stale_temp_names_gives_one_log_line_with_the_counts(sticky_dir: Path, events: Events) -> None:
    """Our own leftovers are removed, other users' are left alone; one line says how many of each."""
    own = [f".app.token.{i:012x}.tmp" for i in range(30)]
    theirs = [f".app.token.{i:06x}.tmp" for i in range(40)]
    for name in own:
        (sticky_dir / name).write_bytes(b"old")
    plant(APP, lambda: [(sticky_dir / name).write_bytes(b"x") for name in theirs])
    write_atomic(sticky_dir / "app.token", b"new")
    lines = [e for e in events() if "stale" in e["event"] or "temporary" in e["event"]]
    assert [(e["removed"], e["left_to_other_users"]) for e in lines] == [(30, 40)]
    assert sorted(p.name for p in sticky_dir.iterdir()) == sorted([*theirs, "app.token"])


@needs_root
def test_a_target_name_another_user_holds_in_a_sticky_directory_is_reported_as_such(sticky_dir: Path) -> None:
    """An unprivileged daemon cannot replace another user's file there (EPERM): the error names the
    target and the cause, not a temp file, and no temp file is left behind."""
    target = sticky_dir / "app.token"
    plant(APP, lambda: target.write_bytes(b"fake"))
    result = as_user(DAEMON, lambda: (write_atomic(target, b"new"), "written")[1])
    assert result.startswith("ERROR SinkRefused")
    assert f"{target} belongs to uid {APP} in a sticky directory: another user holds the name" in result
    assert target.read_bytes() == b"fake" and [p.name for p in sticky_dir.iterdir()] == ["app.token"]


@needs_root
async def test_a_directory_another_user_made_at_a_sinks_name_is_reported_as_such(
    sticky_dir: Path, events: Events
) -> None:
    target = sticky_dir / "app.token"
    plant(APP, target.mkdir)
    now = dt.datetime.now(dt.UTC)
    token = Token("opaque-" + "t" * 30, now + dt.timedelta(hours=1), now, "gcp")
    await publish_token((SinkConfig.model_validate({"path": str(target)}),), token, now, "gcp")
    [error] = refusals(events, "token sink write failed")
    assert error.startswith(f"{target} is a directory that belongs to uid {APP} in a sticky directory")
    assert "another user holds the name" in error and ".tmp" not in error
    assert [p.name for p in sticky_dir.iterdir()] == ["app.token"]


@needs_root
async def test_a_sink_directory_another_user_made_in_a_sticky_directory_is_reported_as_held(
    sticky_dir: Path, ca: CertificateAuthority, events: Events
) -> None:
    plant(APP, (sticky_dir / "creds").mkdir)
    await publish_credentials((sink(sticky_dir / "creds"),), identity_state(ca.issue_svid(), ca.bundle_pem))
    [error] = refusals(events, "credential sink write failed")
    assert f"directory {sticky_dir / 'creds'} belongs to uid {APP} in a sticky directory: another user holds" in error


# ---- a full disk: a sink's files change together or not at all ---------------------------------------


def sinks_stable_names(directory: Path) -> list[str]:
    """The names a consumer reads (the generations and ..data are the writer's)."""
    return [p.name for p in directory.iterdir() if not p.name.startswith("..")]


def sink_files(directory: Path) -> dict[str, str]:
    """Every entry's name with a digest of its content for files and the target for links (a failing
    comparison must not print a key), and the same for the generation ..data leads to."""

    def digest(path: Path) -> str:
        if path.is_symlink():
            return "-> " + os.readlink(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    entries = {p.name: digest(p) for p in sorted(directory.iterdir()) if not p.is_dir() or p.is_symlink()}
    if (directory / "..data").is_dir():
        entries |= {f"..data/{p.name}": digest(p) for p in sorted((directory / "..data").iterdir())}
    return entries


def test_a_write_failing_midway_through_a_sink_changes_none_of_its_files(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the third file (bundle.pem): key.pem and cert.pem stay the old pair (never a new key
    beside the old certificate), no temp file is left, and the error names bundle.pem."""
    out = tmp_path / "out"
    write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    before = sink_files(out)
    real_write = os.write

    def full_disk_at_the_bundle(fd: int, data: Any) -> int:
        if bytes(data) == ca.bundle_pem:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_at_the_bundle)
    with pytest.raises(OSError) as raised:
        write_credentials(sink(out), identity_state(ca.issue_svid(), ca.bundle_pem))
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out / "bundle.pem")
    assert sink_files(out) == before


@needs_root
async def test_a_full_tmpfs_leaves_the_last_good_set_and_the_log_names_the_file(
    tmp_path: Path, ca: CertificateAuthority, events: Events
) -> None:
    """A real full disk (a 64 KiB tmpfs): the new generation needs more pages than are free (the old one
    stays until the new one is published)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        out = mount / "spiffe"
        config = sink(out, layout="spiffe-fs")
        write_credentials(config, identity_state(ca.issue_svid(), ca.bundle_pem))
        before = sink_files(out)
        roots = b"".join(CertificateAuthority("example.org").bundle_pem for _ in range(8))
        big_bundle = ca.bundle_pem + roots  # example.org.spiffe-trust-bundle.pem: one page → two
        fillers = 0
        with contextlib.suppress(OSError):
            while True:
                (mount / f"fill{fillers}").write_bytes(b"\0" * 4096)
                fillers += 1
        (mount / f"fill{fillers - 1}").unlink()  # exactly one page free
        new_state = identity_state(ca.issue_svid(), big_bundle)
        assert len(new_state.identity.own_bundle.pem) > 4096
        await publish_credentials((config,), new_state)
        assert sink_files(out) == before
        [error] = refusals(events, "credential sink write failed")
        assert error == f"No space left on device: {out / 'example.org.spiffe-trust-bundle.pem'}"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


# ---- pid_file: hard links -------------------------------------------------------------------------------


@needs_root
async def test_a_pid_file_with_another_hard_link_is_refused(
    tmp_path: Path, ca: CertificateAuthority, events: Events, target: Callable[..., Target]
) -> None:
    """With fs.protected_hardlinks=0 any user may link to root's files: a pid file with a second name
    (e.g. a link to another service's pid file, planted in a sticky directory) is not trusted."""
    victim = target()
    (tmp_path / "sshd.pid").write_text(str(victim.pid))
    os.link(tmp_path / "sshd.pid", tmp_path / "app.pid")
    config = sink(tmp_path / "out", signal="SIGUSR1", pid_file=str(tmp_path / "app.pid"))
    await publish_credentials((config,), identity_state(ca.issue_svid(), ca.bundle_pem))
    assert victim.received() == ["SIGUSR2"]
    [reason] = refusals(events, "signal after rotation refused")
    assert reason.startswith(f"pid file {tmp_path / 'app.pid'} has 2 hard links")


# ---- wlidd check: names that do not exist ----------------------------------------------------------------


def test_check_fails_for_a_sink_whose_reader_owner_or_group_does_not_exist(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    from wlidd.cli import main

    files.put(ca.issue_svid(), ca.bundle_pem)
    config = tmp_path / "wlidd.toml"
    config.write_text(
        f"""
[identities.default]
source = "files"
cert = "{files.cert}"
key = "{files.key}"
bundle = "{files.bundle}"
[[identities.default.sinks]]
dir = "{tmp_path}/creds"
readers = {{ users = ["wlidd-no-such-user"], groups = ["wlidd-no-such-group"] }}
[tokens.vm]
flow = "gce-metadata"
[[tokens.vm.sinks]]
path = "{tmp_path}/vm.token"
owner = "wlidd-no-such-owner"
[listeners.unix]
path = "{tmp_path}/wlidd.sock"
"""
    )
    assert main(["check", "--config", str(config)]) == 1
    printed = capsys.readouterr().out
    where = f"identities.default.sinks[0] ({tmp_path}/creds)"
    assert f"FAIL {where}: no user 'wlidd-no-such-user' (readers) on this host" in printed
    assert f"FAIL {where}: no group 'wlidd-no-such-group' (readers) on this host" in printed
    assert f"FAIL tokens.vm.sinks[0] ({tmp_path}/vm.token): no user 'wlidd-no-such-owner' (owner)" in printed
    assert "ok   default:" in printed  # the identity itself is fine


# ---- one sink's slow command does not hold the others back -----------------------------------------------

WAIT_FOR = r"""
import os, sys, time
seen, marker, report = sys.argv[1:4]
saw = os.path.exists(seen)  # the other sink's file, written before any command ran
deadline = time.monotonic() + 20
while not os.path.exists(marker) and time.monotonic() < deadline:
    time.sleep(0.02)
open(report, "w").write(f"saw={saw} marker={os.path.exists(marker)}")
"""


async def test_a_slow_on_change_does_not_delay_another_credential_sinks_files_or_command(
    tmp_path: Path, ca: CertificateAuthority, events: Events
) -> None:
    """Sink a's command waits for what sink b's command does: run one after the other, a would time out."""
    a, b, marker, report = tmp_path / "a", tmp_path / "b", tmp_path / "b-ran", tmp_path / "report"
    slow = [sys.executable, "-c", WAIT_FOR, str(b / "key.pem"), str(marker), str(report)]
    configs = (sink(a, on_change=slow, on_change_timeout="4s"), sink(b, on_change=["/usr/bin/touch", str(marker)]))
    with anyio.fail_after(30):
        await publish_credentials(configs, identity_state(ca.issue_svid(), ca.bundle_pem))
    assert report.read_text() == "saw=True marker=True"
    assert not [e for e in events() if e["event"].startswith("on_change command")]


async def test_a_slow_on_change_does_not_delay_another_token_sinks_file_or_command(
    tmp_path: Path, events: Events
) -> None:
    a, b, marker, report = tmp_path / "a.token", tmp_path / "b.token", tmp_path / "b-ran", tmp_path / "report"
    slow = [sys.executable, "-c", WAIT_FOR, str(b), str(marker), str(report)]
    configs = (
        SinkConfig.model_validate({"path": str(a), "on_change": slow, "on_change_timeout": "4s"}),
        SinkConfig.model_validate({"path": str(b), "on_change": ["/usr/bin/touch", str(marker)]}),
    )
    now = dt.datetime.now(dt.UTC)
    token = Token("opaque-" + "t" * 30, now + dt.timedelta(hours=1), now, "gcp")
    with anyio.fail_after(30):
        await publish_token(configs, token, now, "gcp")
    assert report.read_text() == "saw=True marker=True"
    assert not [e for e in events() if e["event"].startswith("on_change command")]


def test_the_dotted_head_of_a_folded_token_goes_with_the_rest_of_it() -> None:
    """textwrap folds at hyphens: `ya29.c.Ab3-` can end up alone on the first line, too short to match a
    fragment window and not one base64 word (dots); it is redacted with the folded lines beside it (a
    CI run logged such a head, about 1 fold in 100)."""
    import secrets as random
    import textwrap

    value = "ya29.c.Ab3-" + random.token_urlsafe(120).replace("-", "x")
    out = "\n".join(textwrap.wrap(value, 50)) + "\nreload failed: no such unit\n"
    assert out.splitlines()[0] == "ya29.c.Ab3-"
    tail = output_tail(out.encode(), hide=(value,))
    assert tail.splitlines() == [REDACTED, "reload failed: no such unit"]
