"""The signal after a rotation: sent to the process in a sink's pid_file after checks on the file, its
directory and the process (its uids, through a pidfd, so the process checked is the one signalled).
"""

from __future__ import annotations

import errno
import os
import re
import signal as signals
import stat
from pathlib import Path

from wlidd.config import CredentialSinkConfig
from wlidd.safedir import SinkRefused, open_dir, trusted_uids
from wlidd.sinks.access import owner_ids, resolve_readers


def signal_after_rotation(sink: CredentialSinkConfig) -> int:
    """Send the sink's signal to the process named in its pid_file; the pid signalled.

    Refused (SinkRefused, naming the reason) when the pid file or its directory could be written by
    anyone but root or the daemon's user, when the file does not hold one pid above 1, or when the
    process belongs to a user the sink does not serve (`allowed_target_uids`). The process is held by
    a pidfd from before its owner is read until it is signalled, so a pid reused meanwhile is never hit.
    """
    assert sink.signal is not None and sink.pid_file is not None
    signum = getattr(signals, sink.signal.upper())
    pid = read_pid_file(sink.pid_file)
    return send_checked_signal(pid, signum, allowed_target_uids(sink))


def allowed_target_uids(sink: CredentialSinkConfig) -> frozenset[int]:
    """Users whose processes a sink may signal: its owner and reader users (the processes that read
    its files); with neither, root and the daemon's own user. KeyError for an unknown name."""
    uids = set(resolve_readers(sink.readers).users)
    if sink.owner is not None:
        uids.add(owner_ids(sink)[0])
    return frozenset(uids) if uids else trusted_uids()


def read_pid_file(path: Path) -> int:
    """The pid in `path`, a regular file with one name (no hard link elsewhere) that only root or the
    daemon's user can have written, in a directory only they can change (open_dir), opened with
    O_NOFOLLOW. SinkRefused otherwise, and for
    content that is not one decimal pid above 1 (0, -1 and 1 would hit a process group, every process,
    or init)."""
    dir_fd = open_dir(path.parent, create=False)
    try:
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SinkRefused(f"pid file {path} is a symbolic link") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SinkRefused(f"pid file {path} is not a regular file")
        if st.st_nlink > 1:
            raise SinkRefused(
                f"pid file {path} has {st.st_nlink} hard links: another name for it may be writable by someone"
                " else (with fs.protected_hardlinks=0 any user can link to it); a pid file has one name"
            )
        if st.st_uid not in trusted_uids():
            raise SinkRefused(
                f"pid file {path} belongs to uid {st.st_uid}: only a pid file of root or wlidd's user"
                f" (uid {os.geteuid()}) is trusted, or its owner could aim the signal at any process"
            )
        if st.st_mode & 0o022:
            raise SinkRefused(
                f"pid file {path} (mode {stat.S_IMODE(st.st_mode):04o}) is writable by group or others,"
                " who could aim the signal at any process"
            )
        content = os.read(fd, 64)
    finally:
        os.close(fd)
    text = content.decode("ascii", "replace").strip()
    if not re.fullmatch(r"-?[0-9]{1,10}", text):
        raise SinkRefused(f"pid file {path} does not hold a process id")
    pid = int(text)
    if pid <= 1:
        raise SinkRefused(
            f"pid file {path} holds {pid}: a pid of 1 or less would signal init, a group or every process"
        )
    return pid


def send_checked_signal(pid: int, signum: int, allowed: frozenset[int]) -> int:
    """Signal `pid` if its real, effective and saved uids are all in `allowed`; SinkRefused otherwise.
    With pidfds (Linux 5.3+) the check and the signal apply to the same process; without them (ENOSYS)
    os.kill follows the check."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        raise SinkRefused(f"no process {pid}") from None
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        pidfd = None
    try:
        uids = process_uids(pid)
        if not set(uids) <= allowed:
            shown = ", ".join(str(u) for u in sorted(allowed))
            raise SinkRefused(
                f"process {pid} runs as uid {uids[0]}, not one this sink serves ({shown}): name that user as"
                " owner or in readers"
            )
        if pidfd is not None:
            try:
                signals.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                raise SinkRefused(f"process {pid} exited before the signal") from None
        else:
            os.kill(pid, signum)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return pid


def process_uids(pid: int) -> tuple[int, int, int]:
    """Real, effective and saved uid of `pid` (/proc/PID/status, proc(5)). SinkRefused when the process
    is gone or hidden (another user's process under ProtectProc=invisible)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            status = handle.read(16384)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        raise SinkRefused(f"process {pid} is gone or not visible to wlidd") from None
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            real, effective, saved = (int(field) for field in line.split()[1:4])
            return real, effective, saved
    raise SinkRefused(f"process {pid} has no Uid line in /proc/{pid}/status")
