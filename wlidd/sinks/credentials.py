"""Credential sinks: an identity's generation (publish_generation, with its layout's files) and a
certificate_config.json outside its directory, brought up to date on every new state, SIGHUP, config change
and periodically (follow_credentials, ensure_credentials); then the on_change commands and signals of the
sinks written, concurrently. Publications of one identity are serialized.
"""

from __future__ import annotations

import anyio

from wlidd.config import CredentialSinkConfig
from wlidd.errors import InvalidValue
from wlidd.logs import get_logger
from wlidd.safedir import SinkRefused
from wlidd.sinks.access import owner_ids, resolve_readers
from wlidd.sinks.commands import run_command
from wlidd.sinks.files import file_is, write_atomic
from wlidd.sinks.generations import publish_generation
from wlidd.sinks.layouts import Material, certificate_config_document, config_name_inside, credential_files
from wlidd.sinks.locks import publication_lock
from wlidd.sinks.problems import SinkProblem, failing_sinks, reason
from wlidd.sinks.signals import signal_after_rotation
from wlidd.watch import CredentialWatcher, IdentityState

log = get_logger("wlidd.sinks")
_failing = failing_sinks()  # the process's record of failing sinks (wlidd.sinks.problems)

_credential_locks: dict[str, anyio.Lock] = {}


def write_credentials(sink: CredentialSinkConfig, state: IdentityState) -> bool:
    """Bring one sink up to date with `state`: its generation (publish_generation) and, for a
    certificate_config.json outside the sink's directory, that file. True when anything was (re)written,
    False when the sink already held exactly this (names, contents, modes, owner, ACLs, stable links).
    Raises OSError (SinkRefused) as publish_generation, KeyError for an owner, group or reader this host
    does not know, InvalidValue for a file name the layout cannot have."""
    uid, gid = owner_ids(sink)
    readers = resolve_readers(sink.readers)
    written = publish_generation(sink.dir, credential_files(sink, Material.of(state)), uid, gid, readers=readers)
    if sink.layout == "files" and sink.certificate_config is not None and config_name_inside(sink) is None:
        data = certificate_config_document(sink.dir)
        path = sink.certificate_config
        if not file_is(path, data, sink.mode, uid, gid, readers):
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
        except (OSError, KeyError, ValueError, InvalidValue) as exc:
            log.error("credential sink write failed", identity=state.name, dir=str(sink.dir), error=reason(exc))
            _failing.failed(SinkProblem("identity", state.name, str(sink.dir), reason(exc)))
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
                error=reason(exc),
            )


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
    async with publication_lock(_credential_locks, watcher.name):
        _failing.keep_only("identity", watcher.name, [str(sink.dir) for sink in watcher.source.config.sinks])
        state = watcher.current
        if state is None or not watcher.source.config.sinks:
            return ()
        return await publish_credentials(watcher.source.config.sinks, state)
