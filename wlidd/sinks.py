"""Atomic file outputs: temp file in the same directory, fsync, rename — readers never see half a token.

The daemon may run as root while the directories it writes into are reachable by other users, so every
path is walked from / one component at a time (openat with O_NOFOLLOW): each directory on the way
must belong to root or to the daemon's own user and must not be writable by anyone else (a sticky,
world-writable directory such as /tmp is fine: others cannot move what root or the daemon put there).
A symbolic link is followed only when it, too, belongs to root or the daemon's user. Files are then
created and renamed relative to the directory's descriptor, so nothing can swap a parent midway.

`readers` grants users and groups read access through a POSIX ACL set on the temp file before the
rename (wlidd.posix_acl), and read/traverse on the sink directory; it needs no capability.

An optional command runs after each change: argv list (never a shell), with a timeout, a minimal
environment and bounded output. An optional signal goes to the process in pid_file, after checks on
the file, its directory and the process (through a pidfd, so the process checked is the one signalled).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import json
import os
import re
import secrets
import signal as signals
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from wlidd import posix_acl
from wlidd.api.authz import group_id, user_id
from wlidd.config import Config, CredentialSinkConfig, SinkConfig, SinkReaders
from wlidd.logs import REDACTED, get_logger, scrub
from wlidd.svid.load import iso_z
from wlidd.tokens.model import Token
from wlidd.watch import CredentialWatcher, IdentityState

log = get_logger("wlidd.sinks")

COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # all an on_change command gets
OUTPUT_LIMIT = 64 * 1024  # bytes of a command's output (stdout and stderr together) kept; the rest is discarded
LOGGED_TAIL = 400  # characters of that output logged when the command fails
MAX_SYMLINKS = 40  # links followed in one path walk, as the kernel's ELOOP limit
_SWEPT_LIMIT = 4096  # (directory, name) pairs remembered as swept of stale temp files
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_swept: set[tuple[int, int, str]] = set()


class SinkRefused(OSError):
    """A sink path, pid file or signal target that could let another user steer the daemon's writes or
    signals; the message names the reason. An OSError, so every caller's error handling covers it."""


@dataclass(frozen=True)
class Readers:
    """Numeric ids granted read access (resolved from a sink's `readers` at write time)."""

    users: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)


@dataclass(frozen=True)
class CommandResult:
    """How an on_change command ended. returncode None: it could not start or was killed at its timeout.
    `output` is the last OUTPUT_LIMIT bytes of stdout and stderr (merged); `output_bytes` counts all of it."""

    returncode: int | None
    output: bytes = b""
    output_bytes: int = 0
    timed_out: bool = False


# ---- walking to a directory without following anyone else's links ---------------------------------


def _trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _check_owner(st: os.stat_result, shown: str, what: str) -> None:
    if st.st_uid not in _trusted_uids():
        raise SinkRefused(
            f"{what} {shown} belongs to uid {st.st_uid}: every directory on the way must belong to root"
            f" or to wlidd's user (uid {os.geteuid()}), or its owner could swap in a link and steer the write"
        )


def _check_dir(st: os.stat_result, shown: str) -> None:
    """Refuse a directory that someone other than root or the daemon's user could change."""
    _check_owner(st, shown, "directory")
    writable = st.st_mode & 0o022
    if writable and not st.st_mode & stat.S_ISVTX:
        group = "its group (or a user or group its ACL names)"
        who = f"{group} and others" if writable == 0o022 else group if writable & 0o020 else "others"
        raise SinkRefused(
            f"directory {shown} (mode {stat.S_IMODE(st.st_mode):04o}) is writable by {who} without the sticky bit:"
            " they could replace the files or links in it; remove the group/other write bit"
        )


def open_dir(path: Path, *, create: bool) -> int:
    """A descriptor (O_DIRECTORY, close-on-exec; the caller closes it) for `path`, reached from / one
    component at a time with O_NOFOLLOW, each directory checked (`_check_dir`) on the descriptor that
    was opened. Links owned by root or the daemon's user are followed (at most MAX_SYMLINKS), others
    refused. With `create`, missing directories are made, mode 0755 whatever the umask (the files'
    own modes and ACLs decide who reads them).

    Raises SinkRefused for a path another user could steer, FileNotFoundError (without `create`),
    NotADirectoryError, or another OSError from the kernel.
    """
    todo = list(reversed(Path(os.path.abspath(path)).parts[1:]))  # a stack: next component last
    resolved: list[str] = []
    links = 0
    fd = _open_root()
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                    os.close(fd)
                    fd = -1
                    fd = _reopen(resolved)
                continue
            shown = "/" + "/".join([*resolved, name])
            created = False
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", shown) from None
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass  # made meanwhile: checked below like any other
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                _check_owner(st, shown, "symbolic link")
                links += 1
                if links > MAX_SYMLINKS:
                    raise SinkRefused(f"more than {MAX_SYMLINKS} symbolic links on the way to {path}")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = _open_root()
                    resolved = []
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", shown)
            child = os.open(name, _OPEN_DIR, dir_fd=fd)
            try:
                opened = os.fstat(child)
                if created and opened.st_uid == os.geteuid():
                    os.fchmod(child, 0o755)
                    opened = os.fstat(child)
                _check_dir(opened, shown)
            except BaseException:
                os.close(child)
                raise
            os.close(fd)
            fd, resolved = child, [*resolved, name]
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _open_root() -> int:
    fd = os.open("/", _OPEN_DIR)
    try:
        _check_dir(os.fstat(fd), "/")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopen(components: list[str]) -> int:
    """The directory /components..., whose every part was already walked (and checked) once."""
    fd = _open_root()
    try:
        for index, name in enumerate(components):
            child = os.open(name, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            _check_dir(os.fstat(fd), "/" + "/".join(components[: index + 1]))
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---- writing one file --------------------------------------------------------------------------------


def write_atomic(
    path: Path, data: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1, *, readers: Readers | None = None
) -> None:
    """Replace `path` with `data` in one rename; the file never exists with a wider mode, another owner or
    another ACL. Missing directories are created (0755). `readers` get read access through a POSIX ACL on
    the file and read/traverse on its directory.

    Raises SinkRefused when the directory or a parent could be changed by another user (see open_dir),
    OSError from the kernel (EOPNOTSUPP: a file system without POSIX ACLs, with `readers`). On failure
    the previous file stays as it was and no temp file is left behind.
    """
    name = path.name
    if name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, "not a file name", str(path))
    dir_fd = open_dir(path.parent, create=True)
    try:
        shown = str(path.parent)
        _sweep_once(dir_fd, name)
        acl = None
        if readers:
            _grant_directory(dir_fd, readers, shown)
            acl = posix_acl.file_acl(mode, readers.users, readers.groups)
        _replace(dir_fd, name, data, mode, uid, gid, acl, shown)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _replace(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int, acl: bytes | None, shown: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", shown)
    try:
        try:
            os.fchmod(fd, mode)
            if acl is not None:
                _set_acl(fd, acl, shown)  # before the chown: only the owner (or CAP_FOWNER) may set it
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _set_acl(fd: int, acl: bytes, shown: str) -> None:
    try:
        os.setxattr(fd, posix_acl.XATTR, acl)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise OSError(
                exc.errno, "the file system does not support POSIX ACLs, which readers needs; files left as they were"
            ) from None
        raise


def _grant_directory(dir_fd: int, readers: Readers, shown: str) -> None:
    """Give `readers` read and traverse (r-x) on the directory, unless everyone already has them.
    Entries already in its ACL are kept; its mask is only widened by r-x (wlidd.posix_acl.with_readers)."""
    st = os.fstat(dir_fd)
    if (st.st_mode & 0o005) == 0o005:  # everyone may already read and traverse it
        return
    try:
        base = posix_acl.decode(os.getxattr(dir_fd, posix_acl.XATTR))
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        base = posix_acl.from_mode(st.st_mode)
    except ValueError as exc:
        raise SinkRefused(f"directory {shown} has an ACL wlidd cannot read ({exc}): readers not granted") from None
    wanted = posix_acl.with_readers(base, readers.users, readers.groups, posix_acl.READ | posix_acl.EXECUTE)
    if wanted != sorted(base):
        _set_acl(dir_fd, posix_acl.encode(wanted), shown)


def _sweep_once(dir_fd: int, name: str) -> None:
    """Remove `.name.*.tmp` files an earlier run left behind (a crash between create and rename), the first
    time this process writes `name` in this directory. Only regular files and links are removed."""
    st = os.fstat(dir_fd)
    key = (st.st_dev, st.st_ino, name)
    if key in _swept:
        return
    if len(_swept) >= _SWEPT_LIMIT:
        _swept.clear()
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{6,16}}\.tmp")
    with os.scandir(dir_fd) as entries:
        stale = [entry.name for entry in entries if pattern.fullmatch(entry.name)]
    for stale_name in stale:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.stat(stale_name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(stale_name, dir_fd=dir_fd)
                log.info("stale temporary file removed", file=stale_name)
    _swept.add(key)


# ---- tokens --------------------------------------------------------------------------------------------


def render_token(token: Token, fmt: str, now: dt.datetime) -> bytes:
    if fmt == "json":
        document = {
            "access_token": token.value,
            "token_type": token.token_type,
            "expires_in": max(0, int(token.seconds_left(now))),
            "expire_time": iso_z(token.expire_time),
        }
        return json.dumps(document).encode() + b"\n"
    return token.value.encode()


async def publish_token(sinks: tuple[SinkConfig, ...], token: Token, now: dt.datetime, source: str) -> None:
    """Write every sink; run its on_change command. Failures are logged, never raised."""
    for sink in sinks:
        try:
            uid, gid = _ids(sink)
            readers = resolve_readers(sink.readers)
            data = render_token(token, sink.format, now)
            write = functools.partial(write_atomic, sink.path, data, sink.mode, uid, gid, readers=readers)
            await anyio.to_thread.run_sync(write)
        except (OSError, KeyError) as exc:  # KeyError: an owner, group or reader that does not exist
            log.error("token sink write failed", source=source, path=str(sink.path), error=_reason(exc))
            continue
        if sink.on_change:
            await run_command(list(sink.on_change), sink.on_change_timeout, source, hide=(token.value,))


# ---- on_change commands ------------------------------------------------------------------------------


async def run_command(argv: list[str], timeout: float, source: str, *, hide: Sequence[str] = ()) -> CommandResult:
    """Run `argv` (no shell) with COMMAND_ENV only, stdin from /dev/null, cwd /, in its own session, for
    at most `timeout` seconds (then its whole process group is killed). Its output is drained and only
    the last OUTPUT_LIMIT bytes kept. A failure is logged with a short tail of the output, scrubbed of
    `hide` (the secrets the sink just wrote) and of anything that looks like a key or token. Never raises
    (except cancellation)."""
    try:
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=COMMAND_ENV,
            start_new_session=True,
        )
    except OSError as exc:
        log.error("on_change command could not start", source=source, command=argv[0], error=exc.strerror)
        return CommandResult(None)
    tail, total, timed_out = bytearray(), 0, False
    try:
        with anyio.fail_after(timeout):
            assert process.stdout is not None
            async for chunk in process.stdout:
                total += len(chunk)
                tail += chunk
                if len(tail) > OUTPUT_LIMIT:
                    del tail[: len(tail) - OUTPUT_LIMIT]
            await process.wait()
    except TimeoutError:
        timed_out = True
    finally:
        # bounded: a child that became another user (sudo) may survive the EPERM of killpg
        with anyio.move_on_after(5, shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signals.SIGKILL)
                await process.wait()
            await process.aclose()
    output = bytes(tail)
    if timed_out:
        log.error(
            "on_change command timed out",
            source=source,
            command=argv[0],
            timeout=timeout,
            output=output_tail(output, hide),
        )
        return CommandResult(None, output, total, timed_out=True)
    returncode = process.returncode
    if returncode != 0:
        log.warning(
            "on_change command failed",
            source=source,
            command=argv[0],
            returncode=returncode,
            output=output_tail(output, hide),
        )
    return CommandResult(returncode, output, total)


def output_tail(output: bytes, hide: Sequence[str] = (), limit: int = LOGGED_TAIL) -> str:
    """The last whole lines of `output` (at most `limit` characters) with every line of each `hide`, and
    anything shaped like a key, JWT or bearer token, replaced by REDACTED. A partial first line is
    dropped, so a secret cut at the edge cannot slip through."""
    text = output.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[-limit:]
        text = text.partition("\n")[2]
    for secret in hide:
        for part in [secret, *secret.splitlines()]:
            if len(part.strip()) >= 8:
                text = text.replace(part.strip(), REDACTED)
    return scrub(text).strip()


# ---- credentials -------------------------------------------------------------------------------------


def _ids(sink: CredentialSinkConfig | SinkConfig) -> tuple[int, int]:
    """The sink's owner and group as ids (-1: leave as is); KeyError for a name this host does not know."""
    uid = -1 if sink.owner is None else user_id(sink.owner)
    gid = -1 if sink.group is None else group_id(sink.group)
    if uid is None:
        raise KeyError(f"no user {sink.owner!r}")
    if gid is None:
        raise KeyError(f"no group {sink.group!r}")
    return uid, gid


def resolve_readers(readers: SinkReaders) -> Readers:
    """Names to ids; KeyError for a user or group this host does not know (the sink is then not written:
    a missing reader is a configuration error, not a reason to hand out fewer rights silently)."""
    users, groups = [], []
    for user in readers.users:
        if (uid := user_id(user)) is None:
            raise KeyError(f"no user {user!r} (readers)")
        users.append(uid)
    for group in readers.groups:
        if (gid := group_id(group)) is None:
            raise KeyError(f"no group {group!r} (readers)")
        groups.append(gid)
    return Readers(tuple(sorted(set(users))), tuple(sorted(set(groups))))


def credential_files(sink: CredentialSinkConfig, state: IdentityState) -> list[tuple[Path, bytes, int]]:
    """(path, content, mode) of every file a sink writes for `state` (pure)."""
    svid = state.identity.svid
    if sink.layout == "spiffe":
        files = [(sink.dir / "svid.pem", svid.key_pem() + svid.chain_pem, sink.key_mode)]
        files += [
            (sink.dir / f"bundle.{bundle.trust_domain}.pem", bundle.pem, sink.mode) for bundle in state.identity.bundles
        ]
        return files
    cert, key = sink.dir / "cert.pem", sink.dir / "key.pem"
    config_path = sink.certificate_config or sink.dir / "certificate_config.json"
    document = {"version": 1, "cert_configs": {"workload": {"cert_path": str(cert), "key_path": str(key)}}}
    return [
        (cert, svid.chain_pem, sink.mode),
        (key, svid.key_pem(), sink.key_mode),
        (sink.dir / "bundle.pem", state.identity.own_bundle.pem, sink.mode),
        (config_path, json.dumps(document, indent=2).encode() + b"\n", sink.mode),
    ]


def write_credentials(sink: CredentialSinkConfig, state: IdentityState) -> None:
    """Write one sink's files. The key is written before the chain that needs it: a reader that sees the
    new chain finds the new key (and the certificate_config.json names stable paths)."""
    uid, gid = _ids(sink)
    readers = resolve_readers(sink.readers)
    files = credential_files(sink, state)
    files.sort(key=lambda item: 0 if item[2] == sink.key_mode else 1)
    for path, data, mode in files:
        write_atomic(path, data, mode, uid, gid, readers=readers)


async def publish_credentials(sinks: tuple[CredentialSinkConfig, ...], state: IdentityState) -> None:
    """Write every sink, then run its command and send its signal. Failures are logged, never raised."""
    for sink in sinks:
        try:
            await anyio.to_thread.run_sync(write_credentials, sink, state)
        except (OSError, KeyError) as exc:
            log.error("credential sink write failed", identity=state.name, dir=str(sink.dir), error=_reason(exc))
            continue
        log.info("credential sink written", identity=state.name, dir=str(sink.dir), serial=state.identity.svid.serial)
        if sink.on_change:
            secret = state.identity.svid.key_pem().decode("ascii", "replace")
            await run_command(list(sink.on_change), sink.on_change_timeout, state.name, hide=(secret,))
        if sink.signal is not None and sink.pid_file is not None:
            try:
                await anyio.to_thread.run_sync(signal_after_rotation, sink)
            except SinkRefused as exc:
                log.warning(
                    "signal after rotation refused", identity=state.name, pid_file=str(sink.pid_file), reason=str(exc)
                )
            except (OSError, KeyError, ValueError) as exc:
                log.warning(
                    "could not signal after rotation",
                    identity=state.name,
                    pid_file=str(sink.pid_file),
                    error=_reason(exc),
                )


# ---- signals -----------------------------------------------------------------------------------------


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
        uids.add(_ids(sink)[0])
    return frozenset(uids) if uids else _trusted_uids()


def read_pid_file(path: Path) -> int:
    """The pid in `path`, a regular file that only root or the daemon's user can have written, in a
    directory only they can change (open_dir), opened with O_NOFOLLOW. SinkRefused otherwise, and for
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
        if st.st_uid not in _trusted_uids():
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


# ---- `wlidd check` -----------------------------------------------------------------------------------


def has_cap_chown() -> bool:
    """Whether this process holds CAP_CHOWN (bit 0 of CapEff in /proc/self/status, capabilities(7))."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def ownership_warnings(config: Config) -> list[str]:
    """`wlidd check`: sinks whose owner/group would fail with EPERM. A non-root daemon without
    CAP_CHOWN (the shipped unit: User=wlidd, no capabilities, @chown filtered) can hand a file only
    to itself; `readers` (POSIX ACLs) needs no capability."""
    sinks: list[tuple[str, CredentialSinkConfig | SinkConfig]] = []
    for name, identity in sorted(config.identities.items()):
        sinks += [(f"identities.{name}.sinks[{i}] ({s.dir})", s) for i, s in enumerate(identity.sinks)]
    for name, token in sorted(config.tokens.items()):
        sinks += [(f"tokens.{name}.sinks[{i}] ({s.path})", s) for i, s in enumerate(token.sinks)]
    if not any(s.owner is not None or s.group is not None for _, s in sinks):
        return []
    capable = has_cap_chown()
    euid, groups = os.geteuid(), {os.getegid(), *os.getgroups()}
    shipped_user = _user_exists("wlidd")
    warnings = []
    for where, sink in sinks:
        if sink.owner is None and sink.group is None:
            continue
        foreign = (sink.owner is not None and user_id(sink.owner) != euid) or (
            sink.group is not None and group_id(sink.group) not in groups
        )
        if not capable and foreign:
            warnings.append(
                f"{where}: owner/group need root or CAP_CHOWN, which this process (uid {euid}) lacks, so the"
                " daemon running like this cannot hand the files over (EPERM); grant access with"
                ' readers = { users = ["..."], groups = ["..."] } instead'
            )
        elif capable and shipped_user:
            warnings.append(
                f"{where}: owner/group work only when wlidd runs as root or with CAP_CHOWN; the shipped unit"
                " (User=wlidd, no capabilities) fails with EPERM: use readers = { users = [...] } instead"
            )
    return warnings


def _user_exists(name: str) -> bool:
    return user_id(name) is not None


def _reason(exc: BaseException) -> str:
    """An error for a log line: the message of a SinkRefused or KeyError, else `strerror: filename`."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else "unknown name"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


async def follow_credentials(watcher: CredentialWatcher) -> None:
    """Rewrite the identity's sinks (as configured now: a reload may change them) on every new state."""
    async for state in watcher.changes():
        if watcher.source.config.sinks:
            await publish_credentials(watcher.source.config.sinks, state)
