"""File outputs for consumers that read from disk: credential sinks published one generation at a time, token
files replaced by one rename. A reader never sees half a file, nor a key from one generation with a chain
from another.

Credential sinks follow Kubernetes' atomic writer (pkg/volume/util/atomic_writer.go): each generation's
files go into a fresh hidden directory `<dir>/..<UTC time>.<random>` (every file written with its mode,
ACL and owner, and fsynced), then the link `..data_tmp -> ..<generation>` is renamed over `<dir>/..data`
(the one atomic step), then the stable names `<dir>/<file> -> ..data/<file>` are made (once; left alone
after), then the old generation is removed. A write that fails before the rename changes nothing a reader
sees. Consumers watch the directory for the move of `..data` (Envoy's watched_directory does), or resolve
`..data` once and read every file of a set through it, or use the single-file layout ("spiffe-fs"), or
on_change/signal. The check before a write is cheap, so every sink is brought up to date (missing, stale or
changed files rewritten; current ones left alone) on start, on every rotation, on SIGHUP, after a config
change and periodically (ensure_credentials, ensure_token). Layouts, one naming scheme each, matching
their consumers (layout_files): "files" (cert.pem, key.pem, bundle.pem, certificate_config.json),
"spiffe-helper" (svid.pem, svid_key.pem, svid_bundle.pem) and "spiffe-fs" (the SPIFFE Filesystem Delivery
draft: credential-bundle.private-key.pem, <trust domain>.spiffe-trust-bundle.pem). `wlidd creds --out`
writes through the same code.

The daemon may run as root while the directories it writes into are reachable by other users, so every
path is walked from / one component at a time (openat with O_NOFOLLOW, `wlidd.safedir`): each directory on
the way must belong to root or to the daemon's own user and must not be writable by anyone else (a sticky,
world-writable directory such as /tmp is accepted: others cannot move what root or the daemon put there,
but any user may hold a name there first, which is reported as such). A symbolic link is followed only
when it, too, belongs to root or the daemon's user. Files are then created (O_EXCL) and renamed relative
to the directory's descriptor, so nothing can swap a parent midway. Leftovers of a crash (temp files and
links, generation directories `..data` does not lead to, `..data_tmp`) are removed when root or the
daemon's user owns them, and left alone (and never in the way) when another user does.

`readers` grants users and groups read access through a POSIX ACL set on each file before it is
published (wlidd.posix_acl), and read/traverse on the sink directory; it needs no capability.

An optional command runs after each change: argv list (never a shell), with a timeout, a minimal
environment and bounded output, whose logged tail is masked of anything that could be the secret. An
optional signal goes to the process in pid_file, after checks on the file, its directory and the
process (through a pidfd, so the process checked is the one signalled). Commands and signals run only for
sinks that were actually (re)written, once every sink is, concurrently (one task per sink). Publications
of one identity or token source are serialized.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import json
import operator
import os
import re
import secrets
import signal as signals
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from wlidd import posix_acl
from wlidd.accounts import group_id, user_id
from wlidd.clock import iso_z
from wlidd.config import Config, CredentialSinkConfig, SinkConfig, SinkReaders, TokenConfig
from wlidd.logs import REDACTED, get_logger, scrub
from wlidd.safedir import OPEN_DIR, SinkRefused, open_dir, trusted_uids
from wlidd.tokens.model import Token
from wlidd.watch import CredentialWatcher, IdentityState

log = get_logger("wlidd.sinks")

COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # all an on_change command gets
OUTPUT_LIMIT = 64 * 1024  # bytes of a command's output (stdout and stderr together) kept; the rest is discarded
LOGGED_TAIL = 400  # characters of that output logged when the command fails
_SWEPT_LIMIT = 4096  # (directory, name) pairs remembered as swept of stale temp files
_CAP_CHOWN, _CAP_FOWNER = 0, 3  # capability numbers (linux/capability.h)
_swept: set[tuple[int, int, str]] = set()


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


# ---- writing one file --------------------------------------------------------------------------------


def write_atomic(
    path: Path, data: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1, *, readers: Readers | None = None
) -> None:
    """Replace `path` with `data` in one rename (token sinks; a certificate_config.json outside its sink's
    directory). The temp file beside it gets its mode, ACL (`readers`: read access, and read/traverse on the
    directory), owner and content, and is fsynced, before the rename; so the file never exists with a
    wider mode, another owner or another ACL, and a failure while writing (a full disk, a refused path, a
    file system without ACLs) leaves the old file and no temp file. Missing directories are created (0755).

    Raises SinkRefused when a directory on the way could be changed by another user (see open_dir) or the
    name is held by another user; another OSError from the kernel, whose filename is `path` (never a temp
    file's). EOPNOTSUPP: a file system without POSIX ACLs, with `readers`.
    """
    acl = posix_acl.file_acl(mode, readers.users, readers.groups) if readers else None
    item = _stage(path, data, mode, uid, gid, readers, acl)
    try:
        _check_target(item)
        try:
            os.replace(item.tmp, item.path.name, src_dir_fd=item.dir_fd, dst_dir_fd=item.dir_fd)
        except OSError as exc:
            raise _target_error(item, exc) from None
        item.renamed = True
        os.fsync(item.dir_fd)
    finally:
        if not item.renamed:
            with contextlib.suppress(OSError):
                os.unlink(item.tmp, dir_fd=item.dir_fd)
        os.close(item.dir_fd)


@dataclass
class _Staged:
    """A file written to `tmp` in the directory `dir_fd`, waiting to be renamed to `path`."""

    path: Path
    dir_fd: int
    tmp: str
    renamed: bool = False


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
                _fill_file(fd, data, mode, acl, uid, gid, path)
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


def _fill_file(fd: int, data: bytes, mode: int, acl: bytes | None, uid: int, gid: int, shown: Path) -> None:
    """Give a new, empty file its mode, ACL and owner (-1: leave as created) before any content, then the
    content, fsynced: the file never holds the data with wider access than `mode` and `acl` give."""
    os.fchmod(fd, mode)
    if acl is not None:
        _set_acl(fd, acl, shown)  # before the chown: only the owner (or CAP_FOWNER) may set it
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


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
    """Refuse, before the rename, a target that the rename would fail on: a directory at its name, or a
    name another user holds in a sticky directory when this process may not replace it (no CAP_FOWNER).
    A regular file or link of another user is otherwise replaced (the rename swaps the name, never
    writes through it)."""
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
    if st.st_uid in trusted_uids() or not parent.st_mode & stat.S_ISVTX:
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
    trusted = trusted_uids()
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
    """A token file's bytes. "text": the token alone. "json": `{"access_token", "token_type",
    "expire_time"}` with `expire_time` RFC 3339 UTC. No `expires_in`: a file has no "now", and a reader
    would count the seconds left at write time from when it reads (an hour-long token read just before its
    refresh would look good for another hour). The same token always renders the same bytes, whatever
    `now` (kept for callers)."""
    if fmt == "json":
        document = {
            "access_token": token.value,
            "token_type": token.token_type,
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


async def follow_token(source: TokenPublisher, clock: Callable[[], dt.datetime]) -> None:
    """Write a token source's sinks (as configured now: a reload may change them) with every token it
    publishes (`source.changes()`: the latest one first, at start), then run the on_change of those written,
    as `publish_token`. The daemon runs one per source, so the caller that asked for a token has it while its
    files are written and its hooks run. Serialized with the source's other publications (ensure_token); a
    token superseded by the time the lock is held is skipped, as the next turn writes the newer one, so the
    newest token is what stays on disk. Failures are logged, never raised; runs until cancelled."""
    async for token in source.changes():
        async with _lock(_token_locks, source.name):
            if token is source.current:
                await _publish_token(source.config.sinks, token, clock(), source.name)


async def ensure_token(source: TokenHolder, clock: Callable[[], dt.datetime]) -> tuple[SinkConfig, ...]:
    """Bring a token source's sinks, as configured now, up to date with its current token: a file that is
    missing (a wiped tmpfs), holds another token, or has another mode, owner or ACL (a reload changed the
    sink: a reader removed loses access at once, not at the next refresh) is rewritten, and its on_change
    runs; a current one is left alone. Nothing without a servable token. Called on start of the periodic
    check, on SIGHUP and after a config change. Serialized with the source's other publications, and
    reads the token only once it holds the lock, so the newest token is what stays on disk. The sinks
    written."""
    async with _lock(_token_locks, source.name):
        _failing.keep_only("token", source.name, [str(sink.path) for sink in source.config.sinks])
        token = source.servable()
        if token is None or not source.config.sinks:
            return ()
        return await _publish_token(source.config.sinks, token, clock(), source.name, only_stale=True)


async def _publish_token(
    sinks: tuple[SinkConfig, ...], token: Token, now: dt.datetime, source: str, *, only_stale: bool = False
) -> tuple[SinkConfig, ...]:
    written: list[SinkConfig] = []
    for sink in sinks:
        try:
            uid, gid = _ids(sink)
            readers = resolve_readers(sink.readers)
            data = render_token(token, sink.format, now)
            if only_stale and await anyio.to_thread.run_sync(_token_file_is, sink, data, uid, gid, readers):
                _failing.solved(str(sink.path))
                continue
            write = functools.partial(write_atomic, sink.path, data, sink.mode, uid, gid, readers=readers)
            await anyio.to_thread.run_sync(write)
        except (OSError, KeyError) as exc:  # KeyError: an owner, group or reader that does not exist
            log.error("token sink write failed", source=source, path=str(sink.path), error=_reason(exc))
            _failing.failed(SinkProblem("token", source, str(sink.path), _reason(exc)))
            continue
        _failing.solved(str(sink.path))
        written.append(sink)
    async with anyio.create_task_group() as tg:
        for sink in written:
            if sink.on_change:
                tg.start_soon(_on_change, sink.on_change, sink.on_change_timeout, source, token.value)
    return tuple(written)


def _token_file_is(sink: SinkConfig, data: bytes, uid: int, gid: int, readers: Readers | None) -> bool:
    """Whether the sink's file already holds exactly these bytes (a token renders the same bytes at any
    time; a "json" file from an older wlidd, with `expires_in`, is rewritten once) with the sink's mode,
    owner and ACL."""
    return _file_is(sink.path, data, sink.mode, uid, gid, readers, operator.eq)


async def _on_change(argv: Sequence[str], timeout: float, source: str, secret: str) -> None:
    await run_command(list(argv), timeout, source, hide=(secret,))


class TokenHolder(Protocol):
    """What ensure_token needs of a token source (wlidd.tokens.manager.TokenSource)."""

    name: str
    config: TokenConfig

    def servable(self, now: dt.datetime | None = None) -> Token | None: ...


class TokenPublisher(TokenHolder, Protocol):
    """What follow_token needs of a token source (wlidd.tokens.manager.TokenSource): its latest token, and
    every token it publishes."""

    current: Token | None

    def changes(self) -> AsyncIterator[Token]: ...


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
_FRAGMENT_LINE = re.compile(r"[A-Za-z0-9+/=_.-]+|[0-9A-Fa-f:\s]+")  # one base64(url) word (dots: tokens, JWTs), or hex
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


# ---- credential layouts: one naming scheme each ---------------------------------------------------------

# What every layout holds (see CredentialSinkConfig and the README's table): file name → content.
LAYOUTS: dict[str, str] = {
    "files": "cert.pem (chain), key.pem, bundle.pem (own trust domain), certificate_config.json",
    "spiffe-helper": "svid.pem (chain), svid_key.pem, svid_bundle.pem (own trust domain; + federated roots)",
    "spiffe-fs": "credential-bundle.private-key.pem (key, then chain), <trust domain>.spiffe-trust-bundle.pem",
}
CERTIFICATE_CONFIG = "certificate_config.json"
SPIFFE_FS_BUNDLE = "credential-bundle.private-key.pem"  # SPIFFE Filesystem Delivery draft, section 2.1
SPIFFE_FS_TRUST_BUNDLE = "{}.spiffe-trust-bundle.pem"  # ... section 2.2, one per trust domain


@dataclass(frozen=True)
class SinkFile:
    """One file of a credential sink: its name in the sink directory, its content and mode, and whether it
    holds the private key (`secret`: listed first, never logged). The content never shows in a repr.

    `name` is a plain file name: no '/', not '.' or '..', and not starting with '..' (reserved for the
    generations, as in Kubernetes' atomic writer); ValueError otherwise.
    """

    name: str
    data: bytes = field(repr=False)
    mode: int
    secret: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\0" in self.name or self.name.startswith("..") or self.name == ".":
            raise ValueError(f"{self.name!r} is not a sink file name (no '/', not starting with '..')")


@dataclass(frozen=True)
class Material:
    """What every layout is made of, as PEM: the private key (PKCS#8), the chain (leaf first), the own trust
    domain's bundle and the federated ones ((trust domain, PEM), sorted). The key never shows in a repr."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    trust_domain: str
    bundle_pem: bytes
    federated: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, state: IdentityState) -> Material:
        identity = state.identity
        own = identity.svid.spiffe_id.trust_domain
        return cls(
            key_pem=identity.svid.key_pem(),
            chain_pem=identity.svid.chain_pem,
            trust_domain=own,
            bundle_pem=identity.own_bundle.pem,
            federated=tuple((b.trust_domain, b.pem) for b in identity.bundles if b.trust_domain != own),
        )


def certificate_config_document(directory: Path) -> bytes:
    """certificate_config.json naming the stable paths of a "files" sink in `directory` (google-auth's
    "workload" entry: cert_path, key_path)."""
    entry = {"cert_path": str(directory / "cert.pem"), "key_path": str(directory / "key.pem")}
    return json.dumps({"version": 1, "cert_configs": {"workload": entry}}, indent=2).encode() + b"\n"


def layout_files(
    layout: str,
    material: Material,
    directory: Path,
    *,
    mode: int = 0o644,
    key_mode: int = 0o600,
    include_federated_domains: bool = False,
    certificate_config: str | None = CERTIFICATE_CONFIG,
) -> list[SinkFile]:
    """Every file `layout` has for `material`, the one holding the key first (pure). `certificate_config`:
    the name of the "files" layout's certificate_config.json in `directory` (None: written elsewhere).

    - "files": key.pem, cert.pem (chain), bundle.pem (own trust domain), certificate_config.json;
    - "spiffe-helper": svid_key.pem, svid.pem (chain), svid_bundle.pem (own trust domain's roots, then the
      federated ones with `include_federated_domains`), as spiffe-helper writes them (pkg/disk/x509.go);
    - "spiffe-fs": credential-bundle.private-key.pem (the PRIVATE KEY block, then the chain without any
      trust anchor of the own bundle) and <trust domain>.spiffe-trust-bundle.pem for every trust domain
      (SPIFFE Filesystem Delivery draft, sections 2.1 and 2.2).

    ValueError for an unknown layout.
    """
    if layout == "files":
        files = [
            SinkFile("key.pem", material.key_pem, key_mode, secret=True),
            SinkFile("cert.pem", material.chain_pem, mode),
            SinkFile("bundle.pem", material.bundle_pem, mode),
        ]
        if certificate_config is not None:
            files.append(SinkFile(certificate_config, certificate_config_document(directory), mode))
        return files
    if layout == "spiffe-helper":
        bundle = material.bundle_pem
        if include_federated_domains:
            bundle += b"".join(pem for _, pem in sorted(material.federated))
        return [
            SinkFile("svid_key.pem", material.key_pem, key_mode, secret=True),
            SinkFile("svid.pem", material.chain_pem, mode),
            SinkFile("svid_bundle.pem", bundle, mode),
        ]
    if layout == "spiffe-fs":
        bundles = sorted([(material.trust_domain, material.bundle_pem), *material.federated])
        return [
            SinkFile(
                SPIFFE_FS_BUNDLE,
                material.key_pem + _without_anchors(material.chain_pem, material.bundle_pem),
                key_mode,
                secret=True,
            ),
            *(SinkFile(SPIFFE_FS_TRUST_BUNDLE.format(td), pem, mode) for td, pem in bundles),
        ]
    raise ValueError(f"unknown sink layout {layout!r} (known: {', '.join(LAYOUTS)})")


def _without_anchors(chain_pem: bytes, bundle_pem: bytes) -> bytes:
    """The chain as PEM without the certificates the bundle holds (its trust anchors): the draft's credential
    bundle "MUST NOT contain the trust anchor". The leaf always stays."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        anchors = {c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(bundle_pem)}
    except ValueError:
        return chain_pem  # not ours to judge here: wlidd validated the set, the API handed it out
    kept = [chain[0], *(c for c in chain[1:] if c.public_bytes(Encoding.DER) not in anchors)]
    if len(kept) == len(chain):
        return chain_pem
    return b"".join(c.public_bytes(Encoding.PEM) for c in kept)


def credential_files(sink: CredentialSinkConfig, material: Material) -> list[SinkFile]:
    """The files of `sink`'s generation (layout_files with the sink's options; pure). A certificate_config
    outside the sink's directory is not among them (write_credentials writes it on its own)."""
    return layout_files(
        sink.layout,
        material,
        sink.dir,
        mode=sink.mode,
        key_mode=sink.key_mode,
        include_federated_domains=sink.include_federated_domains,
        certificate_config=_config_name_inside(sink),
    )


def _config_name_inside(sink: CredentialSinkConfig) -> str | None:
    """The name of the files layout's certificate_config.json when it lives in the sink's directory (part
    of each generation), None when it lives elsewhere (or the layout has none)."""
    if sink.layout != "files":
        return None
    path = sink.certificate_config
    if path is None:
        return CERTIFICATE_CONFIG
    if os.path.abspath(path.parent) == os.path.abspath(sink.dir):
        return path.name
    return None


def write_credentials(sink: CredentialSinkConfig, state: IdentityState) -> bool:
    """Bring one sink up to date with `state`: its generation (publish_generation) and, for a
    certificate_config.json outside the sink's directory, that file. True when anything was (re)written,
    False when the sink already held exactly this (names, contents, modes, owner, ACLs, stable links).
    Raises OSError (SinkRefused) as publish_generation, KeyError for an owner, group or reader this host
    does not know, ValueError for a file name the layout cannot have."""
    uid, gid = _ids(sink)
    readers = resolve_readers(sink.readers)
    written = publish_generation(sink.dir, credential_files(sink, Material.of(state)), uid, gid, readers=readers)
    if sink.layout == "files" and sink.certificate_config is not None and _config_name_inside(sink) is None:
        data = certificate_config_document(sink.dir)
        path = sink.certificate_config
        if not _file_is(path, data, sink.mode, uid, gid, readers):
            write_atomic(path, data, sink.mode, uid, gid, readers=readers)
            written = True
    return written


async def publish_credentials(
    sinks: tuple[CredentialSinkConfig, ...], state: IdentityState
) -> tuple[CredentialSinkConfig, ...]:
    """Bring every sink up to date with `state` (write_credentials: only a stale or missing one is
    written), then run the commands and send the signals of those written, concurrently (one task per
    sink: no sink's new files or command wait on another sink's command). The sinks written; failures
    are logged, never raised."""
    written: list[CredentialSinkConfig] = []
    for sink in sinks:
        try:
            changed = await anyio.to_thread.run_sync(write_credentials, sink, state)
        except (OSError, KeyError, ValueError) as exc:
            log.error("credential sink write failed", identity=state.name, dir=str(sink.dir), error=_reason(exc))
            _failing.failed(SinkProblem("identity", state.name, str(sink.dir), _reason(exc)))
            continue
        _failing.solved(str(sink.dir))
        if changed:
            log.info(
                "credential sink written", identity=state.name, dir=str(sink.dir), serial=state.identity.svid.serial
            )
            written.append(sink)
    async with anyio.create_task_group() as tg:
        for sink in written:
            if sink.on_change or (sink.signal is not None and sink.pid_file is not None):
                tg.start_soon(_after_credentials, sink, state)
    return tuple(written)


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


# ---- one generation: Kubernetes' atomic writer, walked safely ----------------------------------------------

DATA_LINK = "..data"  # <dir>/..data -> ..<generation>: re-pointed by one rename per generation
DATA_TMP = "..data_tmp"  # the new ..data link, made beside it and renamed over it
# ..2026_07_01_12_00_00.1a2b3c4d5e6f: UTC time and a random part (Kubernetes: ..2006_01_02_15_04_05.<random>)
_GENERATION = re.compile(r"\.\.\d{4}(?:_\d\d){5}\.[A-Za-z0-9]{6,16}")
ADOPT_LIMIT = 1 << 20  # bytes of a plain file left by an older wlidd that are carried into the first generation
_DEFAULT_ACL = "system.posix_acl_default"


@dataclass(frozen=True)
class _Entry:
    """A file to put in a generation with its owner and ACL (-1: leave the id as created; None: no ACL)."""

    file: SinkFile
    uid: int
    gid: int
    acl: bytes | None


def publish_generation(
    directory: Path, files: Sequence[SinkFile], uid: int = -1, gid: int = -1, *, readers: Readers | None = None
) -> bool:
    """Make `directory` hold `files` (mode, owner `uid`/`gid` unless -1, read access for `readers` through
    a POSIX ACL) as one generation, published in one atomic step. True when something was written; False
    when the directory already held exactly that (the check is cheap: a readlink, the files' stat, content
    and ACL), so calling this on every SIGHUP or timer tick rewrites only what is stale or missing.

    The steps follow Kubernetes' atomic writer (pkg/volume/util/atomic_writer.go, Write):

    1. the current generation is the target of `<dir>/..data`; if it holds these files and every stable
       name `<dir>/<file>` is the link `..data/<file>`, nothing is done;
    2. a new hidden directory `..<UTC time>.<random>` (mode 0755, its default ACL removed) gets every file,
       each created O_EXCL with its mode, ACL and owner set before its content, and fsynced; then the
       directory is fsynced. A failure here removes it and changes nothing a reader sees;
    3. the link `..data_tmp -> ..<new>` is made and renamed over `..data`: the one atomic step;
    4. missing stable names are created as links into `..data` (a temp link renamed into place, which also
       replaces a plain file an older wlidd left: before the first generation such files are carried into
       a generation of their own, so no name changes content while it becomes a link);
    5. stable links of names the new generation no longer has are removed, then the old generation.

    One departure from that order: the directory and the `..data_tmp` link of the *next* generation are
    made, empty, at the end of each publication (the "spare"), and step 2 fills it. Files written inside
    it raise no event in `<dir>` (inotify does not recurse), so the first event a watcher of `<dir>` gets
    for a rotation is the rename of `..data_tmp` over `..data` itself: a consumer that reloads on any
    first event then reads the new generation whole, not the old one while it is being replaced. Without
    a spare (the first write, after a crash or a wiped directory) the steps run in Kubernetes' order.

    A reader that resolves `..data` once and reads every file through that generation, or that reloads on
    the IN_MOVED_TO of `..data` (Envoy's watched_directory), never sees a key from one generation with a
    chain from another. Leftovers of a crash (`..<generation>` directories neither `..data` nor the spare
    `..data_tmp` leads to, a dangling `..data_tmp`, temp links) are removed when root or wlidd's user
    owns them.

    Raises SinkRefused (a directory on the way others could change, see open_dir; a name another user
    holds in a sticky directory), IsADirectoryError (a directory at a stable name), or another OSError
    whose filename is the stable path of the file concerned; in each case the published files are left
    as they were. EOPNOTSUPP: a file system without POSIX ACLs, with `readers`.
    """
    names = [f.name for f in files]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"a generation needs distinct file names, not {names}")
    dir_fd = open_dir(directory, create=True)
    try:
        with _directory_lock(dir_fd, directory):
            return _publish_generation(dir_fd, directory, files, names, uid, gid, readers)
    finally:
        os.close(dir_fd)


_DIRECTORY_LOCKS: dict[tuple[int, int], threading.Lock] = {}  # one per sink directory written (config-bounded)
_DIRECTORY_LOCKS_GUARD = threading.Lock()
FLOCK_WAIT = 2.0  # seconds a writer waits for another process's flock on a sink directory before going on


@contextlib.contextmanager
def _directory_lock(dir_fd: int, directory: Path) -> Iterator[None]:
    """Serialize the writers of one sink directory: threads of this process by a lock per (device, inode)
    (two sinks reaching one directory through an alias such as /var/run -> /run), other processes (a
    second daemon, `wlidd creds --out` into a live sink) by flock(2) on the directory. Anyone who can open
    the directory can take that flock, so it is waited for FLOCK_WAIT seconds only, then the write goes on
    (logged): the steps are safe without it, the lock only keeps writers from undoing each other's work."""
    st = os.fstat(dir_fd)
    with _DIRECTORY_LOCKS_GUARD:
        if len(_DIRECTORY_LOCKS) >= _LOCKS_LIMIT:
            _DIRECTORY_LOCKS.clear()
        lock = _DIRECTORY_LOCKS.setdefault((st.st_dev, st.st_ino), threading.Lock())
    with lock:
        deadline = time.monotonic() + FLOCK_WAIT
        locked = False
        while True:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.limited(
                        "warning",
                        "sink directory is locked by another process; writing anyway",
                        key={"dir": str(directory)},
                    )
                    break
                time.sleep(0.01)
            except OSError:
                break  # a file system without flock: the in-process lock is all there is
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    fcntl.flock(dir_fd, fcntl.LOCK_UN)


def _publish_generation(
    dir_fd: int,
    directory: Path,
    files: Sequence[SinkFile],
    names: list[str],
    uid: int,
    gid: int,
    readers: Readers | None,
) -> bool:
    """publish_generation's steps, with the directory open and locked."""
    shown = str(directory)
    if readers:
        _grant_directory(dir_fd, readers, shown)
    acls: dict[int, bytes] = {}
    for f in files:
        if readers and f.mode not in acls:
            acls[f.mode] = posix_acl.file_acl(f.mode, readers.users, readers.groups)
    entries = [_Entry(f, uid, gid, acls.get(f.mode)) for f in sorted(files, key=lambda f: not f.secret)]
    current = _current_generation(dir_fd)
    spare = _spare_generation(dir_fd, current)
    _sweep_generations(dir_fd, current, spare, shown)
    for name in names:
        _sweep_once(dir_fd, name, shown)
    fresh = current is not None and _generation_holds(dir_fd, current, entries)
    if fresh and all(_is_data_link(dir_fd, name) for name in names):
        if spare is None:  # up to date; make the next rotation's first event its ..data rename
            _prepare_spare(dir_fd, directory)
        return False
    _check_names(dir_fd, directory, [*names, DATA_LINK, DATA_TMP])
    old = current
    if not fresh:
        if current is None and (adopted := _adopt_plain_files(dir_fd, directory, names)) is not None:
            old, spare = adopted, None  # its swap used ..data_tmp: the spare is a leftover now
        _publish(dir_fd, directory, entries, spare)
    _make_links(dir_fd, directory, names)
    if not fresh and old is not None:
        for name in _generation_names(dir_fd, old):
            if name not in names and _is_data_link(dir_fd, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
        if not _remove_generation(dir_fd, old):
            log.warning("old credential generation not removed", dir=shown, generation=old)
    if not fresh:
        _prepare_spare(dir_fd, directory)
    os.fsync(dir_fd)
    return True


def _current_generation(dir_fd: int) -> str | None:
    """The generation `..data` points to: a `..<time>.<random>` directory root or wlidd's user owns, reached
    through a link they own. None when there is no such link (first write, a wiped directory, an older
    wlidd's plain files) or it leads anywhere else."""
    try:
        st = os.stat(DATA_LINK, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) or st.st_uid not in trusted_uids():
            return None
        target = os.readlink(DATA_LINK, dir_fd=dir_fd)
        if not _GENERATION.fullmatch(target):
            return None
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in trusted_uids():
        return None
    return target


def _generation_holds(dir_fd: int, generation: str, entries: Sequence[_Entry]) -> bool:
    """Whether `generation` holds exactly `entries`: the same names and no others, each a regular file with
    one link, the content, the mode, the owner (wlidd's user and the group a new file gets, when -1) and
    the ACL (none without readers) it would be written with."""
    try:
        gen_fd = os.open(generation, OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(gen_fd)
        if stat.S_IMODE(st.st_mode) != 0o755 or st.st_uid not in trusted_uids():
            return False  # chmod'ed or taken over: readers may no longer reach the files
        if sorted(os.listdir(gen_fd)) != sorted(e.file.name for e in entries):
            return False
        default_uid, default_gid = _new_file_ids(gen_fd)
        for entry in entries:
            uid = default_uid if entry.uid == -1 else entry.uid
            gid = default_gid if entry.gid == -1 else entry.gid
            if not _fd_file_is(gen_fd, entry.file.name, entry.file.data, entry.file.mode, uid, gid, entry.acl):
                return False
        return True
    except OSError:
        return False
    finally:
        os.close(gen_fd)


def _new_file_ids(dir_fd: int) -> tuple[int, int]:
    """The owner and group a file created in this directory gets: wlidd's user, and the directory's group
    when it has the set-group-ID bit, else wlidd's group."""
    st = os.fstat(dir_fd)
    return os.geteuid(), st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()


def _fd_file_is(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int,
    uid: int,
    gid: int,
    acl: bytes | None,
    same: Callable[[bytes, bytes], bool] = operator.eq,
) -> bool:
    """Whether `name` in the directory is a regular file (one link, not followed) whose content is `data`
    (by `same(on_disk, data)`), with this mode, owner, group and ACL (None: none beyond the mode)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > ADOPT_LIMIT:
            return False
        if same is operator.eq and st.st_size != len(data):
            return False
        if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (_mode_with_acl(mode, acl), uid, gid):
            return False
        if _acl_of(fd) != (None if acl is None else sorted(posix_acl.decode(acl))):
            return False
        content = bytearray()
        while len(content) <= ADOPT_LIMIT and (chunk := os.read(fd, 65536)):
            content += chunk
        return same(bytes(content), data)
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


def _mode_with_acl(mode: int, acl: bytes | None) -> int:
    """The mode the kernel shows for a file given `mode` and then `acl`: with named users or groups, the
    group bits are the ACL's mask (POSIX.1e; fs/posix_acl.c posix_acl_update_mode), so a 0600 key read
    by `readers` shows 0640."""
    if acl is None:
        return mode
    mask = next((e.perm for e in posix_acl.decode(acl) if e.tag == posix_acl.MASK), None)
    return mode if mask is None else (mode & ~0o070) | (mask << 3)


def _acl_of(fd: int) -> list[posix_acl.Entry] | None:
    """The file's access ACL entries, sorted; None when it has none beyond its mode. ValueError for one
    wlidd cannot read."""
    try:
        entries = posix_acl.decode(os.getxattr(fd, posix_acl.XATTR))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise
    if all(e.tag not in (posix_acl.USER, posix_acl.GROUP, posix_acl.MASK) for e in entries):
        return None  # the minimal ACL: what the mode says
    return sorted(entries)


def _file_is(
    path: Path,
    data: bytes,
    mode: int,
    uid: int,
    gid: int,
    readers: Readers | None,
    same: Callable[[bytes, bytes], bool] = operator.eq,
) -> bool:
    """Whether `path` (its directory walked as open_dir does, the file not followed) already holds `data`
    (by `same`) with this mode, owner and group (-1: as a new file would get them) and the ACL for
    `readers`."""
    try:
        dir_fd = open_dir(path.parent, create=False)
    except OSError:
        return False
    try:
        default_uid, default_gid = _new_file_ids(dir_fd)
        acl = posix_acl.file_acl(mode, readers.users, readers.groups) if readers else None
        uid, gid = default_uid if uid == -1 else uid, default_gid if gid == -1 else gid
        return _fd_file_is(dir_fd, path.name, data, mode, uid, gid, acl, same)
    finally:
        os.close(dir_fd)


def _is_data_link(dir_fd: int, name: str) -> bool:
    """Whether `name` is the link `..data/<name>`, owned by root or wlidd's user."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return (
            stat.S_ISLNK(st.st_mode)
            and st.st_uid in trusted_uids()
            and os.readlink(name, dir_fd=dir_fd) == f"{DATA_LINK}/{name}"
        )
    except OSError:
        return False


def _check_names(dir_fd: int, directory: Path, names: Sequence[str]) -> None:
    """Refuse, before anything is written, a name the publication would fail on: a directory at a stable
    name or at ..data, or a name another user holds in a sticky directory when this process may not
    replace it (no CAP_FOWNER)."""
    parent = os.fstat(dir_fd)
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        held = _held_by_other(st, parent)
        path = directory / name
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, f"{path} is a directory" + (f" that {held}" if held else "") + "; nothing written"
            )
        if held and not _has_capability(_CAP_FOWNER):
            raise SinkRefused(f"{path} {held}; nothing written (choose a directory only root or wlidd can write)")


def _publish(dir_fd: int, directory: Path, entries: Sequence[_Entry], spare: str | None) -> None:
    """Steps 2 and 3: fill the spare (or a new generation) with `entries`, then rename `..data_tmp` over
    `..data`. On failure the new generation (and its ..data_tmp) is removed and the error raised."""
    if spare is None:
        new = _write_generation(dir_fd, directory, entries)
        try:
            _link_data_tmp(dir_fd, directory, new)
            _rename_data(dir_fd, directory)
        except BaseException:
            _remove_generation(dir_fd, new)
            raise
        return
    try:
        _fill_generation(dir_fd, directory, spare, entries)
    except BaseException:
        if not _empty_generation(dir_fd, spare):  # kept empty for the next try: the directory is as it was
            with contextlib.suppress(OSError):
                os.unlink(DATA_TMP, dir_fd=dir_fd)
            _remove_generation(dir_fd, spare)
        raise
    try:
        _rename_data(dir_fd, directory)
    except BaseException:
        _remove_generation(dir_fd, spare)
        raise


def _spare_generation(dir_fd: int, current: str | None) -> str | None:
    """The next generation prepared by the last publication: `..data_tmp` (a link root or wlidd's user owns)
    leading to a `..<time>.<random>` directory of wlidd's user other than `current`; None without one."""
    try:
        st = os.stat(DATA_TMP, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) or st.st_uid not in trusted_uids():
            return None
        target = os.readlink(DATA_TMP, dir_fd=dir_fd)
        if target == current or not _GENERATION.fullmatch(target):
            return None
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return target if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() else None


def _prepare_spare(dir_fd: int, directory: Path) -> None:
    """Make the next generation's directory, empty, and `..data_tmp` leading to it (see publish_generation).
    Best effort: without it the next publication makes them itself."""
    try:
        spare = _new_generation_dir(dir_fd, directory)
    except OSError:
        return
    try:
        _link_data_tmp(dir_fd, directory, spare)
    except OSError:
        _remove_generation(dir_fd, spare)


def _new_generation_dir(dir_fd: int, directory: Path) -> str:
    """A new, empty generation directory `..<UTC time>.<random>` (mkdir: never anyone else's), mode 0755
    whatever the umask and without a default ACL (its files get exactly the ACLs set for them); its name.
    Everything that changes the directory itself (and so raises an event in `directory`) happens here,
    not when it is filled."""
    stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S")
    for _ in range(100):
        name = f"{stamp}.{secrets.token_hex(6)}"
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(directory)) from None
    else:
        raise FileExistsError(errno.EEXIST, "no free generation name", str(directory))
    try:
        gen_fd = os.open(name, OPEN_DIR, dir_fd=dir_fd)
        try:
            if os.fstat(gen_fd).st_uid != os.geteuid():
                raise SinkRefused(f"{directory / name} is not a directory of wlidd's user")
            with contextlib.suppress(OSError):
                os.removexattr(gen_fd, _DEFAULT_ACL)
            os.fchmod(gen_fd, 0o755)
        finally:
            os.close(gen_fd)
    except BaseException:
        _remove_generation(dir_fd, name)
        raise
    return name


def _write_generation(dir_fd: int, directory: Path, entries: Sequence[_Entry]) -> str:
    """A new generation directory holding `entries`, fsynced; its name. On failure it is removed and the
    error (its filename: the stable path) raised."""
    name = _new_generation_dir(dir_fd, directory)
    try:
        _fill_generation(dir_fd, directory, name, entries)
    except BaseException:
        _remove_generation(dir_fd, name)
        raise
    return name


def _fill_generation(dir_fd: int, directory: Path, name: str, entries: Sequence[_Entry]) -> None:
    """Write `entries` into the generation directory `name` (made by _new_generation_dir; emptied first),
    each file written and fsynced as _write_new_file does, then the directory fsynced. Nothing here changes
    the directory's own attributes unless they changed since (no event in the sink directory)."""
    gen_fd = os.open(name, OPEN_DIR, dir_fd=dir_fd)
    try:
        st = os.fstat(gen_fd)
        if st.st_uid != os.geteuid():
            raise SinkRefused(f"{directory / name} is not a directory of wlidd's user")
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.fchmod(gen_fd, 0o755)
        for leftover in os.listdir(gen_fd):
            os.unlink(leftover, dir_fd=gen_fd)
        for entry in entries:
            _write_new_file(gen_fd, entry, directory / entry.file.name)
        os.fsync(gen_fd)
    finally:
        os.close(gen_fd)


def _write_new_file(dir_fd: int, entry: _Entry, shown: Path) -> None:
    """Create `entry`'s file (O_EXCL, not following links) with its mode, ACL, owner, content, fsynced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(entry.file.name, flags, 0o600, dir_fd=dir_fd)
        try:
            _fill_file(fd, entry.file.data, entry.file.mode, entry.acl, entry.uid, entry.gid, shown)
        finally:
            os.close(fd)
    except OSError as exc:
        if isinstance(exc, SinkRefused):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(shown)) from None


def _link_data_tmp(dir_fd: int, directory: Path, generation: str) -> None:
    """The link `..data_tmp -> generation` (replacing a leftover of ours; another user's is refused)."""
    try:
        try:
            os.symlink(generation, DATA_TMP, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(DATA_TMP, dir_fd=dir_fd, follow_symlinks=False)
            held = _held_by_other(st, os.fstat(dir_fd))
            if held and not _has_capability(_CAP_FOWNER):
                raise SinkRefused(f"{directory / DATA_TMP} {held}; nothing written") from None
            os.unlink(DATA_TMP, dir_fd=dir_fd)
            os.symlink(generation, DATA_TMP, dir_fd=dir_fd)
    except OSError as exc:
        if isinstance(exc, SinkRefused):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(directory / DATA_TMP)) from None


def _rename_data(dir_fd: int, directory: Path) -> None:
    """Rename `..data_tmp` over `..data` (the atomic step), then fsync the directory."""
    try:
        os.replace(DATA_TMP, DATA_LINK, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(DATA_TMP, dir_fd=dir_fd)
        raise OSError(exc.errno, exc.strerror or str(exc), str(directory / DATA_LINK)) from None
    os.fsync(dir_fd)


def _swap_data(dir_fd: int, directory: Path, generation: str) -> None:
    """`..data_tmp -> generation`, renamed over `..data`."""
    _link_data_tmp(dir_fd, directory, generation)
    _rename_data(dir_fd, directory)


def _make_links(dir_fd: int, directory: Path, names: Sequence[str]) -> None:
    """Make each stable name the link `..data/<name>` (left alone when it already is): a temp link
    `.<name>.<random>.tmp`, renamed over the name (atomic, also over a plain file)."""
    for name in names:
        if _is_data_link(dir_fd, name):
            continue
        for _ in range(100):
            tmp = f".{name}.{secrets.token_hex(6)}.tmp"
            try:
                os.symlink(f"{DATA_LINK}/{name}", tmp, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory / name))
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise OSError(exc.errno, exc.strerror or str(exc), str(directory / name)) from None


def _adopt_plain_files(dir_fd: int, directory: Path, names: Sequence[str]) -> str | None:
    """Before the first generation in a directory an older wlidd wrote plain files into: carry those files
    (regular, owned by root or wlidd's user, at most ADOPT_LIMIT bytes) as they are (content, mode, owner,
    ACL) into a generation of their own, publish it and turn their names into links. Every name keeps its
    content while it becomes a link, so the new generation then replaces all of them in one step. The
    adopted generation's name, or None when there was nothing to adopt."""
    adopted: list[_Entry] = []
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in trusted_uids() or st.st_size > ADOPT_LIMIT:
                continue
            data = b""
            while len(data) <= ADOPT_LIMIT and (chunk := os.read(fd, 65536)):
                data += chunk
            try:
                acl = os.getxattr(fd, posix_acl.XATTR)
            except OSError:
                acl = None
            mode = stat.S_IMODE(st.st_mode)
            adopted.append(_Entry(SinkFile(name, data, mode), st.st_uid, st.st_gid, acl))
        except OSError:
            continue
        finally:
            os.close(fd)
    if not adopted:
        return None
    try:
        generation = _write_generation(dir_fd, directory, adopted)
    except OSError as exc:
        log.warning("plain files of an older wlidd not carried over", dir=str(directory), error=_reason(exc))
        return None
    try:
        _swap_data(dir_fd, directory, generation)
    except OSError as exc:
        _remove_generation(dir_fd, generation)
        log.warning("plain files of an older wlidd not carried over", dir=str(directory), error=_reason(exc))
        return None
    with contextlib.suppress(OSError):  # what failed here fails (and is reported) again in publish_generation
        _make_links(dir_fd, directory, [e.file.name for e in adopted])
    log.info("plain files of an older wlidd turned into links", dir=str(directory), files=len(adopted))
    return generation


def _generation_names(dir_fd: int, generation: str) -> list[str]:
    try:
        gen_fd = os.open(generation, OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        return []
    try:
        return os.listdir(gen_fd)
    finally:
        os.close(gen_fd)


def _empty_generation(dir_fd: int, name: str) -> bool:
    """Remove every file from the generation directory `name` (wlidd's user's); True when it is empty.
    Never the generation `..data` leads to (another writer may just have made it current)."""
    if _current_generation(dir_fd) == name:
        return False
    try:
        gen_fd = os.open(name, OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if os.fstat(gen_fd).st_uid != os.geteuid():
            return False
        for entry in os.listdir(gen_fd):
            os.unlink(entry, dir_fd=gen_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(gen_fd)


def _remove_generation(dir_fd: int, name: str) -> bool:
    """Remove a generation directory (its files, then itself) when root or wlidd's user owns it, without
    following links; True when it is gone. Errors are swallowed (a leftover is swept at a later write).
    Never the generation `..data` leads to (another writer may just have made it current)."""
    if _current_generation(dir_fd) == name:
        return False
    try:
        gen_fd = os.open(name, OPEN_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if os.fstat(gen_fd).st_uid not in trusted_uids():
            return False
        for entry in os.listdir(gen_fd):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(entry, dir_fd=gen_fd)
    except OSError:
        return False
    finally:
        os.close(gen_fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _sweep_generations(dir_fd: int, current: str | None, spare: str | None, shown: str) -> None:
    """Remove what a crash left behind: generation directories other than the current one and the spare
    (written but never published, or published over but not yet removed) and a `..data_tmp` that leads to
    no spare, when root or wlidd's user owns them; another user's are left alone and counted. One log
    line with the counts when there were any."""
    keep = {name for name in (current, spare) if name is not None} | ({DATA_TMP} if spare else set())
    try:
        with os.scandir(dir_fd) as entries:
            stale = [
                e.name for e in entries if e.name not in keep and (e.name == DATA_TMP or _GENERATION.fullmatch(e.name))
            ]
    except OSError as exc:
        log.warning("stale generations not looked for", dir=shown, error=_reason(exc))
        return
    removed = foreign = failed = 0
    for name in stale:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError:
            failed += 1
            continue
        if st.st_uid not in trusted_uids():
            foreign += 1
        elif stat.S_ISDIR(st.st_mode):
            if _remove_generation(dir_fd, name):
                removed += 1
            else:
                failed += 1
        else:
            try:
                os.unlink(name, dir_fd=dir_fd)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                failed += 1
    if removed or failed:
        log.info("stale generations swept", dir=shown, removed=removed, left_to_other_users=foreign, failed=failed)
    elif foreign:  # nothing to do but another user's names: said once a minute, not at every check
        log.limited("info", "stale generations of other users left alone", key={"dir": shown}, count=foreign)


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


@dataclass(frozen=True)
class SinkProblem:
    """A sink whose last write failed: `kind` "identity" or "token", `owner` the identity's or token
    source's name, `place` the sink's dir or path, `error` as logged (no secret: strerror and a path, or
    an unknown user's or group's name)."""

    kind: str
    owner: str
    place: str
    error: str


class FailingSinks:
    """The sinks whose last write failed, one entry per place, gone once that sink is written or found
    current, or no longer configured (`keep_only`). Bounded: at most MAX_FAILING_SINKS entries (sinks come
    from the config, not from callers). Read by `/v1/status`, the metric `wlidd_sink_write_failing` and
    `wlidd run --oneshot`."""

    MAX_FAILING_SINKS = 1024

    def __init__(self) -> None:
        self._by_place: dict[str, SinkProblem] = {}
        self._lock = threading.Lock()

    def failed(self, problem: SinkProblem) -> None:
        with self._lock:
            self._by_place.pop(problem.place, None)
            if len(self._by_place) >= self.MAX_FAILING_SINKS:
                self._by_place.pop(next(iter(self._by_place)))
            self._by_place[problem.place] = problem

    def solved(self, place: str) -> None:
        with self._lock:
            self._by_place.pop(place, None)

    def keep_only(self, kind: str, owner: str, places: Sequence[str]) -> None:
        """Forget the owner's problems at places it no longer has (a reload removed or moved a sink)."""
        with self._lock:
            for place, problem in list(self._by_place.items()):
                if problem.kind == kind and problem.owner == owner and place not in places:
                    del self._by_place[place]

    def now(self) -> list[SinkProblem]:
        """Every failing sink, by kind, owner and place."""
        with self._lock:
            return sorted(self._by_place.values(), key=lambda p: (p.kind, p.owner, p.place))


_failing = FailingSinks()


def failing_sinks() -> FailingSinks:
    """The process's record of failing sinks (sinks are written by module functions shared by every daemon
    of the process, as the repeat limiter of the logs)."""
    return _failing


async def follow_credentials(watcher: CredentialWatcher) -> None:
    """Bring the identity's sinks (as configured now: a reload may change them) up to date on every new state,
    the first one included (start)."""
    async for _ in watcher.changes():
        await ensure_credentials(watcher)


async def ensure_credentials(watcher: CredentialWatcher) -> tuple[CredentialSinkConfig, ...]:
    """Bring the identity's sinks, as configured now, up to date with its current state (nothing before the
    first one): each sink is checked (does `..data` lead to a generation holding what would be written
    now; are the stable links there) and only a stale or missing one is (re)written, its on_change and
    signal run. Called on every new state, on SIGHUP, after a config change and periodically (a wiped
    tmpfs, a deleted file). Serialized per identity; the state is read once the lock is held, so the
    newest one is what stays on disk. The sinks written; failures are logged, never raised."""
    async with _lock(_credential_locks, watcher.name):
        _failing.keep_only("identity", watcher.name, [str(sink.dir) for sink in watcher.source.config.sinks])
        state = watcher.current
        if state is None or not watcher.source.config.sinks:
            return ()
        return await publish_credentials(watcher.source.config.sinks, state)
