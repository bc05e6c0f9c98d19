"""A Unix socket's calling process, read from /proc while a pidfd names it alive: a reused pid never lends
its rights to the process that inherits the number.

Why a pidfd: SO_PEERCRED gives a pid *number*; the caller may exit and the number be given to another
process before wlidd reads /proc/<pid>. A pidfd names one process, never its successor, so:

  1. a pidfd for the peer: SO_PEERPIDFD (socket(7), Linux >= 6.5: the process that called connect(),
     whenever it is asked) where the kernel has it; else pidfd_open(2) on SO_PEERCRED's pid (Linux >= 5.3),
     whose process must be the one seen at accept: /proc/<pid>/stat's start time (field 22, clock ticks
     since boot; proc(5)) read then (`accepted`) must equal the one read through the pidfd's pid now;
  2. the facts, from /proc/<pid>, cheapest first and on the event loop only from procfs: `cgroup` (the
     unit: wlidd.workload.units), `exe` (readlink: the path it runs, d_path, no call into its file system;
     " (deleted)" when that file was unlinked or replaced since) and that path's file system type (its
     `mountinfo`: only local disk and memory ones, `LOCAL_FILESYSTEMS`, are trusted; a FUSE server may
     show wlidd other bytes than the kernel maps). Then, only when a rule still wants it given those
     facts, the file itself, opened through the `exe` link (the exact file the process maps) in a worker
     thread with a timeout and a bound on stuck threads (`ExeOpener`): its (st_dev, st_ino), the
     identity of the path in wlidd's own mount namespace (a path names another file in a namespace of
     the caller's own), and for a hash its bytes (wlidd.workload.digest);
  3. the pidfd must still name a live process (poll(2): a pidfd turns readable once its process exits);
     if not, every fact is dropped: "the caller exited during identification".
What the pidfd_open path cannot tell apart: a caller that exited between its connect() and wlidd's
accept(), whose pid another process took in that time (the pid space, kernel.pid_max, must wrap). A
connection accepted before wlidd knew a rule reads processes has no start time from its accept: its
process must then have started in an earlier clock tick (10 ms) than the accept, else it is refused
(retry). SO_PEERPIDFD has none of this.

Nothing here runs unless a rule selects on units, executables or sha256 (`Need`): a Unix connection only
records its socket, pid and accept time (`PeerProcess`, an allocation and a vDSO clock read), and the
start time only on a kernel without SO_PEERPIDFD once a rule reads processes (`ProcessIdentifier.wanted`). The facts
are read once per connection and need (`ProcessIdentifier.identify`), with the hash left to
wlidd.workload.digest. Permissions: /proc/<pid> must be visible to wlidd (not hidden by hidepid=, which
systemd's ProtectProc=invisible sets) and reading another user's `exe` takes CAP_SYS_PTRACE (proc(5):
ptrace access mode PTRACE_MODE_READ_FSCREDS); each failure is a reason in the refusal.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wlidd.errors import ProcessUnidentified
from wlidd.workload.digest import ExecutableDigests
from wlidd.workload.exefile import EXITED, LOCAL_FILESYSTEMS, ExeOpener, mount_fstype
from wlidd.workload.model import DELETED, Need, ProcessFacts
from wlidd.workload.units import CgroupFacts, cgroup_facts, init_root

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # include/uapi/asm-generic/socket.h, Linux >= 6.5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat's start time


class PeerSocket(Protocol):
    """A connected Unix socket (socket.socket, asyncio's TransportSocket): what SO_PEERPIDFD is read from."""

    def getsockopt(self, level: int, option: int, /) -> int: ...


def boottime_ns() -> int:
    """CLOCK_BOOTTIME in nanoseconds: the clock /proc/<pid>/stat's start times count on (proc(5))."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass(eq=False, slots=True)
class PeerProcess:
    """The process at the other end of one Unix connection, as accepted: its socket (for SO_PEERPIDFD),
    SO_PEERCRED's pid and the accept time (CLOCK_BOOTTIME ns); `memo` holds what was read of it, with
    the need and the policy it was read for (`ProcessIdentifier.identify`)."""

    sock: PeerSocket = field(repr=False)
    pid: int
    accepted_ns: int
    start_ticks: int | None = None  # /proc/<pid>/stat's start time at accept (pidfd_open path only); -1: gone
    start_errno: int = 0  # why it could not be read then (ENOENT: gone, or hidden from wlidd)
    memo: tuple[Need, object, ProcessFacts] | None = field(default=None, repr=False)
    # the caller its facts made, for (the caller without them, the policy): kept by wlidd.api.callers
    decided: tuple[object, object, object] | None = field(default=None, repr=False)


def _gone_or_hidden(pid: int, exc: OSError) -> str:
    """The reason for a /proc/<pid> read that failed while the process was alive (checked after)."""
    if exc.errno == errno.ENOENT:
        return f"wlidd cannot see /proc/{pid} (proc is mounted with hidepid=, e.g. ProtectProc=invisible in its unit)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"wlidd may not read /proc/{pid} of another user's process (it needs CAP_SYS_PTRACE)"
    return f"/proc/{pid} could not be read: {os.strerror(exc.errno or 0)}"


class ProcReader:
    """Reads /proc/<pid> entries under `root` (a fake tree in tests); each method raises OSError. Plain
    os calls on string paths: a read is a few microseconds, on the event loop (procfs never blocks on I/O)."""

    MAX_BYTES = 65536  # a /proc/<pid>/cgroup or stat text is far shorter
    MAX_MOUNTINFO = 16 << 20  # a mount table is rarely over a few hundred KiB

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root
        self._prefix = f"{root}/"
        self._init_root: str | None = None

    def _read(self, pid: int | str, name: str) -> str:
        fd = os.open(f"{self._prefix}{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, self.MAX_BYTES).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def cgroup(self, pid: int) -> CgroupFacts:
        """The cgroup facts of `pid`, shifted by pid 1's root (read once; "" when unreadable)."""
        if self._init_root is None:
            try:
                self._init_root = init_root(self._read(1, "cgroup"))
            except OSError:
                self._init_root = ""
        return cgroup_facts(self._read(pid, "cgroup"), self._init_root)

    def exe(self, pid: int) -> str:
        return os.readlink(f"{self._prefix}{pid}/exe")

    def open_exe(self, pid: int, *, hashing: bool = True) -> int:
        """The file the process runs, opened through /proc/PID/exe (for reading, else O_PATH). May block on
        the file's file system (FUSE): call it in a worker thread only (`ExeOpener`)."""
        flags = os.O_RDONLY if hashing else os.O_PATH
        return os.open(f"{self._prefix}{pid}/exe", flags | os.O_CLOEXEC | os.O_NOCTTY)

    def mountinfo(self, pid: int) -> str:
        """/proc/PID/mountinfo whole (up to MAX_MOUNTINFO bytes): the process's mounts, read from procfs."""
        fd = os.open(f"{self._prefix}{pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            size = 0
            while size < self.MAX_MOUNTINFO and (chunk := os.read(fd, 65536)):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def exists(self, pid: int) -> bool:
        return os.path.exists(f"{self._prefix}{pid}")

    def start_ticks(self, pid: int) -> int:
        """Field 22 of /proc/<pid>/stat (after the parenthesised command name, which may hold anything)."""
        text = self._read(pid, "stat")
        return int(text[text.rindex(")") + 2 :].split()[19])


def exited(pidfd: int) -> bool:
    """Whether the pidfd's process has exited (a pidfd polls readable then: pidfd_open(2))."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class ProcessIdentifier:
    """Identifies peers' processes (module docstring): one per daemon, shared by every listener.

    `proc` is the /proc to read, `digests` the executables' hash cache; `peer_pidfd` None learns at the
    first peer whether the kernel has SO_PEERPIDFD, False forces the pidfd_open path (tests)."""

    def __init__(
        self, proc: Path = Path("/proc"), digests: ExecutableDigests | None = None, peer_pidfd: bool | None = None
    ) -> None:
        self.reader = ProcReader(proc)
        self.digests = digests if digests is not None else ExecutableDigests()
        self.peer_pidfd = peer_pidfd
        self.wanted = False  # a rule reads callers' processes (wlidd.api.callers sets it from the policy)
        self.opener = ExeOpener()

    def accepted(self, sock: PeerSocket, pid: int) -> PeerProcess:
        """A Unix connection's peer as accepted; its start time too where the pidfd_open path will need it
        (a kernel without SO_PEERPIDFD, and a rule that reads processes)."""
        peer = PeerProcess(sock, pid, boottime_ns())
        if self.wanted and self.peer_pidfd is False:
            try:
                peer.start_ticks = self.reader.start_ticks(pid)
            except OSError as exc:
                peer.start_ticks = -1  # gone already, or hidden (hidepid=): identify tells which by the pidfd
                peer.start_errno = exc.errno or 0
            except (ValueError, IndexError):
                peer.start_ticks = -1
        return peer

    async def identify(
        self,
        peer: PeerProcess,
        need: Need,
        *,
        key: object = None,
        hash_if: Callable[[ProcessFacts], Need] | None = None,
        owner: int | None = None,
    ) -> tuple[ProcessFacts | None, str]:
        """(facts, "") of the peer's process with at least `need` read, or (None, why not). Once per
        connection for a need and `key` (the policy asking). The cheap facts (its unit, the path of its
        executable, that path's file system type) are read first, on the event loop, from procfs alone;
        the executable's file is touched (its identity, and for SHA256 its hash) only when `hash_if(facts)`
        says the facts so far leave a rule that wants it (EXE: its identity; SHA256: its hash too), and
        only off the event loop (`_file`). `owner` (the caller's uid) bounds the hashes one uid may have
        queued (wlidd.workload.digest)."""
        if peer.memo is not None:
            read, memo_key, facts = peer.memo
            if (need & ~facts.read) == Need.NOTHING or (read == need and memo_key is key):
                return facts, ""
        try:
            pidfd = self._pidfd(peer)
        except ProcessUnidentified as refused:
            return None, refused.why
        try:
            failure: ProcessUnidentified | None = None
            try:
                facts = self._read(peer, need)
            except ProcessUnidentified as refused:
                failure = refused
            if exited(pidfd):  # after every read: they were of this process, or are dropped
                return None, EXITED
            if failure is not None:
                return None, failure.why
            wanted = need & (Need.EXE | Need.SHA256)
            if hash_if is not None:
                wanted &= hash_if(facts)
            facts = self._not_wanted(facts, need, wanted)
            if wanted and facts.exe is not None and not facts.file_problem:
                try:
                    facts = await self._file(facts, pidfd, wanted, owner)
                except ProcessUnidentified as refused:
                    return None, refused.why
        finally:
            os.close(pidfd)
        peer.memo = (need, key, facts)
        return facts, ""

    @staticmethod
    def _not_wanted(facts: ProcessFacts, need: Need, wanted: Need) -> ProcessFacts:
        """`facts` with what no rule wanted of the file marked unread (`read` drops it: another policy, after
        a reload, may want it and reads it again on this connection)."""
        read = facts.read & ~(need & (Need.EXE | Need.SHA256) & ~wanted)
        if Need.SHA256 in need and Need.SHA256 not in wanted:
            why = "not hashed: no rule with sha256 admits it otherwise"
            return dataclasses.replace(facts, read=read, sha256_problem=why)
        return dataclasses.replace(facts, read=read)

    def _pidfd(self, peer: PeerProcess) -> int:
        """A pidfd for the peer (module docstring, step 1); ProcessUnidentified when there is none."""
        if peer.pid <= 0:
            raise ProcessUnidentified("its pid is not visible in wlidd's pid namespace")
        if self.peer_pidfd is not False:
            try:
                pidfd = peer.sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
                self.peer_pidfd = True
                return pidfd
            except OSError as exc:
                if exc.errno != errno.ENOPROTOOPT:
                    raise ProcessUnidentified(_pidfd_failure(exc)) from None
                self.peer_pidfd = False  # Linux < 6.5: pidfd_open from here on
        try:
            return os.pidfd_open(peer.pid)
        except OSError as exc:
            raise ProcessUnidentified(_pidfd_failure(exc)) from None

    def _read(self, peer: PeerProcess, need: Need) -> ProcessFacts:
        """The facts `need` asks for that procfs alone gives (module docstring, step 2): the unit, the
        executable's path (readlink: the kernel's d_path, no call into the file's file system) and, when
        the file will be needed, whether its file system is a local one (`LOCAL_FILESYSTEMS`, from the
        process's own mountinfo). Never touches the executable. Raises ProcessUnidentified when the process cannot be
        read at all (checked against the pidfd by the caller)."""
        pid = peer.pid
        cgroup = CgroupFacts(None)
        exe, exe_problem, file_problem = None, "", ""
        try:
            if not self.peer_pidfd:
                self._same_as_accepted(peer)
            if Need.UNIT in need:
                cgroup = self.reader.cgroup(pid)
            if need & (Need.EXE | Need.SHA256):
                exe, exe_problem = self._read_exe(pid)
                if exe is not None:
                    file_problem = self._file_system_problem(pid, exe)
        except OSError as exc:
            raise ProcessUnidentified(_gone_or_hidden(pid, exc)) from None
        return ProcessFacts(
            pid,
            need,
            cgroup.path,
            cgroup.unit,
            cgroup.user_unit,
            exe,
            None,
            cgroup.problem,
            exe_problem,
            exe_problem,
            file_problem=file_problem,
        )

    def _file_system_problem(self, pid: int, exe: str) -> str:
        """ "" when `exe` (a path in the process's mount namespace) is on a local disk file system, else why
        executables and sha256 rules cannot trust it: a FUSE (or network, or unknown) file system's server
        may show wlidd other bytes than the kernel maps for the process. From /proc/PID/mountinfo: the
        last mount whose mount point is a prefix of the path (proc(5); later mounts cover earlier ones)."""
        try:
            fstype = mount_fstype(self.reader.mountinfo(pid), exe)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            return f"the file system of its executable could not be told: {os.strerror(exc.errno or 0)}"
        if fstype is None:
            return f"the file system of its executable {exe} could not be told (no mount holds it)"
        if fstype.split(".", 1)[0] in LOCAL_FILESYSTEMS:
            return ""
        return (
            f"its executable {exe} is on a {fstype} file system, not a local disk one, whose server may show "
            "wlidd other bytes than the kernel runs: executables and sha256 rules refuse it"
        )

    def _same_as_accepted(self, peer: PeerProcess) -> None:
        """On the pidfd_open path: ProcessUnidentified unless the pid's process now is the one seen at accept (its start
        time then), or, without that, one started in an earlier clock tick than the accept."""
        if peer.start_ticks == -1:
            if peer.start_errno:  # alive now (the pidfd says so after): hidden from wlidd, not gone
                raise ProcessUnidentified(
                    _gone_or_hidden(peer.pid, OSError(peer.start_errno, os.strerror(peer.start_errno)))
                )
            raise ProcessUnidentified(EXITED)
        start = self.reader.start_ticks(peer.pid)
        if peer.start_ticks is not None and start != peer.start_ticks:
            raise ProcessUnidentified(
                f"pid {peer.pid} is now another process than the one that connected (the caller exited)"
            )
        if peer.start_ticks is None and start >= peer.accepted_ns * _CLOCK_TICKS // 10**9:
            raise ProcessUnidentified(
                f"pid {peer.pid} is a process started no earlier than the connection: it cannot be told from "
                "a process that took a pid the caller left (retry)"
            )

    def _read_exe(self, pid: int) -> tuple[str | None, str]:
        """(the executable's path or None, why it is unknown): readlink of /proc/PID/exe only."""
        try:
            exe = self.reader.exe(pid)
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.reader.exists(pid):
                return None, "it runs no executable (a kernel thread, or a zombie)"
            if exc.errno == errno.ENOENT:
                raise
            if exc.errno in (errno.EACCES, errno.EPERM):
                return None, "wlidd may not read the executable of another user's process (it needs CAP_SYS_PTRACE)"
            return None, f"its executable could not be read: {os.strerror(exc.errno or 0)}"
        if exe.endswith(DELETED):
            return None, f"its executable was deleted or replaced since it started ({exe})"
        return exe, ""

    async def _file(self, facts: ProcessFacts, pidfd: int, wanted: Need, owner: int | None) -> ProcessFacts:
        """`facts` with the executable's file identity (and with SHA256 in `wanted`, its hash): the file is
        opened through /proc/PID/exe and fstat()ed, and the path `exe` stat()ed in wlidd's own mount
        namespace, in a worker thread (`ExeOpener`: bounded, with a timeout), never on the event loop.
        ProcessUnidentified (EXITED) when the pidfd's process exited before the open was done."""
        assert facts.exe is not None
        opened, problem = await self.opener.open(self.reader, facts.pid, facts.exe, hashing=Need.SHA256 in wanted)
        if opened is None:
            return dataclasses.replace(facts, file_problem=problem)
        fd, st, path_id = opened
        try:
            if exited(pidfd):  # the open was of this process only if it was still alive after it
                raise ProcessUnidentified(EXITED)
            missing = "" if path_id is not None else f"there is no file {facts.exe} in wlidd's mount namespace"
            facts = dataclasses.replace(facts, exe_id=(st.st_dev, st.st_ino), path_id=path_id, file_problem=missing)
            if Need.SHA256 not in wanted:
                return facts
            digest, why = await self.digests.sha256(fd, st, owner=owner)
            return dataclasses.replace(facts, sha256=digest, sha256_problem=why)
        finally:
            os.close(fd)


def _pidfd_failure(exc: OSError) -> str:
    """Why no pidfd could be had for a peer: SO_PEERPIDFD / pidfd_open's errors (socket(7), pidfd_open(2))."""
    if exc.errno in (errno.ESRCH, errno.EINVAL, errno.ENOTCONN, errno.EBADF):
        return EXITED
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return f"wlidd is out of descriptors or memory ({errno.errorcode.get(exc.errno or 0, exc.errno)}); retry"
    if exc.errno == errno.ENOSYS:
        return "this kernel has no pidfd (Linux < 5.3): processes cannot be identified safely"
    return f"no pidfd for the caller: {os.strerror(exc.errno or 0)}"


PROCESSES = ProcessIdentifier()  # the daemon's: one SO_PEERPIDFD probe, one executables' hash cache
