"""Token sinks: a token source's files, replaced by one rename each (write_atomic) with every token it
publishes (follow_token), and brought up to date on start, SIGHUP, a config change and periodically
(ensure_token); then their on_change commands, concurrently. Publications of one source are serialized.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import operator
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import anyio

from wlidd.clock import iso_z
from wlidd.config import SinkConfig, TokenConfig
from wlidd.logs import get_logger
from wlidd.sinks.access import Readers, owner_ids, resolve_readers
from wlidd.sinks.commands import run_command
from wlidd.sinks.files import file_is, write_atomic
from wlidd.sinks.locks import publication_lock
from wlidd.sinks.problems import SinkProblem, failing_sinks, reason
from wlidd.tokens.model import Token

log = get_logger("wlidd.sinks")
_failing = failing_sinks()  # the process's record of failing sinks (wlidd.sinks.problems)

_token_locks: dict[str, anyio.Lock] = {}


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
    async with publication_lock(_token_locks, source):
        await _publish_token(sinks, token, now, source)


async def follow_token(source: TokenPublisher, clock: Callable[[], dt.datetime]) -> None:
    """Write a token source's sinks (as configured now: a reload may change them) with every token it
    publishes (`source.changes()`: the latest one first, at start), then run the on_change of those written,
    as `publish_token`. The daemon runs one per source, so the caller that asked for a token has it while its
    files are written and its hooks run. Serialized with the source's other publications (ensure_token); a
    token superseded by the time the lock is held is skipped, as the next turn writes the newer one, so the
    newest token is what stays on disk. Failures are logged, never raised; runs until cancelled."""
    async for token in source.changes():
        async with publication_lock(_token_locks, source.name):
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
    async with publication_lock(_token_locks, source.name):
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
            uid, gid = owner_ids(sink)
            readers = resolve_readers(sink.readers)
            data = render_token(token, sink.format, now)
            if only_stale and await anyio.to_thread.run_sync(_token_file_is, sink, data, uid, gid, readers):
                _failing.solved(str(sink.path))
                continue
            write = functools.partial(write_atomic, sink.path, data, sink.mode, uid, gid, readers=readers)
            await anyio.to_thread.run_sync(write)
        except (OSError, KeyError) as exc:  # KeyError: an owner, group or reader that does not exist
            log.error("token sink write failed", source=source, path=str(sink.path), error=reason(exc))
            _failing.failed(SinkProblem("token", source, str(sink.path), reason(exc)))
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
    return file_is(sink.path, data, sink.mode, uid, gid, readers, operator.eq)


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
