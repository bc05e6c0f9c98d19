"""Rules on units, executables and sha256 against real processes over the daemon's real sockets.

The callers are a copy of this interpreter at another path (its own executable file, so its path and its
bytes are the test's to choose: "rebuilt" by writing new bytes and renaming them over it, as a package
manager does) and, for units, a process moved into a cgroup named as systemd names a service, where the
kernel lets the test make one (a writable cgroup2 mount). Responses are printed by the child without
their bodies when they hold a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import site
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from structlog.testing import capture_logs

from tests.conftest import FileSet, in_background
from tests.test_tokens import metadata_token_config
from wlidd.api.callers import CallerCache
from wlidd.api.peers import socket_peer
from wlidd.config import AccessRule, Config, PolicyConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.policy import Policy
from wlidd.workload.model import Need
from wlidd.workload.proc import EXITED, PeerProcess, ProcessIdentifier, boottime_ns

REAL_PYTHON = os.path.realpath(sys.executable)
# GET /v1/credentials/<name> for each name; prints "<name> <status> <message of a refusal>" (never a key)
REQUEST = """
import json, socket, sys
if sys.argv[2] == "--wait":
    print("ready", flush=True)
    sys.stdin.readline()
    del sys.argv[2]
for name in sys.argv[2:]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(f"GET /v1/credentials/{name} HTTP/1.1\\r\\nHost: wlidd\\r\\nConnection: close\\r\\n\\r\\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, body = data.split(b"\\r\\n\\r\\n", 1)
    status = head.split(b" ", 2)[1].decode()
    print(name, status, json.loads(body)["message"] if status != "200" else "", flush=True)
"""
RAW_CALL = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=lambda _: b"", response_deserializer=lambda b: b)
try:
    next(iter(call(None, metadata=[("workload.spiffe.io", "true")], timeout=5)))
    print("OK")
except grpc.RpcError as exc:
    print(exc.code().name, exc.details())
"""


def child_env() -> dict[str, str]:
    """The copied interpreter finds the venv's packages (grpc) the way the venv's own would."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(site.getsitepackages())}


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A copy of this interpreter at tmp/bin/app: its own executable file."""
    path = tmp_path / "bin" / "app"
    path.parent.mkdir()
    shutil.copy2(REAL_PYTHON, path)
    return path


def rebuild(path: Path) -> None:
    """New bytes for the executable, renamed over it (a package upgrade): same path, another file and hash."""
    fresh = path.with_name(".app.new")
    fresh.write_bytes(path.read_bytes() + b"\0rebuilt")
    fresh.chmod(0o755)
    os.replace(fresh, path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_daemon(
    tmp_path: Path, files: FileSet, policy: dict[str, Any], *names: str, workload_api: bool = False
) -> Daemon:
    listeners: dict[str, Any] = {"unix": {"path": str(tmp_path / "wlidd.sock")}}
    if workload_api:
        listeners["workload_api"] = {"path": str(tmp_path / "workload.sock")}
    identities = {name: files.config() for name in names}
    return Daemon(Config.model_validate({"identities": identities, "listeners": listeners, "policy": policy}))


async def ask(executable: Path | str, sock: Path, *names: str) -> dict[str, tuple[str, str]]:
    """{name: (status, refusal message)} as the process `executable` asks for each identity's credentials."""
    result = await anyio.run_process([str(executable), "-c", REQUEST, str(sock), *names], env=child_env(), check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    answers = {}
    for line in result.stdout.decode().splitlines():
        name, status, message = line.split(" ", 2)
        answers[name] = (status, message)
    return answers


async def ask_later(
    executable: Path | str, sock: Path, *names: str, meanwhile: Callable[[int], None]
) -> dict[str, tuple[str, str]]:
    """`ask`, by a process that starts first, waits while `meanwhile(its pid)` runs, then asks."""
    command = [str(executable), "-c", REQUEST, str(sock), "--wait", *names]
    async with await anyio.open_process(command, env=child_env()) as process:
        assert process.stdout is not None and process.stdin is not None
        out = b""
        while b"\n" not in out:
            out += await process.stdout.receive()
        assert out.startswith(b"ready\n"), out
        meanwhile(process.pid)
        await process.stdin.send(b"go\n")
        async for chunk in process.stdout:
            out += chunk
    answers = {}
    for line in out.decode().splitlines()[1:]:
        name, status, message = line.split(" ", 2)
        answers[name] = (status, message)
    return answers


@pytest.fixture
async def creds(files: FileSet, ca: CertificateAuthority) -> FileSet:
    files.put(ca.issue_svid(), ca.bundle_pem)
    return files


async def test_a_copied_interpreter_is_admitted_by_its_path_and_by_its_hash_and_a_rebuild_loses_the_hash(
    tmp_path: Path, creds: FileSet, app: Path
) -> None:
    policy = {"identity": {"bypath": {"executables": [str(app)]}, "byhash": {"sha256": [sha256_of(app)]}}}
    d = make_daemon(tmp_path, creds, policy, "bypath", "byhash")
    async with in_background(d.run, d.stop):
        with capture_logs() as logs:
            assert await ask(app, d.socket_path, "bypath", "byhash") == {"bypath": ("200", ""), "byhash": ("200", "")}
            original = await ask(REAL_PYTHON, d.socket_path, "bypath", "byhash")  # the same bytes at another path
        handed = [line for line in logs if line["event"] == "credentials handed out"]
        assert {line.get("exe") for line in handed} == {str(app), REAL_PYTHON}  # the audit names the executable
        denied = next(line for line in logs if line["event"] == "access denied")
        assert denied["exe"] == REAL_PYTHON and "its executable is" in denied["detail"]
        assert original["byhash"] == ("200", "")
        assert (
            original["bypath"][0] == "403"
            and f"its executable is {REAL_PYTHON} (allowed: executables {app})" in (original["bypath"][1])
        )
        rebuild(app)
        rebuilt = await ask(app, d.socket_path, "bypath", "byhash")
        assert rebuilt["bypath"] == ("200", "")
        assert rebuilt["byhash"][0] == "403" and f"its executable's SHA-256 is {sha256_of(app)}" in rebuilt["byhash"][1]


async def test_a_process_whose_executable_was_replaced_since_it_started_is_refused_by_path_and_by_hash(
    tmp_path: Path, creds: FileSet, app: Path
) -> None:
    policy = {"identity": {"bypath": {"executables": [str(app)]}, "byhash": {"sha256": [sha256_of(app)]}}}
    d = make_daemon(tmp_path, creds, policy, "bypath", "byhash")
    async with in_background(d.run, d.stop):
        # the process maps the old file, which the rebuild unlinks before it asks
        lines = await ask_later(app, d.socket_path, "bypath", "byhash", meanwhile=lambda _: rebuild(app))
    replaced = f"its executable was deleted or replaced since it started ({app} (deleted))"
    assert lines["bypath"][0] == "403" and replaced in lines["bypath"][1]
    assert lines["byhash"][0] == "403" and replaced in lines["byhash"][1]


async def test_the_workload_api_admits_a_caller_by_its_executable(tmp_path: Path, creds: FileSet, app: Path) -> None:
    d = make_daemon(
        tmp_path, creds, {"identity": {"default": {"executables": [str(app)]}}}, "default", workload_api=True
    )
    endpoint = f"unix://{tmp_path / 'workload.sock'}"
    async with in_background(d.run, d.stop):
        allowed = await anyio.run_process([str(app), "-c", RAW_CALL, endpoint], env=child_env(), check=False)
        refused = await anyio.run_process([REAL_PYTHON, "-c", RAW_CALL, endpoint], env=child_env(), check=False)
    assert allowed.stdout.decode().strip() == "OK", allowed.stderr.decode()[-2000:]
    answer = refused.stdout.decode()
    assert answer.startswith("PERMISSION_DENIED") and f"its executable is {REAL_PYTHON}" in answer


async def http_get(stream: anyio.abc.ByteStream, path: str) -> tuple[int, str]:
    """One GET (the metadata flavor header on), its status and body (the body only of a refusal)."""
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    await stream.send(head.encode())
    data = b""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            data += await stream.receive()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode() if status != 200 else ""


async def test_a_rule_on_the_executable_admits_the_unix_socket_and_refuses_the_metadata_listeners_tcp_callers(
    tmp_path: Path, creds: FileSet, upstreams: Upstreams
) -> None:
    policy = {"token": {"gcp": {"users": [os.getuid()], "executables": [REAL_PYTHON]}}}
    d = Daemon(
        Config.model_validate(
            {
                "identities": {"default": creds.config()},
                "tokens": {"gcp": metadata_token_config(upstreams)},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "metadata": {"address": "127.0.0.1:0", "token": "gcp", "email": "a@b.iam.gserviceaccount.com"},
                },
                "policy": policy,
            }
        )
    )
    async with in_background(d.run, d.stop):
        async with await anyio.connect_unix(d.socket_path) as unix:
            over_unix = await http_get(unix, "/v1/token/gcp")
        async with await anyio.connect_tcp("127.0.0.1", d.metadata_port) as tcp:
            over_tcp = await http_get(tcp, "/computeMetadata/v1/instance/service-accounts/default/token")
    assert over_unix == (200, "")
    assert over_tcp[0] == 403 and "it connected over TCP, where wlidd cannot tell its process" in over_tcp[1]


# ---- units: a real cgroup named as systemd names a service ---------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Where the unified hierarchy is mounted (cgroup2 in /proc/self/mountinfo), if anywhere."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            return Path(before.split()[4])
    return None


@pytest.fixture
def service_cgroup() -> Iterator[tuple[str, Path]]:
    """(unit name, its cgroup directory): a cgroup /wlidd-test.slice/wlidd-test-<pid>.service under this
    process's cgroup namespace root, removed after; skipped where the kernel does not let the test make one."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 (unified hierarchy) is mounted here")
    own = Path("/proc/self/cgroup").read_text()
    if "0::/\n" not in own and not own.endswith("0::/"):
        pytest.skip(f"this process is not at its cgroup namespace's root (cgroup {own.strip()!r}): paths would differ")
    unit = f"wlidd-test-{os.getpid()}.service"
    directory = mount / "wlidd-test.slice" / unit
    try:
        directory.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {mount}: {exc.strerror}")
    yield unit, directory
    for path in (directory, directory.parent):
        with contextlib.suppress(OSError):  # a process still in it (the test failed while it ran): left there
            path.rmdir()


async def test_a_process_in_a_services_cgroup_is_admitted_by_its_unit_and_others_are_not(
    tmp_path: Path, creds: FileSet, app: Path, service_cgroup: tuple[str, Path]
) -> None:
    unit, directory = service_cgroup

    def move_in(pid: int) -> None:
        (directory / "cgroup.procs").write_text(str(pid))
        assert Path(f"/proc/{pid}/cgroup").read_text().strip().endswith(f"/wlidd-test.slice/{unit}")

    d = make_daemon(tmp_path, creds, {"identity": {"byunit": {"units": [unit]}}}, "byunit")
    async with in_background(d.run, d.stop):
        inside = await ask_later(app, d.socket_path, "byunit", meanwhile=move_in)
        outside = await ask(app, d.socket_path, "byunit")
    assert inside == {"byunit": ("200", "")}
    assert outside["byunit"][0] == "403" and "names no systemd unit" in outside["byunit"][1]


# ---- identification on its own: an exited caller, the pidfd_open path, no /proc without selectors -----------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "peer.sock"))
    sock.listen()
    with sock:
        yield sock


CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()"
UNIT_POLICY = Policy.from_config(PolicyConfig(credentials=AccessRule(units=("billing.service",))), log_unknown=False)


@pytest.mark.parametrize("peer_pidfd", [None, False], ids=["SO_PEERPIDFD", "pidfd_open"])
async def test_a_caller_that_exited_before_it_was_identified_is_refused(
    listener: socket.socket, peer_pidfd: bool | None
) -> None:
    child = subprocess.Popen([sys.executable, "-c", CONNECT, listener.getsockname()], stdin=subprocess.PIPE)
    conn, _ = listener.accept()
    with conn:
        peer = socket_peer(conn)
        child.communicate(b"")  # it exits, and is reaped
        cache = CallerCache(processes=ProcessIdentifier(peer_pidfd=peer_pidfd))
        caller = await cache.caller_of(peer, UNIT_POLICY)
    assert caller.process is None and caller.process_problem == EXITED
    assert UNIT_POLICY.may_have_credentials(caller, "default").refusal == (
        f"uid {os.getuid()} ({caller.user}) pid {child.pid} may not have the credentials of 'default': "
        f"{EXITED} (allowed: units billing.service)"
    )


async def test_the_pidfd_open_path_admits_only_the_process_it_saw_at_accept(listener: socket.socket) -> None:
    """An older kernel's way (no SO_PEERPIDFD): the pid's process must have the start time recorded at
    accept, or, accepted before any rule read processes, have started in an earlier clock tick."""
    identifier = ProcessIdentifier(peer_pidfd=False)
    identifier.wanted = True  # a rule reads processes: accepts record the start time
    child = subprocess.Popen([sys.executable, "-c", CONNECT, listener.getsockname()], stdin=subprocess.PIPE)
    conn, _ = listener.accept()
    try:
        seen = identifier.accepted(conn, child.pid)
        assert seen.start_ticks is not None and seen.start_ticks > 0
        facts, problem = await identifier.identify(seen, Need.EXE)
        assert problem == "" and facts is not None and facts.exe == REAL_PYTHON
        other = PeerProcess(conn, child.pid, seen.accepted_ns, start_ticks=seen.start_ticks - 1)  # another process then
        assert await identifier.identify(other, Need.EXE) == (
            None,
            f"pid {child.pid} is now another process than the one that connected (the caller exited)",
        )
        unrecorded = PeerProcess(conn, child.pid, seen.accepted_ns - 10**9)  # "accepted" before it started
        assert await identifier.identify(unrecorded, Need.EXE) == (
            None,
            f"pid {child.pid} is a process started no earlier than the connection: it cannot be told from a "
            "process that took a pid the caller left (retry)",
        )
        assert (await identifier.identify(PeerProcess(conn, child.pid, boottime_ns() + 10**9), Need.EXE))[1] == ""
    finally:
        child.communicate(b"")
        conn.close()


async def test_nothing_of_proc_is_read_without_a_rule_on_the_callers_process(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("/proc was read")

    processes = ProcessIdentifier()
    monkeypatch.setattr(processes, "identify", refuse)
    child = subprocess.Popen([sys.executable, "-c", CONNECT, listener.getsockname()], stdin=subprocess.PIPE)
    conn, _ = listener.accept()
    try:
        peer = socket_peer(conn)
        cache = CallerCache(processes=processes)
        plain = Policy.from_config(PolicyConfig(), log_unknown=False)
        others = PolicyConfig(token={"t": AccessRule(users=(str(os.getuid() + 1),), executables=("/usr/bin/x",))})
        for policy in (None, plain, Policy.from_config(others, log_unknown=False)):  # the last: not for this uid
            caller = await cache.caller_of(peer, policy)
            assert caller.process is None and caller.process_problem == ""
    finally:
        child.communicate(b"")
        conn.close()


async def test_a_connections_process_is_read_once_per_need(listener: socket.socket) -> None:
    reads: list[int] = []
    processes = ProcessIdentifier()
    real_read = processes._read

    def counting(peer: PeerProcess, need: Need) -> Any:
        reads.append(peer.pid)
        return real_read(peer, need)

    processes._read = counting  # type: ignore[method-assign]
    child = subprocess.Popen([sys.executable, "-c", CONNECT, listener.getsockname()], stdin=subprocess.PIPE)
    conn, _ = listener.accept()
    try:
        peer = socket_peer(conn)
        cache = CallerCache(processes=processes)
        policy = Policy.from_config(PolicyConfig(credentials=AccessRule(executables=(REAL_PYTHON,))), log_unknown=False)
        first = await cache.caller_of(peer, policy)
        again = await cache.caller_of(peer, policy)
        assert first == again and first.process is not None and first.process.exe == REAL_PYTHON and len(reads) == 1
        assert policy.may_have_credentials(first, "default").allowed
        other = await cache.caller_of(socket_peer(conn), policy)  # another connection of the same process
        assert other.process == first.process and len(reads) == 2
    finally:
        child.communicate(b"")
        conn.close()
