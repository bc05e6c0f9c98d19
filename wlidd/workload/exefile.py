"""A caller's executable file: on which file system it is (from procfs alone), and opened off the event loop.

LOCAL_FILESYSTEMS   the file systems whose files the kernel serves alike to every reader (wlidd trusts an
                    executable's identity and hash only there: a FUSE server answers each reader as it likes)
mount_fstype        the file system type of the mount holding a path, from a /proc/PID/mountinfo text
ExeOpener           opens /proc/PID/exe in a worker thread, with a timeout and a bound on stuck threads
script_interpreter  the `#!` line of a script (`wlidd check`: a script is never a process's executable)
"""

from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.to_thread

EXITED = "the caller exited during identification"


class ExeReader(Protocol):
    """What `ExeOpener` opens a process's executable with (wlidd.workload.proc.ProcReader)."""

    def open_exe(self, pid: int, *, hashing: bool = True) -> int: ...

    def mountinfo(self, pid: int) -> str: ...


LOCAL_FILESYSTEMS = frozenset(
    # local disk and memory file systems: the kernel serves one file's bytes alike to every reader. Not
    # fuse (its server answers each reader as it likes), nor network ones, nor overlay (its layers may be
    # anything, a user's FUSE mount too, in a user namespace): executables on those are refused.
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "zfs", "bcachefs", "nilfs2", "tmpfs"}
    | {"ramfs", "squashfs", "erofs", "iso9660", "vfat", "exfat"}
)


def mount_fstype(mountinfo: str, path: str) -> str | None:
    """The file system type of the mount holding `path` in a /proc/PID/mountinfo text (proc(5): field 5 is
    the mount point, octal-escaped; the type follows the " - " separator): the last mount whose mount
    point is `path` or a directory above it. None when no line matches."""
    found = None
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        parts = fields.split(" ")
        if not sep or len(parts) < 5:
            continue
        mount_point = _unescape(parts[4])
        if mount_point == "/" or path == mount_point or path.startswith(mount_point + "/"):
            found = rest.split(" ", 1)[0]
    return found


def dev_fstype(mountinfo: str, dev: int) -> str | None:
    """The file system type of a mount whose device (field 3, major:minor) is `dev` (an st_dev), else None
    (a btrfs subvolume below a mount has a device of its own)."""
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        parts = fields.split(" ")
        if not sep or len(parts) < 5:
            continue
        major, _, minor = parts[2].partition(":")
        if major.isdigit() and minor.isdigit() and os.makedev(int(major), int(minor)) == dev:
            return rest.split(" ", 1)[0]
    return None


def opened_file_problem(mountinfo: str, dev: int, exe: str) -> str:
    """ "" when the file opened through /proc/PID/exe (its st_dev `dev`) is on a local file system, else
    why not. Checked after the open, because the process may exec another file between wlidd's look at
    its path (`mount_fstype`) and the open: the opened file's own device is what counts."""
    fstype = dev_fstype(mountinfo, dev)
    if fstype is None and mount_fstype(mountinfo, exe) == "btrfs":
        return ""  # a btrfs subvolume: its files' device is not its mount's
    if fstype is not None and fstype.split(".", 1)[0] in LOCAL_FILESYSTEMS:
        return ""
    return (
        f"the file it runs is on a {fstype or 'unknown'} file system, not a local disk one (it ran another "
        "program than when its path was read): executables and sha256 rules refuse it"
    )


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space, …: fs/proc_namespace.c) undone."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class ExeOpener:
    """Opens a caller's executable (/proc/PID/exe) off the event loop: a file on a file system that never
    answers would block the thread that opens it, so at most `max_stuck` opens run at once (a further
    one is refused: retry) and each is given up after `timeout` seconds (the thread may stay blocked in
    the kernel: it keeps its slot until the open returns, then closes what it opened)."""

    def __init__(self, max_stuck: int = 4, timeout: float = 5.0) -> None:
        self.max_stuck = max_stuck
        self.timeout = timeout
        self._lock = threading.Lock()
        self.busy = 0  # opens under way in worker threads, given up on or not

    async def open(
        self, reader: ExeReader, pid: int, exe: str, *, hashing: bool
    ) -> tuple[tuple[int, os.stat_result, tuple[int, int] | None] | None, str]:
        """((fd, its fstat, (st_dev, st_ino) of `exe` in wlidd's namespace or None), "") or (None, why not).
        The fd is the caller's to close. `hashing` opens it for reading, else O_PATH (no open of the file)."""
        with self._lock:
            if self.busy >= self.max_stuck:
                return None, (
                    f"wlidd already has {self.busy} executables of callers being opened that do not answer; retry"
                )
            self.busy += 1
        slot = _OpenSlot()
        with anyio.move_on_after(self.timeout):
            await anyio.to_thread.run_sync(self._open, slot, reader, pid, exe, hashing, abandon_on_cancel=True)
        with slot.lock:
            slot.abandoned = True
            result, problem = slot.result, slot.problem
            slot.result = None
        if result is None and not problem:
            return None, f"its executable did not open within {self.timeout:g} s (a file system that does not answer)"
        return result, problem

    def _open(self, slot: _OpenSlot, reader: ExeReader, pid: int, exe: str, hashing: bool) -> None:
        """In a worker thread: open, fstat, stat; the result to `slot`, or closed if it was given up on."""
        fd = -1
        try:
            fd = reader.open_exe(pid, hashing=hashing)
            st = os.fstat(fd)
            if problem := opened_file_problem(reader.mountinfo(pid), st.st_dev, exe):
                with slot.lock:
                    slot.problem = problem
                return
            try:
                here = os.stat(exe)
                path_id: tuple[int, int] | None = (here.st_dev, here.st_ino)
            except OSError:
                path_id = None
            with slot.lock:
                if not slot.abandoned:
                    slot.result, fd = (fd, st, path_id), -1
        except OSError as exc:
            with slot.lock:
                slot.problem = _open_failure(exc)
        finally:
            if fd >= 0:
                os.close(fd)
            with self._lock:
                self.busy -= 1


@dataclass(eq=False)
class _OpenSlot:
    """Where an `ExeOpener` thread leaves its result; `abandoned` once the event loop stopped waiting."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    result: tuple[int, os.stat_result, tuple[int, int] | None] | None = None
    problem: str = ""


def _open_failure(exc: OSError) -> str:
    """Why a caller's executable could not be opened through /proc/PID/exe."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "wlidd may not open the executable of another user's process (it needs CAP_SYS_PTRACE)"
    if exc.errno == errno.ENOENT:
        return EXITED
    return f"its executable could not be opened: {os.strerror(exc.errno or 0)}"


def script_interpreter(path: str) -> str | None:
    """The interpreter line of a script (a file starting with `#!`), else None (unreadable too)."""
    try:
        with open(path, "rb") as file:
            head = file.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    return head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
