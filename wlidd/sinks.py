"""Atomic file outputs: temp file in the same directory, fsync, rename — readers never see half a token.

The daemon may run as root while the directories it writes into are reachable by other users, so every
path is walked from / one component at a time (openat with O_NOFOLLOW): each directory on the way
must belong to root or to the daemon's own user and must not be writable by anyone else (a sticky,
world-writable directory such as /tmp is accepted: others cannot move what root or the daemon put there,
but any user may hold a name there first, which is reported as such). A symbolic link is followed only
when it, too, belongs to root or the daemon's user. Files are then created and renamed relative to the
directory's descriptor, so nothing can swap a parent midway.

All files of one sink are written as a set: every temp file is written and fsynced first, and only then
are they renamed into place (the key first), so a failure while writing (a full disk) changes none of them.

`readers` grants users and groups read access through a POSIX ACL set on the temp file before the
rename (wlidd.posix_acl), and read/traverse on the sink directory; it needs no capability.

An optional command runs after each change: argv list (never a shell), with a timeout, a minimal
environment and bounded output, whose logged tail is masked of anything that could be the secret. An
optional signal goes to the process in pid_file, after checks on the file, its directory and the
process (through a pidfd, so the process checked is the one signalled). Commands and signals run once
every sink is written, concurrently (one task per sink). Publications of one identity or token source
are serialized, and a reload that changes its sinks rewrites them at once (republish_*).
"""

from __future__ import annotations

import base64
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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from wlidd import posix_acl
from wlidd.api.authz import group_id, user_id
from wlidd.config import Config, CredentialSinkConfig, SinkConfig, SinkReaders, TokenConfig
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
_CAP_CHOWN, _CAP_FOWNER = 0, 3  # capability numbers (linux/capability.h)
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


def _check_owner(st: os.stat_result, shown: str, what: str, *, sticky_parent: bool = False) -> None:
    if st.st_uid not in _trusted_uids():
        held = " in a sticky directory: another user holds the name" if sticky_parent else ""
        raise SinkRefused(
            f"{what} {shown} belongs to uid {st.st_uid}{held}; every directory on the way must belong to root"
            f" or to wlidd's user (uid {os.geteuid()}), or its owner could swap in a link and steer the write"
        )


def _check_dir(st: os.stat_result, shown: str, *, sticky_parent: bool = False) -> None:
    """Refuse a directory that someone other than root or the daemon's user could change."""
    _check_owner(st, shown, "directory", sticky_parent=sticky_parent)
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
            sticky_parent = bool(os.fstat(fd).st_mode & stat.S_ISVTX)
            if stat.S_ISLNK(st.st_mode):
                _check_owner(st, shown, "symbolic link", sticky_parent=sticky_parent)
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
                _check_dir(opened, shown, sticky_parent=sticky_parent)
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
    the file and read/traverse on its directory. Errors as `write_files`."""
    write_files([(path, data, mode)], uid, gid, readers=readers)


@dataclass
class _Staged:
    """One file of a set, written to `tmp` in the directory `dir_fd` and waiting to be renamed to `path`."""

    path: Path
    dir_fd: int
    tmp: str
    renamed: bool = False


def write_files(
    files: Sequence[tuple[Path, bytes, int]], uid: int = -1, gid: int = -1, *, readers: Readers | None = None
) -> None:
    """Write `files` ((path, content, mode) each) as one set: every file goes to a fresh temp file in its
    directory (mode, ACL, owner, content, fsync) first; only when all are written are they renamed over
    their targets, in the order given (put the key first), and each directory is fsynced.

    A failure while writing (a full disk, a refused path, a file system without ACLs) therefore changes
    none of the files, and no temp file is left behind. Targets are checked before the first rename (a
    directory at a target's name, a name another user holds in a sticky directory), so a set is not left
    half renamed by them either.

    Raises SinkRefused when a directory on the way could be changed by another user (see open_dir) or a
    target's name is held by another user; another OSError from the kernel, whose filename is the
    target's path (never a temp file's). EOPNOTSUPP: a file system without POSIX ACLs, with `readers`.
    """
    staged: list[_Staged] = []
    acls: dict[int, bytes] = {}  # file mode → the ACL that adds the readers to it
    try:
        for path, data, mode in files:
            if readers and mode not in acls:
                acls[mode] = posix_acl.file_acl(mode, readers.users, readers.groups)
            staged.append(_stage(path, data, mode, uid, gid, readers, acls.get(mode)))
        for item in staged:
            _check_target(item)
        for item in staged:
            try:
                os.replace(item.tmp, item.path.name, src_dir_fd=item.dir_fd, dst_dir_fd=item.dir_fd)
            except OSError as exc:
                raise _target_error(item, exc) from None
            item.renamed = True
        synced: set[tuple[int, int]] = set()
        for item in staged:
            st = os.fstat(item.dir_fd)
            if (st.st_dev, st.st_ino) not in synced:
                os.fsync(item.dir_fd)
                synced.add((st.st_dev, st.st_ino))
    finally:
        for item in staged:
            if not item.renamed:
                with contextlib.suppress(OSError):
                    os.unlink(item.tmp, dir_fd=item.dir_fd)
            os.close(item.dir_fd)


def _stage(
    path: Path, data: bytes, mode: int, uid: int, gid: int, readers: Readers | None, acl: bytes | None
) -> _Staged:
    """Write `data` to a new temp file beside `path` (created O_EXCL with a random name, so nobody
    else's file is ever opened), with its mode, ACL and owner set before the data and fsynced."""
    name = path.name
    if name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, "not a file name", str(path))
    dir_fd = open_dir(path.parent, create=True)
    try:
        shown = str(path.parent)
        _sweep_once(dir_fd, name, shown)
        if readers:
            _grant_directory(dir_fd, readers, shown)
        tmp, fd = _create_temp(dir_fd, name, path)
        try:
            try:
                os.fchmod(fd, mode)
                if acl is not None:
                    _set_acl(fd, acl, path)  # before the chown: only the owner (or CAP_FOWNER) may set it
                if uid != -1 or gid != -1:
                    os.fchown(fd, uid, gid)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(exc, OSError) and not isinstance(exc, SinkRefused):
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return _Staged(path, dir_fd, tmp)


def _create_temp(dir_fd: int, name: str, path: Path) -> tuple[str, int]:
    """A new empty file `.name.<random>.tmp` (mode 0600, O_EXCL: a name someone else holds is skipped,
    never opened or removed): its name and a write descriptor (the caller closes it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return tmp, os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def _check_target(item: _Staged) -> None:
    """Refuse, before any file of the set is renamed, a target that the rename would fail on: a
    directory at its name, or a name another user holds in a sticky directory when this process may
    not replace it (no CAP_FOWNER). A regular file or link of another user is otherwise replaced (the
    rename swaps the name, never writes through it)."""
    try:
        st = os.stat(item.path.name, dir_fd=item.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    parent = os.fstat(item.dir_fd)
    held = _held_by_other(st, parent)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(
            errno.EISDIR, f"{item.path} is a directory" + (f" that {held}" if held else "") + "; nothing renamed"
        )
    if held and not _has_capability(_CAP_FOWNER):
        raise SinkRefused(f"{item.path} {held}; nothing renamed (choose a directory only root or wlidd can write)")


def _held_by_other(st: os.stat_result, parent: os.stat_result) -> str:
    """'belongs to uid N in a sticky directory: another user holds the name' when another user owns
    the entry in a sticky directory, else ''."""
    if st.st_uid in _trusted_uids() or not parent.st_mode & stat.S_ISVTX:
        return ""
    return f"belongs to uid {st.st_uid} in a sticky directory: another user holds the name"


def _target_error(item: _Staged, exc: OSError) -> OSError:
    """The rename's error, naming the target and, when another user holds its name, saying so."""
    with contextlib.suppress(OSError):
        st = os.stat(item.path.name, dir_fd=item.dir_fd, follow_symlinks=False)
        held = _held_by_other(st, os.fstat(item.dir_fd))
        if held:
            return SinkRefused(f"{item.path} {held}")
    return OSError(exc.errno, exc.strerror or str(exc), str(item.path))


def _set_acl(fd: int, acl: bytes, path: Path | str) -> None:
    try:
        os.setxattr(fd, posix_acl.XATTR, acl)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise OSError(
                exc.errno,
                "the file system does not support POSIX ACLs, which readers needs; files left as they were",
                str(path),
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


def _sweep_once(dir_fd: int, name: str, shown: str) -> None:
    """Remove `.name.*.tmp` files an earlier run left behind (a crash between create and rename), the
    first time this process writes `name` in this directory. Only regular files and links that root
    or the daemon's user own are removed: a name another user planted (in a sticky directory) is left
    alone and never blocks the write (temp names are random and created O_EXCL). One log line with
    the counts, however many there were; errors are logged, never raised."""
    st = os.fstat(dir_fd)
    key = (st.st_dev, st.st_ino, name)
    if key in _swept:
        return
    if len(_swept) >= _SWEPT_LIMIT:
        _swept.clear()
    _swept.add(key)
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{6,16}}\.tmp")
    trusted = _trusted_uids()
    removed = foreign = failed = 0
    error = ""
    try:
        with os.scandir(dir_fd) as entries:
            stale = [entry.name for entry in entries if pattern.fullmatch(entry.name)]
    except OSError as exc:
        log.warning("stale temporary files not looked for", dir=shown, file=name, error=_reason(exc))
        return
    for stale_name in stale:
        try:
            entry = os.stat(stale_name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(entry.st_mode):
                continue
            if entry.st_uid not in trusted:
                foreign += 1
                continue
            os.unlink(stale_name, dir_fd=dir_fd)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed += 1
            error = _reason(exc)
    if removed or foreign or failed:
        log.info(
            "stale temporary files swept",
            dir=shown,
            file=name,
            removed=removed,
            left_to_other_users=foreign,
            failed=failed,
            **({"error": error} if error else {}),
        )


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
    """Write every sink, then run the on_change commands of those written, concurrently (one task per
    sink: no sink's command waits on another's). Publications of one source are serialized (a reload's
    rewrite and a refresh never interleave). Failures are logged, never raised."""
    async with _lock(_token_locks, source):
        await _publish_token(sinks, token, now, source)


async def republish_token(source: TokenHolder, clock: Callable[[], dt.datetime]) -> None:
    """Rewrite a token source's sinks, as configured now, from its current token (after a reload changed
    them: a reader removed loses access at once, not at the next refresh). Nothing without a servable
    token. Serialized with the source's other publications, and reads the token only once it holds the
    lock, so the newest token is what stays on disk."""
    async with _lock(_token_locks, source.name):
        token = source.servable()
        if token is not None and source.config.sinks:
            await _publish_token(source.config.sinks, token, clock(), source.name)


async def _publish_token(sinks: tuple[SinkConfig, ...], token: Token, now: dt.datetime, source: str) -> None:
    written: list[SinkConfig] = []
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
        written.append(sink)
    async with anyio.create_task_group() as tg:
        for sink in written:
            if sink.on_change:
                tg.start_soon(_on_change, sink.on_change, sink.on_change_timeout, source, token.value)


async def _on_change(argv: Sequence[str], timeout: float, source: str, secret: str) -> None:
    await run_command(list(argv), timeout, source, hide=(secret,))


class TokenHolder(Protocol):
    """What republish_token needs of a token source (wlidd.tokens.manager.TokenSource)."""

    name: str
    config: TokenConfig

    def servable(self, now: dt.datetime | None = None) -> Token | None: ...


_LOCKS_LIMIT = 1024  # idle publication locks kept (one per token source or identity: config-bounded)
_token_locks: dict[str, anyio.Lock] = {}
_credential_locks: dict[str, anyio.Lock] = {}


@contextlib.asynccontextmanager
async def _lock(locks: dict[str, anyio.Lock], name: str) -> AsyncIterator[None]:
    """Hold the publication lock of `name` (made on first use; idle ones are dropped past _LOCKS_LIMIT)."""
    if name not in locks and len(locks) >= _LOCKS_LIMIT:
        for idle in [key for key, lock in locks.items() if not lock.locked()]:
            del locks[idle]
    lock = locks.setdefault(name, anyio.Lock())
    async with lock:
        yield


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
    """The last whole lines of `output` (at most `limit` characters), safe to log whatever the command
    did with the secret (folded at any width, on one line, base64url, a hex dump with or without
    colons, `openssl pkey -text`, reversed, JSON-escaped). A partial first line is dropped, and every
    line that could carry secret material is replaced by REDACTED (runs of them by one):

    - a line holding a fragment of a `hide` secret: 12 characters of its base64 body (or base64url, or
      the secret as text), or 8 bytes of its DER in hex (SECRET_FRAGMENT_B64, SECRET_FRAGMENT_HEX);
    - a line with a run of 16 or more base64/base64url characters mixing letters and digits (a word
      such as FileNotFoundError or a path such as /usr/share/locale stays), or a run of 8 or more hex
      byte pairs, with or without colons or spaces between them;
    - a line that is one base64(url) word, or only hex digits, colons and spaces (the short end of a
      folded block, the last line of a hex dump), next to a redacted line;
    - private keys in PEM, JWTs and bearer tokens anywhere (wlidd.logs.scrub).
    """
    text = output.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[-limit:]
        text = text.partition("\n")[2]
    material = _SecretMaterial(hide)
    lines = scrub(text).splitlines()
    hidden = [line.strip() == REDACTED or material.found_in(line) or _secret_shaped(line) for line in lines]
    spreading = True
    while spreading:  # a fragment-like line next to a redacted one goes too, in both directions
        spreading = False
        for index, line in enumerate(lines):
            if hidden[index] or not _FRAGMENT_LINE.fullmatch(line.strip()):
                continue
            if (index > 0 and hidden[index - 1]) or (index + 1 < len(lines) and hidden[index + 1]):
                hidden[index] = spreading = True
    kept: list[str] = []
    for line, redacted in zip(lines, hidden, strict=True):
        if not redacted:
            kept.append(line)
        elif not kept or kept[-1] != REDACTED:
            kept.append(REDACTED)
    return "\n".join(kept).strip()


SECRET_FRAGMENT_B64 = 12  # characters of a secret's base64 (72 bits) that mark a line as carrying it
SECRET_FRAGMENT_HEX = 16  # hex digits (8 bytes) of a secret's DER that mark a line as carrying it
_B64_RUN = re.compile(r"[A-Za-z0-9+_-]{16,}")  # '/' splits runs, so path components are judged alone
_HEX_PAIRS = re.compile(r"(?:[0-9A-Fa-f]{2}[:\s-]?){8,}")
_FRAGMENT_LINE = re.compile(r"[A-Za-z0-9+/=_-]+|[0-9A-Fa-f:\s]+")  # one base64(url) word, or hex and separators
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/]")
_NOT_HEX = re.compile(r"[^0-9a-f]")
_PEM_BODY = re.compile(r"-----BEGIN [^-]+-----(.*?)-----END [^-]+-----", re.S)


def _secret_shaped(line: str) -> bool:
    """A run that looks random (base64 with letters and digits) or binary (hex byte pairs)."""
    if _HEX_PAIRS.search(line):
        return True
    return any(any(c.isdigit() for c in run) and any(c.isalpha() for c in run) for run in _B64_RUN.findall(line))


def _b64_normal(text: str) -> str:
    """`text` as plain base64 characters only (base64url's - and _ mapped to + and /)."""
    return _NOT_B64.sub("", text.replace("-", "+").replace("_", "/"))


class _SecretMaterial:
    """Fragments of the secrets a sink wrote, to recognize them in a command's output however it was
    formatted: every SECRET_FRAGMENT_B64-character window of each secret (as text, and of each PEM
    block's base64 body), and every SECRET_FRAGMENT_HEX-digit window of each PEM block's DER in hex.
    Sizes: a few thousand windows for an RSA-4096 key."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.b64: set[str] = set()
        self.hex: set[str] = set()
        for secret in secrets:
            bodies = [match.group(1) for match in _PEM_BODY.finditer(secret)]
            for body in bodies:
                normal = _b64_normal(body)
                self._add(self.b64, normal, SECRET_FRAGMENT_B64)
                with contextlib.suppress(ValueError):
                    self._add(self.hex, base64.b64decode(normal + "=" * (-len(normal) % 4)).hex(), SECRET_FRAGMENT_HEX)
            if not bodies:
                self._add(self.b64, _b64_normal(secret), SECRET_FRAGMENT_B64)

    @staticmethod
    def _add(windows: set[str], text: str, size: int) -> None:
        windows.update(text[i : i + size] for i in range(len(text) - size + 1))

    def found_in(self, line: str) -> bool:
        return self._search(self.b64, _b64_normal(line), SECRET_FRAGMENT_B64) or self._search(
            self.hex, _NOT_HEX.sub("", line.lower()), SECRET_FRAGMENT_HEX
        )

    @staticmethod
    def _search(windows: set[str], text: str, size: int) -> bool:
        return bool(windows) and any(text[i : i + size] in windows for i in range(len(text) - size + 1))


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
    """(path, content, mode) of every file a sink writes for `state`, the file with the key first (pure)."""
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
        (key, svid.key_pem(), sink.key_mode),
        (cert, svid.chain_pem, sink.mode),
        (sink.dir / "bundle.pem", state.identity.own_bundle.pem, sink.mode),
        (config_path, json.dumps(document, indent=2).encode() + b"\n", sink.mode),
    ]


def write_credentials(sink: CredentialSinkConfig, state: IdentityState) -> None:
    """Write one sink's files as a set (write_files: all written and fsynced before any is renamed, so a
    failure while writing changes none). The key is renamed before the chain that needs it: a reader
    that sees the new chain finds the new key (and the certificate_config.json names stable paths).
    Raises OSError (SinkRefused) as write_files, KeyError for an owner, group or reader this host
    does not know."""
    uid, gid = _ids(sink)
    readers = resolve_readers(sink.readers)
    write_files(credential_files(sink, state), uid, gid, readers=readers)


async def publish_credentials(sinks: tuple[CredentialSinkConfig, ...], state: IdentityState) -> None:
    """Write every sink, then run the commands and send the signals of those written, concurrently (one
    task per sink: no sink's new files or command wait on another sink's command). Failures are
    logged, never raised."""
    written: list[CredentialSinkConfig] = []
    for sink in sinks:
        try:
            await anyio.to_thread.run_sync(write_credentials, sink, state)
        except (OSError, KeyError) as exc:
            log.error("credential sink write failed", identity=state.name, dir=str(sink.dir), error=_reason(exc))
            continue
        log.info("credential sink written", identity=state.name, dir=str(sink.dir), serial=state.identity.svid.serial)
        written.append(sink)
    async with anyio.create_task_group() as tg:
        for sink in written:
            if sink.on_change or (sink.signal is not None and sink.pid_file is not None):
                tg.start_soon(_after_credentials, sink, state)


async def _after_credentials(sink: CredentialSinkConfig, state: IdentityState) -> None:
    """One written sink's command, then its signal."""
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
    """Whether this process holds CAP_CHOWN."""
    return _has_capability(_CAP_CHOWN)


def _has_capability(bit: int) -> bool:
    """Whether this process holds capability number `bit` (CapEff in /proc/self/status,
    capabilities(7)); without /proc, whether it is root."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _all_sinks(config: Config) -> list[tuple[str, CredentialSinkConfig | SinkConfig]]:
    """Every sink with its place in the config, for `wlidd check` lines."""
    sinks: list[tuple[str, CredentialSinkConfig | SinkConfig]] = []
    for name, identity in sorted(config.identities.items()):
        sinks += [(f"identities.{name}.sinks[{i}] ({s.dir})", s) for i, s in enumerate(identity.sinks)]
    for name, token in sorted(config.tokens.items()):
        sinks += [(f"tokens.{name}.sinks[{i}] ({s.path})", s) for i, s in enumerate(token.sinks)]
    return sinks


def sink_problems(config: Config) -> list[str]:
    """`wlidd check`: sinks the daemon would refuse to write, one line each: an owner, group or reader
    this host does not know (the daemon logs `… sink write failed` and writes nothing)."""
    problems = []
    for where, sink in _all_sinks(config):
        missing = []
        if sink.owner is not None and user_id(sink.owner) is None:
            missing.append(f"no user {sink.owner!r} (owner)")
        if sink.group is not None and group_id(sink.group) is None:
            missing.append(f"no group {sink.group!r} (group)")
        missing += [f"no user {user!r} (readers)" for user in sink.readers.users if user_id(user) is None]
        missing += [f"no group {group!r} (readers)" for group in sink.readers.groups if group_id(group) is None]
        problems += [f"{where}: {reason} on this host: the sink would not be written" for reason in missing]
    return problems


def ownership_warnings(config: Config) -> list[str]:
    """`wlidd check`: sinks whose owner/group would fail with EPERM. A non-root daemon without
    CAP_CHOWN (the shipped unit: User=wlidd, no capabilities, @chown filtered) can hand a file only
    to itself; `readers` (POSIX ACLs) needs no capability."""
    sinks = _all_sinks(config)
    if not any(s.owner is not None or s.group is not None for _, s in sinks):
        return []
    capable = has_cap_chown()
    euid, groups = os.geteuid(), {os.getegid(), *os.getgroups()}
    shipped_user = user_id("wlidd") is not None
    warnings = []
    for where, sink in sinks:
        if sink.owner is None and sink.group is None:
            continue
        uid = None if sink.owner is None else user_id(sink.owner)
        gid = None if sink.group is None else group_id(sink.group)
        foreign = (uid is not None and uid != euid) or (gid is not None and gid not in groups)
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


def _reason(exc: BaseException) -> str:
    """An error for a log line: the message of a SinkRefused or KeyError, else `strerror: filename`."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else "unknown name"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


async def follow_credentials(watcher: CredentialWatcher) -> None:
    """Rewrite the identity's sinks (as configured now: a reload may change them) on every new state."""
    async for _ in watcher.changes():
        await republish_credentials(watcher)


async def republish_credentials(watcher: CredentialWatcher) -> None:
    """Write the identity's sinks, as configured now, from its current state (nothing before the first
    one). Called on every new state and by a reload that changed the sinks (a reader removed loses
    access at once, not at the next rotation). Serialized per identity; the state is read once the
    lock is held, so the newest one is what stays on disk."""
    async with _lock(_credential_locks, watcher.name):
        state = watcher.current
        if state is not None and watcher.source.config.sinks:
            await publish_credentials(watcher.source.config.sinks, state)
