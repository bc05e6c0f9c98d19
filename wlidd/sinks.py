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
import structlog

from wlidd.config import SinkConfig
from wlidd.tokens.model import Token

log = structlog.get_logger("wlidd.sinks")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` in one rename; the file never exists with a wider mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
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
            "expire_time": token.expire_time.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        return json.dumps(document).encode() + b"\n"
    return token.value.encode()


async def publish_token(sinks: tuple[SinkConfig, ...], token: Token, now: dt.datetime, source: str) -> None:
    """Write every sink; run its on_change command. Failures are logged, never raised."""
    for sink in sinks:
        try:
            await anyio.to_thread.run_sync(write_atomic, sink.path, render_token(token, sink.format, now), sink.mode)
        except OSError as exc:
            log.error("token sink write failed", source=source, path=str(sink.path), error=exc.strerror)
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
