"""An unprivileged attacker on the node against rules on units, executables and sha256 (issue 19).

Each test is an attack that should be refused, or a message the operator should get, and fails today.
The attacker is uid 65534 (`setpriv`), running programs copied into a world-readable directory
(`shared_dir`); the daemon runs in this process as root, its Unix socket world-writable (mode 0666, as
a node that lets every uid ask would have it). The allowed program is a root-owned file in that
directory that the attacker may run but not write. Responses are printed by the attacker as their
status and refusal only, never a body holding a key.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import FileSet, in_background, wait_until
from wlidd.config import AccessRule, Config, PolicyConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.policy import policy_warnings
from wlidd.workload import digest
from wlidd.workload.digest import ExecutableDigests
from wlidd.workload.model import Need
from wlidd.workload.proc import PROCESSES, ProcessIdentifier

REAL_PYTHON = os.path.realpath(sys.executable)
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

# GET /v1/credentials/<name> on a connected socket `s`; prints "<status> <refusal message or nothing>"
ASK_ON = """
def ask_on(s, name):
    import json
    s.sendall(f"GET /v1/credentials/{name} HTTP/1.1\\r\\nHost: wlidd\\r\\nConnection: close\\r\\n\\r\\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, body = data.split(b"\\r\\n\\r\\n", 1)
    status = head.split(b" ", 2)[1].decode()
    print(status, json.loads(body)["message"] if status != "200" else "", flush=True)
"""
ASK = (
    ASK_ON
    + """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
ask_on(s, sys.argv[2])
"""
)


def needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run the attacker as another uid")


@pytest.fixture
async def creds(files: FileSet, ca: CertificateAuthority) -> FileSet:
    files.put(ca.issue_svid(), ca.bundle_pem)
    return files


def make_daemon(shared: Path, files: FileSet, policy: dict[str, Any], *names: str) -> Daemon:
    """A daemon whose Unix socket every uid may connect to, with an identity per name."""
    listeners = {"unix": {"path": str(shared / "wlidd.sock"), "mode": 0o666}}
    identities = {name: files.config() for name in names}
    return Daemon(Config.model_validate({"identities": identities, "listeners": listeners, "policy": policy}))


def installed(shared: Path, name: str, source: str = REAL_PYTHON) -> Path:
    """A root-owned copy of `source` in the shared directory: the attacker may run it, not write it."""
    path = shared / name
    shutil.copy2(source, path)
    path.chmod(0o755)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def run_as_nobody(*command: str) -> tuple[str, str]:
    """(stdout, stderr) of `command` run as uid 65534 with no groups; it must exit 0."""
    result = await anyio.run_process([*AS_NOBODY, *command], check=False, cwd="/")
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    return out, err


# ---- executables: the connector becomes the allowed program after connect() ---------------------------

EXEC_AFTER_CONNECT = (
    ASK_ON
    + """
import os, socket, sys, time
path, app, name = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
s.connect(path)                       # the connector: this process, running the attacker's own program
r, w = os.pipe()
if os.fork():                         # the connector becomes the allowed program (cat: waits for EOF)
    os.close(w)
    os.dup2(r, 0)
    os.execv(app, [app])
os.close(r)                           # its child keeps the connected socket, and asks once the exec is done
deadline = time.monotonic() + 10
while os.readlink(f"/proc/{os.getppid()}/exe") != app and time.monotonic() < deadline:
    time.sleep(0.001)
ask_on(s, name)
"""
)


async def test_a_connector_that_execs_the_allowed_program_lends_it_to_the_socket_it_left_behind_as_documented(
    shared_dir: Path, creds: FileSet
) -> None:
    """The attacker's own program connects, forks, and execs the allowed program (which it may run, but
    whose code it does not control); the child, still the attacker's code, asks on the socket. wlidd
    reads /proc/<connector>/exe at the first request, after the exec, and names the allowed program: it
    cannot tell (the kernel keeps no exec count a peer's pidfd could be checked against). So `executables`
    and `sha256` admit anyone who can run that file, as the README says, and `wlidd check` warns of a rule
    that selects on nothing else."""
    needs_root()
    app = installed(shared_dir, "app", "/bin/cat")  # the allowed program: the attacker runs no code in it
    evil = installed(shared_dir, "evil")  # the attacker's program (an interpreter: any code)
    policy = {"identity": {"default": {"executables": [str(app)]}}}
    d = make_daemon(shared_dir, creds, policy, "default")
    async with in_background(d.run, d.stop):
        out, _ = await run_as_nobody(str(evil), "-c", EXEC_AFTER_CONNECT, str(d.socket_path), str(app), "default")
    assert out.startswith("200 "), out  # the documented limit: no boundary between users on its own
    warnings = policy_warnings(PolicyConfig.model_validate(policy))
    assert any("anyone who can run that file" in warning for warning in warnings), warnings


# ---- executables: a path in the attacker's own mount namespace ----------------------------------------

BIND_OVER = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


async def test_a_path_bind_mounted_in_the_attackers_own_mount_namespace_is_not_the_allowed_executable(
    shared_dir: Path, creds: FileSet
) -> None:
    """An unprivileged user makes a user and mount namespace (`unshare -Urm`), bind-mounts its own program
    over the allowed path there and runs it: /proc/PID/exe, read by wlidd, names the allowed path (a path
    is resolved in the process's mount namespace), though the file is the attacker's. A path rule must
    be checked against the file itself (the exe's device and inode against the path's, in wlidd's
    namespace), not its name."""
    needs_root()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run([*AS_NOBODY, "unshare", "-Urm", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are off here: {probe.stderr.strip()}")
    app = installed(shared_dir, "app", "/bin/true")  # the allowed program; the attacker never runs it
    evil = installed(shared_dir, "evil")
    d = make_daemon(shared_dir, creds, {"identity": {"default": {"executables": [str(app)]}}}, "default")
    async with in_background(d.run, d.stop):
        command = ["unshare", "-Urm", "sh", "-c", BIND_OVER, "sh", str(evil), str(app)]
        out, _ = await run_as_nobody(*command, str(app), "-c", ASK, str(d.socket_path), "default")
    assert out.startswith("403 "), out


# ---- sha256: one uid's hashes hold every other caller's first decision -----------------------------------


class HashGate:
    """Holds each hash wlidd starts (`wlidd.workload.digest.hash_descriptor`) until `release_one`; records
    the inode of each file whose hash began, in order (`started`)."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self._gate = threading.Semaphore(0)
        self._real = digest.hash_descriptor

    def __call__(self, fd: int, version: digest.FileVersion) -> tuple[str | None, str]:
        self.started.append(version[1])
        self._gate.acquire(timeout=30)
        return self._real(fd, version)

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self._gate.release()


def queued_or_done(digests: ExecutableDigests, finished: list[str], count: int) -> bool:
    """Whether `count` callers have each a hash under way or queued, or their answer."""
    return len(digests._running) + len(finished) >= count


def hash_queued_or_started(digests: ExecutableDigests, gate: HashGate, inode: int) -> bool:
    return inode in gate.started or any(version[1] == inode for version in digests._running)


def next_hash_started(gate: HashGate, before: int, digests: ExecutableDigests) -> bool:
    return len(gate.started) > before or not digests._running


async def test_one_uids_hashes_do_not_queue_ahead_of_every_other_callers_hash(
    shared_dir: Path, creds: FileSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rule with sha256 and no users (any uid whose executable has that hash) makes wlidd hash the
    executable of every caller, up to 512 MiB each, two at a time, first come first served. An attacker
    with a few processes running distinct files (or one it touches: a file changed in the last 2 s is
    hashed anew for every connection) keeps both hash slots busy and queues ahead of the legitimate
    program's first hash, which waits for all of them (its request past `request_timeout` with 64
    connections of 512 MiB). Here each hash is held at a gate and released one at a time: the
    legitimate program's hash should start before the attacker's queue is drained."""
    needs_root()
    attackers = [installed(shared_dir, f"evil{index}") for index in range(4)]  # four distinct files
    app = installed(shared_dir, "app")
    digests = ExecutableDigests()  # two hashes at a time, as the daemon's
    monkeypatch.setattr(PROCESSES, "digests", digests)
    gate = HashGate()
    monkeypatch.setattr(digest, "hash_descriptor", gate)
    finished: list[str] = []

    async def attack(evil: Path) -> None:
        finished.append((await run_as_nobody(str(evil), "-c", ASK, str(d.socket_path), "svc"))[0])

    d = make_daemon(shared_dir, creds, {"identity": {"svc": {"sha256": [sha256_of(app)]}}}, "svc")
    inode = app.stat().st_ino
    async with in_background(d.run, d.stop), anyio.create_task_group() as tg:
        try:
            for evil in attackers:
                tg.start_soon(attack, evil)
            await wait_until(partial(queued_or_done, digests, finished, len(attackers)), what="the attacker's hashes")
            tg.start_soon(anyio.run_process, [str(app), "-c", ASK, str(d.socket_path), "svc"])
            await wait_until(partial(hash_queued_or_started, digests, gate, inode), what="the legitimate hash queued")
            while inode not in gate.started:
                before = len(gate.started)
                gate.release()
                await wait_until(partial(next_hash_started, gate, before, digests), what="the next hash")
        finally:
            gate.release(10)
    position = gate.started.index(inode)
    assert position <= 2, f"the legitimate program's hash began after {position} of the attacker's"


# ---- sha256: the executable's file is opened on the event loop -------------------------------------------


class FuseFile:
    """A one-file FUSE file system served by this process over /dev/fuse (include/uapi/linux/fuse.h,
    protocol 7.31): the file `app` at the mount point holds `data`. While `stall` is set, each OPEN is
    held unanswered (its requester's pid recorded in `held`) until `release` is set: what an attacker's
    own FUSE server (fusermount3, an AppImage's) does when it stops answering. With `decoy`, this
    process's own threads (wlidd's) open it uncached (FOPEN_DIRECT_IO) and read `decoy` instead, while
    the kernel maps `data` for everyone else: a file whose bytes depend on who reads them."""

    IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
    OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
    ATTR = struct.Struct(
        "<QQQQQQIIIIIIIIII"
    )  # ino size blocks atime mtime ctime (3 nsec) mode nlink uid gid rdev blksize flags
    LOOKUP, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, DESTROY = 1, 3, 14, 15, 18, 25, 26, 38
    NO_REPLY = frozenset({2, 36, 42})  # FORGET, INTERRUPT, BATCH_FORGET

    def __init__(self, mountpoint: Path, data: bytes, decoy: bytes | None = None) -> None:

        assert decoy is None or len(decoy) == len(data), "one size for both readers"
        self.mountpoint, self.data, self.decoy = mountpoint, data, decoy
        self.stall, self.release = threading.Event(), threading.Event()
        self.held: list[int] = []
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self.libc = ctypes.CDLL(None, use_errno=True)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if self.libc.mount(b"wlidd-test", str(mountpoint).encode(), b"fuse", 2 | 4, options) != 0:  # nosuid, nodev
            error = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(error, os.strerror(error))
        threading.Thread(target=self._serve, daemon=True).start()

    def _attr(self, node: int) -> bytes:
        if node == 1:
            return self.ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
        size = len(self.data)
        return self.ATTR.pack(2, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, 0o100755, 1, 0, 0, 0, 4096, 0)

    @staticmethod
    def _ours(tid: int) -> bool:
        """Whether a request comes from a thread of this process (FUSE names the requesting thread)."""
        return os.path.exists(f"/proc/self/task/{tid}")

    def _reply(self, unique: int, error: int = 0, payload: bytes = b"") -> None:
        with contextlib.suppress(OSError):  # the request was interrupted, or the mount is gone
            os.write(self.fd, self.OUT_HEADER.pack(self.OUT_HEADER.size + len(payload), -error, unique) + payload)

    def _answer_open_later(self, unique: int) -> None:
        self.release.wait(60)
        self._reply(unique, payload=struct.pack("<QIi", 0, 0, 0))

    def _serve(self) -> None:

        while True:
            try:
                request = os.read(self.fd, 1 << 21)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            _, opcode, unique, node, _, _, pid, _, _ = self.IN_HEADER.unpack_from(request)
            body = request[self.IN_HEADER.size :]
            if opcode in self.NO_REPLY:
                continue
            if opcode == self.INIT:  # 7.31, no flags; max_background 16, congestion 12, max_write 64 KiB, max_pages 32
                self._reply(unique, payload=struct.pack("<IIIIHHIIHHII24x", 7, 31, 0, 0, 16, 12, 65536, 1, 32, 0, 0, 0))
            elif opcode == self.LOOKUP:
                if node == 1 and body.rstrip(b"\0") == b"app":
                    self._reply(unique, payload=struct.pack("<QQQQII", 2, 0, 3600, 3600, 0, 0) + self._attr(2))
                else:
                    self._reply(unique, errno.ENOENT)
            elif opcode == self.GETATTR:
                self._reply(unique, payload=struct.pack("<QII", 3600, 0, 0) + self._attr(node))
            elif opcode == self.OPEN and self.stall.is_set():
                self.held.append(pid)
                threading.Thread(target=self._answer_open_later, args=(unique,), daemon=True).start()
            elif opcode == self.OPEN:
                direct_io = 1 if self.decoy is not None and self._ours(pid) else 0  # FOPEN_DIRECT_IO
                self._reply(unique, payload=struct.pack("<QIi", 0, direct_io, 0))
            elif opcode == self.READ:
                offset, size = struct.unpack_from("<QQI", body)[1:]
                data = self.decoy if self.decoy is not None and self._ours(pid) else self.data
                self._reply(unique, payload=data[offset : offset + size])
            elif opcode in (self.RELEASE, self.FLUSH, self.DESTROY):
                self._reply(unique)
            else:
                self._reply(unique, errno.ENOSYS)

    def close(self) -> None:
        self.release.set()
        self.libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH
        os.close(self.fd)


WAIT_THEN_ASK = (
    ASK_ON
    + """
import socket, sys
print("ready", flush=True)
sys.stdin.readline()
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
ask_on(s, sys.argv[2])
"""
)


def health_while_held(fuse: FuseFile, sock: Path, answered: threading.Event, answers: list[str]) -> None:
    """In a thread (the event loop may be stuck): once wlidd's OPEN is held (or the attacker was
    `answered` without one), ask /v1/health on another connection and record the status line or "no
    answer"; then let the OPEN be answered."""
    try:
        deadline = time.monotonic() + 30
        while os.getpid() not in fuse.held and not answered.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: wlidd\r\nConnection: close\r\n\r\n")
            try:
                answers.append(s.recv(4096).split(b"\r\n", 1)[0].decode())
            except TimeoutError:
                answers.append("no answer")
    finally:
        fuse.release.set()


async def test_a_caller_whose_executable_never_opens_does_not_stop_the_daemon(shared_dir: Path, creds: FileSet) -> None:
    """wlidd opens /proc/PID/exe (to hash it) on its event loop, for every caller that a rule with sha256
    admits on users and groups: here `units = ["billing.service"]` with sha256, no users, so any uid;
    the open comes before the unit is even compared. A user runs its program from its own FUSE mount
    (on a stock Debian, fusermount3 lets any user mount; AppImages run this way) and stops answering:
    open() blocks in the kernel, and every listener, the watchdog and every other caller stop with it.
    Here /v1/health, asked on another connection while the OPEN is held, gets no answer."""
    needs_root()

    fuse = fuse_or_skip(shared_dir, Path(REAL_PYTHON).read_bytes())
    app = installed(shared_dir, "app")
    policy = {"identity": {"default": {"units": ["billing.service"], "sha256": [sha256_of(app)]}}}
    d = make_daemon(shared_dir, creds, policy, "default")
    answers: list[str] = []
    try:
        async with in_background(d.run, d.stop):
            command = [*AS_NOBODY, str(fuse.mountpoint / "app"), "-c", WAIT_THEN_ASK, str(d.socket_path), "default"]
            async with await anyio.open_process(command, cwd="/") as attacker:
                assert attacker.stdout is not None and attacker.stdin is not None
                assert (await attacker.stdout.receive()).startswith(b"ready"), "the attacker did not start"
                fuse.stall.set()  # its program is running; from now on, OPEN is held
                answered = threading.Event()
                probe = threading.Thread(target=health_while_held, args=(fuse, d.socket_path, answered, answers))
                probe.start()
                await attacker.stdin.send(b"go\n")
                refusal = b"".join([chunk async for chunk in attacker.stdout])
                answered.set()
                await anyio.to_thread.run_sync(probe.join)
    finally:
        fuse.close()
    assert answers == ["HTTP/1.1 200 OK"], f"/v1/health while wlidd opened the caller's executable: {answers}"
    assert refusal.lstrip().startswith(b"403 "), refusal


def fuse_or_skip(shared: Path, data: bytes, decoy: bytes | None = None) -> FuseFile:
    mountpoint = shared / "fuse"
    mountpoint.mkdir()
    mountpoint.chmod(0o755)
    try:
        return FuseFile(mountpoint, data, decoy)
    except OSError as exc:
        pytest.skip(f"cannot mount a FUSE file system here: {exc.strerror}")


async def test_a_file_whose_bytes_depend_on_who_reads_them_does_not_pass_for_the_allowed_hash(
    shared_dir: Path, creds: FileSet
) -> None:
    """sha256 is read through /proc/PID/exe, "the exact file the process maps"; but the bytes of a file on
    the caller's own FUSE mount are whatever its server answers, to each reader: the kernel maps the
    attacker's program when it runs it, wlidd reads the allowed program's bytes when it hashes. No
    LD_PRELOAD nor ptrace needed (a static binary, a ptrace_scope of 3 do not help). wlidd should
    refuse to trust the hash (or path) of an executable on a file system its caller's user may serve."""
    needs_root()
    app = installed(shared_dir, "app", "/bin/cat")  # the allowed bytes
    program = Path(REAL_PYTHON).read_bytes()
    assert len(program) <= app.stat().st_size, "the attacker's program must fit in the allowed file's size"
    fuse = fuse_or_skip(shared_dir, program.ljust(app.stat().st_size, b"\0"), decoy=app.read_bytes())
    d = make_daemon(shared_dir, creds, {"identity": {"default": {"sha256": [sha256_of(app)]}}}, "default")
    try:
        async with in_background(d.run, d.stop):
            out, _ = await run_as_nobody(str(fuse.mountpoint / "app"), "-c", ASK, str(d.socket_path), "default")
    finally:
        fuse.close()
    assert out.startswith("403 "), out


# ---- what the operator is told -------------------------------------------------------------------------


async def test_on_a_kernel_without_so_peerpidfd_a_caller_hidden_by_hidepid_is_not_said_to_have_exited(
    tmp_path: Path,
) -> None:
    """The shipped unit has ProtectProc=invisible: another user's /proc/PID is absent (ENOENT). With
    SO_PEERPIDFD the refusal says so ("wlidd cannot see /proc/PID …"). On the pidfd_open path (Linux <
    6.5: Debian 12, Ubuntu 22.04, RHEL 9) the start time read at accept fails the same way, is recorded
    as "gone" (-1), and the refusal says "the caller exited during identification" for a caller that is
    alive and waiting: the operator is sent after a race instead of the unit's ProtectProc. (The empty
    /proc here is what hidepid=invisible shows wlidd of another user's processes.)"""

    hidden = tmp_path / "proc"
    hidden.mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "peer.sock"))
        server.listen()
        connect = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()"
        child = subprocess.Popen([sys.executable, "-c", connect, str(tmp_path / "peer.sock")], stdin=subprocess.PIPE)
        conn, _ = server.accept()
        try:
            problems = {}
            for path, peer_pidfd in (("SO_PEERPIDFD", None), ("pidfd_open", False)):
                identifier = ProcessIdentifier(proc=hidden, peer_pidfd=peer_pidfd)
                identifier.wanted = True  # a rule reads processes: accepts record what they need
                facts, problems[path] = await identifier.identify(identifier.accepted(conn, child.pid), Need.UNIT)
                assert facts is None
        finally:
            child.communicate(b"")
            conn.close()
    assert problems["SO_PEERPIDFD"].startswith(f"wlidd cannot see /proc/{child.pid}"), problems
    assert problems["pidfd_open"] == problems["SO_PEERPIDFD"], problems


CHECK_CONFIG = """
[identities.default]
source = "files"
cert = "{dir}/chain.pem"
key = "{dir}/key.pem"
bundle = "{dir}/bundle.pem"

[listeners.unix]
path = "{dir}/wlidd.sock"

[policy.identity.default]
executables = ["{app}"]
"""


def test_wlidd_check_run_without_cap_sys_ptrace_says_rules_on_executables_will_refuse_other_users(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """The shipped unit gives wlidd no capabilities; a rule on executables or sha256 then refuses every
    other user's process ("it needs CAP_SYS_PTRACE"), which the README's drop-in fixes. `wlidd check`,
    run without the capability (root here, CAP_SYS_PTRACE dropped from its bounding set: the repo stays
    unreadable to other uids), says "ok" and nothing of it: the operator learns it from the first
    refusals."""
    needs_root()
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = tmp_path / "wlidd.toml"
    config.write_text(CHECK_CONFIG.format(dir=files.dir, app=os.path.realpath("/bin/cat")))
    without_ptrace = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"]
    result = subprocess.run(
        [*without_ptrace, sys.executable, "-m", "wlidd", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    output = result.stdout + result.stderr
    assert "ok   default" in output, output  # the check itself ran
    assert "CAP_SYS_PTRACE" in output, output


def test_wlidd_check_warns_that_a_script_listed_in_executables_never_matches(shared_dir: Path) -> None:
    """A process running a script is named by its interpreter (/proc/PID/exe is /usr/bin/python3 for
    `#!/usr/bin/python3`): a rule listing the script's path refuses it forever, and one listing the
    interpreter admits every script it runs. `wlidd check` warns of a link or a missing file, not of a
    script."""
    script = shared_dir / "billing-worker"
    script.write_text("#!/usr/bin/python3\nprint('hello')\n")
    script.chmod(0o755)
    warnings = policy_warnings(PolicyConfig(credentials=AccessRule(executables=(str(script),))))
    assert any(str(script) in warning and "interpreter" in warning for warning in warnings), warnings
