"""The caller's executable file: never touched on the event loop, nor at all on a file system whose server
may answer wlidd otherwise than the kernel (wlidd.workload.proc), and one uid's hashes bounded
(wlidd.workload.digest). Real processes and threads; a fake /proc where the test needs a FUSE mount."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from wlidd.workload import digest
from wlidd.workload.digest import SETTLED_NS, ExecutableDigests
from wlidd.workload.exefile import ExeOpener, mount_fstype, opened_file_problem
from wlidd.workload.model import Need
from wlidd.workload.proc import ProcessIdentifier, ProcReader

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /home/alice/my\\040apps rw,nosuid,nodev - fuse.sshfs alice@host: rw,user_id=1000
31 22 0:41 / /home/alice/my rw - tmpfs tmpfs rw
40 22 0:50 / /opt rw - fuse.appimage app rw
41 22 8:2 / /opt rw - xfs /dev/sda2 rw
"""


def test_the_file_system_of_a_path_is_the_last_mount_whose_mount_point_holds_it() -> None:
    assert mount_fstype(MOUNTINFO, "/usr/bin/app") == "ext4"
    assert mount_fstype(MOUNTINFO, "/home/alice/my apps/run") == "fuse.sshfs"  # an escaped mount point
    assert mount_fstype(MOUNTINFO, "/home/alice/my/run") == "tmpfs"
    assert mount_fstype(MOUNTINFO, "/home/alice/myapp") == "ext4"  # a prefix of the name is not a directory
    assert mount_fstype(MOUNTINFO, "/opt/app") == "xfs"  # mounted over the FUSE mount: it hides it
    assert mount_fstype("garbage\n", "/x") is None


@pytest.fixture
def child() -> Iterator[tuple[socket.socket, int]]:
    """A live process connected to a socket of ours: (our end, its pid)."""
    server, peer = socket.socketpair(socket.AF_UNIX)
    code = "import sys; sys.stdin.read()"
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, pass_fds=(peer.fileno(),))
    peer.close()
    try:
        yield server, process.pid
    finally:
        process.communicate(b"")
        server.close()


def fake_proc(root: Path, pid: int, exe: str, fstype: str) -> None:
    """/proc/<pid> with the entries wlidd reads before it would touch the file: its exe link, mountinfo
    (and stat, for the pidfd_open path of a kernel without SO_PEERPIDFD)."""
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "exe").symlink_to(exe)
    (root / str(pid) / "stat").write_text(f"{pid} (app) S {'0 ' * 18}1 0\n")  # started at tick 1 (pidfd_open path)
    (root / str(pid) / "mountinfo").write_text(
        f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 0:40 / /fs rw - {fstype} x rw\n"
    )


async def test_an_executable_on_a_fuse_mount_is_refused_without_being_opened(
    tmp_path: Path, child: tuple[socket.socket, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's mountinfo says its executable is on FUSE: its hash and its identity are refused, saying
    so, and the file is never opened (nor stat()ed) by wlidd."""
    server, pid = child
    fake_proc(tmp_path, pid, "/fs/app", "fuse.evil")
    identifier = ProcessIdentifier(proc=tmp_path, peer_pidfd=None)

    def never(*args: object, **kwargs: object) -> int:
        raise AssertionError("the executable was opened")

    monkeypatch.setattr(ProcReader, "open_exe", never)
    facts, problem = await identifier.identify(
        identifier.accepted(server, pid), Need.EXE | Need.SHA256, hash_if=lambda facts: Need.EXE | Need.SHA256
    )
    assert problem == "" and facts is not None and facts.exe == "/fs/app"
    assert facts.file_problem.startswith("its executable /fs/app is on a fuse.evil file system, not a local disk one")
    assert facts.exe_id is None and facts.sha256 is None


async def test_the_executable_is_not_touched_when_no_rule_wants_its_file(
    tmp_path: Path, child: tuple[socket.socket, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cheap selectors first: when the unit or path already refuse every rule with executables or sha256
    (`hash_if` answers nothing), the file is not opened."""
    server, pid = child
    fake_proc(tmp_path, pid, "/usr/bin/app", "ext4")
    identifier = ProcessIdentifier(proc=tmp_path, peer_pidfd=None)

    def never(*args: object, **kwargs: object) -> int:
        raise AssertionError("the executable was opened")

    monkeypatch.setattr(ProcReader, "open_exe", never)
    facts, problem = await identifier.identify(
        identifier.accepted(server, pid), Need.EXE | Need.SHA256, hash_if=lambda facts: Need.NOTHING
    )
    assert problem == "" and facts is not None and facts.exe == "/usr/bin/app"
    assert facts.sha256_problem == "not hashed: no rule with sha256 admits it otherwise"
    assert Need.EXE not in facts.read and Need.SHA256 not in facts.read  # read again if a later policy wants it


class StuckReader(ProcReader):
    """A reader whose open of an executable blocks until `release` (a FUSE server that does not answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.opened: list[int] = []

    def open_exe(self, pid: int, *, hashing: bool = True) -> int:
        self.entered.set()
        self.release.wait(30)
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.opened.append(fd)
        return fd


async def test_an_open_that_never_returns_is_given_up_after_a_timeout_and_bounds_the_stuck_threads() -> None:
    """The open runs in a worker thread: the event loop keeps running, the caller is refused after the
    timeout, a further open while the thread is stuck is refused at once (one slot), and the descriptor
    the stuck open returns at last is closed by its thread."""
    reader = StuckReader()
    opener = ExeOpener(max_stuck=1, timeout=0.2)
    ticks = 0

    async def loop_runs() -> None:
        nonlocal ticks
        while not reader.release.is_set():
            ticks += 1
            await anyio.sleep(0.01)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop_runs)
            result, problem = await opener.open(reader, os.getpid(), "/usr/bin/app", hashing=True)
            assert (
                result is None
                and problem == "its executable did not open within 0.2 s (a file system that does not answer)"
            )
            assert ticks > 0, "the event loop did not run while the open was stuck"
            assert opener.busy == 1  # the thread is still in the kernel
            assert await opener.open(reader, os.getpid(), "/usr/bin/app", hashing=True) == (
                None,
                "wlidd already has 1 executables of callers being opened that do not answer; retry",
            )
            reader.release.set()
    finally:
        reader.release.set()
    for _ in range(500):
        if opener.busy == 0:
            break
        await anyio.sleep(0.01)
    assert opener.busy == 0 and len(reader.opened) == 1
    with pytest.raises(OSError):
        os.fstat(reader.opened[0])  # closed: nobody was waiting for it


async def test_one_uid_has_at_most_two_hashes_queued_or_running_and_others_are_not_held_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Semaphore(0)
    real = digest.hash_descriptor

    def held(fd: int, version: digest.FileVersion) -> tuple[str | None, str]:
        gate.acquire(timeout=30)
        return real(fd, version)

    monkeypatch.setattr(digest, "hash_descriptor", held)
    digests = ExecutableDigests(clock=lambda: 2**62 + SETTLED_NS)
    fds = []
    for index in range(4):
        (tmp_path / f"f{index}").write_bytes(b"x" * (index + 1))
        fds.append(os.open(tmp_path / f"f{index}", os.O_RDONLY))
    results: dict[int, tuple[str | None, str]] = {}

    async def hash_one(index: int, owner: int) -> None:
        results[index] = await digests.sha256(fds[index], os.fstat(fds[index]), owner=owner)

    try:
        async with anyio.create_task_group() as tg:
            for index in range(2):
                tg.start_soon(hash_one, index, 1000)
            while len(digests._running) < 2:
                await anyio.sleep(0.001)
            await hash_one(2, 1000)  # a third for that uid: refused at once
            assert results[2] == (None, "wlidd is already hashing 2 executables for uid 1000; retry when they are done")
            tg.start_soon(hash_one, 3, 0)  # another uid queues
            while len(digests._running) < 3:
                await anyio.sleep(0.001)
            gate.release(3)
    finally:
        gate.release(3)
        for fd in fds:
            os.close(fd)
    assert all(results[index][0] is not None for index in (0, 1, 3)), results
    assert digests._owners == {}


def test_the_file_opened_is_judged_by_its_own_device_not_by_the_path_read_before_it() -> None:
    """A process may exec a FUSE file between wlidd's readlink (a local path) and its open: the opened
    file's st_dev must be a local mount's (a btrfs subvolume's device, in no mountinfo line, passes)."""
    assert opened_file_problem(MOUNTINFO, os.makedev(8, 1), "/usr/bin/app") == ""
    assert opened_file_problem(MOUNTINFO, os.makedev(0, 40), "/usr/bin/app").startswith(
        "the file it runs is on a fuse.sshfs file system, not a local disk one"
    )
    assert opened_file_problem(MOUNTINFO, os.makedev(0, 99), "/usr/bin/app").startswith(
        "the file it runs is on a unknown"
    )
    btrfs = "22 1 0:30 / / rw - btrfs /dev/sda1 rw\n"
    assert opened_file_problem(btrfs, os.makedev(0, 77), "/srv/sub/app") == ""
