"""Atomic file outputs: temp file in the same directory, fsync, rename — readers never see half a token.

An optional command runs after each change: argv list (never a shell), with a timeout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import anyio

from wlidd.api.authz import group_id, user_id
from wlidd.config import CredentialSinkConfig, SinkConfig
from wlidd.logs import get_logger
from wlidd.svid.load import iso_z
from wlidd.tokens.model import Token
from wlidd.watch import CredentialWatcher, IdentityState

log = get_logger("wlidd.sinks")


def write_atomic(path: Path, data: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1) -> None:
    """Replace `path` with `data` in one rename; the file never exists with a wider mode or another owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
            data = render_token(token, sink.format, now)
            await anyio.to_thread.run_sync(write_atomic, sink.path, data, sink.mode, uid, gid)
        except (OSError, KeyError) as exc:  # KeyError: an owner or group that does not exist
            log.error("token sink write failed", source=source, path=str(sink.path), error=str(exc))
            continue
        if sink.on_change:
            await run_command(list(sink.on_change), sink.on_change_timeout, source)


async def run_command(argv: list[str], timeout: float, source: str) -> None:
    try:
        with anyio.fail_after(timeout):
            result = await anyio.run_process(argv, check=False)
    except TimeoutError:
        log.error("on_change command timed out", source=source, command=argv[0], timeout=timeout)
        return
    except OSError as exc:
        log.error("on_change command could not start", source=source, command=argv[0], error=exc.strerror)
        return
    if result.returncode != 0:
        log.warning("on_change command failed", source=source, command=argv[0], returncode=result.returncode)


def _ids(sink: CredentialSinkConfig | SinkConfig) -> tuple[int, int]:
    """The sink's owner and group as ids (-1: leave as is); KeyError for a name this host does not know."""
    uid = -1 if sink.owner is None else user_id(sink.owner)
    gid = -1 if sink.group is None else group_id(sink.group)
    if uid is None:
        raise KeyError(f"no user {sink.owner!r}")
    if gid is None:
        raise KeyError(f"no group {sink.group!r}")
    return uid, gid


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
    files = credential_files(sink, state)
    files.sort(key=lambda item: 0 if item[2] == sink.key_mode else 1)
    for path, data, mode in files:
        write_atomic(path, data, mode, uid, gid)


async def publish_credentials(sinks: tuple[CredentialSinkConfig, ...], state: IdentityState) -> None:
    """Write every sink, then run its command and send its signal. Failures are logged, never raised."""
    import signal as signals

    for sink in sinks:
        try:
            await anyio.to_thread.run_sync(write_credentials, sink, state)
        except (OSError, KeyError) as exc:
            log.error("credential sink write failed", identity=state.name, dir=str(sink.dir), error=str(exc))
            continue
        log.info("credential sink written", identity=state.name, dir=str(sink.dir), serial=state.identity.svid.serial)
        if sink.on_change:
            await run_command(list(sink.on_change), sink.on_change_timeout, state.name)
        if sink.signal is not None and sink.pid_file is not None:
            try:
                pid = int(sink.pid_file.read_text().strip())
                os.kill(pid, getattr(signals, sink.signal.upper()))
            except (OSError, ValueError) as exc:
                log.warning(
                    "could not signal after rotation", identity=state.name, pid_file=str(sink.pid_file), error=str(exc)
                )


async def follow_credentials(watcher: CredentialWatcher) -> None:
    """Rewrite the identity's sinks (as configured now: a reload may change them) on every new state."""
    async for state in watcher.changes():
        if watcher.source.config.sinks:
            await publish_credentials(watcher.source.config.sinks, state)
