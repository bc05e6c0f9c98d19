"""What the daemon runs besides its listeners: each identity's watcher and each token source, their sinks
following what they publish, and the start that brings them up.

The start (`Services.start`, between the accept loops and READY=1): every identity's first load at once,
each then followed by its sinks (wlidd.sinks.credentials); every token source started, its sinks
following its tokens (wlidd.sinks.tokens) — one without an identity at once, one with an identity once
that identity's first load was tried (its first fetch needs the SVID) — and the `require_at_start` ones
awaited (WlidError after their require_timeout). While it runs, `loading` and `awaiting` say what it
waits for (wlidd.health: /v1/status, STATUS=), and `held_back` keeps a token request from asking an
upstream with an identity still loading. Every `sink_check_interval` each sink is brought up to date
(a deleted file or a wiped directory is written again; one that is current is only checked).
A reload replaces a token source here (`replace_source`) while serving goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from wlidd.clock import Clock
from wlidd.config import TokenConfig
from wlidd.errors import WlidError
from wlidd.logs import get_logger
from wlidd.metrics import Metrics
from wlidd.sinks.credentials import ensure_credentials, follow_credentials
from wlidd.sinks.tokens import ensure_token, follow_token
from wlidd.watch import CredentialWatcher

# The token machinery (wlidd.tokens: httpx, PyJWT, the flows) is imported only where a configuration names
# a token, in `new_source` (tests/test_lazy_imports.py).
if TYPE_CHECKING:
    from wlidd.tokens.manager import TokenSource

log = get_logger("wlidd.services")

TOKEN_SINK_INTERVAL = 600.0  # seconds between checks that every token sink still holds its current token


class Services:
    """The watchers (by identity name) and the token sources the daemon runs, and the start's progress."""

    def __init__(
        self,
        watchers: Mapping[str, CredentialWatcher],
        required: Collection[str],
        *,
        clock: Clock,
        metrics: Metrics,
        sink_check_interval: float | None = None,
    ) -> None:
        """`required`: the `require_at_start` token sources; `sink_check_interval`: seconds between the
        checks that every sink is up to date (None: each identity's reload_interval, and
        TOKEN_SINK_INTERVAL for token sinks)."""
        self.watchers = watchers
        self.clock = clock
        self.metrics = metrics
        self.sink_check_interval = sink_check_interval
        self.loading: set[str] = set(watchers)  # identities whose first load has not ended yet
        self.awaiting: set[str] = set(required)  # required token sources the start has not had yet
        self.progress = anyio.Event()  # set when the start moved on (the STATUS= line is recomputed)
        self._scopes: dict[str, anyio.CancelScope] = {}  # token source name → the scope it runs in

    def progressed(self) -> None:
        """The start moved on (or ended): whoever waits on `progress` looks again."""
        self.progress.set()

    def watch_progress(self) -> anyio.Event:
        """A new `progress` event, set when the start next moves on."""
        self.progress = anyio.Event()
        return self.progress

    def held_back(self, source: TokenSource, starting: bool) -> str | None:
        """Why `source` must not be asked for a token yet: while `starting`, its identity's first load still
        runs (a fetch now would fail and put the source into backoff); None when it may be asked."""
        identity = source.config.identity
        if starting and identity is not None and identity in self.loading:
            return f"identity {identity!r} has no valid SVID loaded yet (wlidd is starting: its first load is running)"
        return None

    def new_source(self, name: str, config: TokenConfig) -> TokenSource:
        """The token source `name` of `config`, its flow reading its identity's current SVID (not started)."""
        from wlidd.tokens.flows import Flow
        from wlidd.tokens.manager import TokenSource

        watcher = self.watchers.get(config.identity) if config.identity else None
        current = (lambda w: lambda: w.current)(watcher) if watcher is not None else None
        return TokenSource(
            name, config, Flow(name, config, current), watcher=watcher, clock=self.clock, metrics=self.metrics
        )

    async def start(self, tg: anyio.abc.TaskGroup, tokens: Mapping[str, TokenSource], stopping: anyio.Event) -> bool:
        """Everything between the accept loops and READY=1, its services started in `tg` (see the module
        docstring); WlidError when a required token is not had in time. False when `stopping` was set first:
        the start is cancelled, and what it started is left to the stop path."""
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as starting:

                    async def cancel_on_stop() -> None:
                        await stopping.wait()
                        scope.cancel()

                    starting.start_soon(cancel_on_stop)
                    async with anyio.create_task_group() as loads:
                        for source in list(tokens.values()):
                            if source.config.identity is None:
                                loads.start_soon(self._start_source, tg, source)
                        for watcher in self.watchers.values():
                            loads.start_soon(self._first_load, tg, watcher, tokens)
                    starting.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # a required token not had: raise it as the sequential start did
            failed = group.subgroup(lambda exc: isinstance(exc, WlidError))
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
            if failed is None:
                raise
            raise failed from None
        return not stopping.is_set()

    async def _first_load(
        self, tg: anyio.abc.TaskGroup, watcher: CredentialWatcher, tokens: Mapping[str, TokenSource]
    ) -> None:
        """One identity's first load (retries included), then its sinks and the token sources that use it."""
        await tg.start(watcher.run)
        self.loading.discard(watcher.name)
        self.progressed()
        tg.start_soon(follow_credentials, watcher)
        tg.start_soon(self._keep_credential_sinks, watcher)
        async with anyio.create_task_group() as sources:
            for source in list(tokens.values()):
                if source.config.identity == watcher.name:
                    sources.start_soon(self._start_source, tg, source)

    async def _start_source(self, tg: anyio.abc.TaskGroup, source: TokenSource) -> None:
        """Start one token source; a required one is waited for (WlidError after its require_timeout)."""
        await tg.start(self.run_source, source)
        if source.config.require_at_start:
            await source.wait_until_servable(source.config.require_timeout)
        self.awaiting.discard(source.name)
        self.progressed()

    async def run_source(
        self, source: TokenSource, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `source` (started once it is; `replace_source` cancels it), its sinks following its tokens."""
        with anyio.CancelScope() as scope:
            self._scopes[source.name] = scope
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow_token, source, self.clock)  # its sinks follow the tokens it publishes
                await source.run(task_status=task_status)

    async def replace_source(
        self, tg: anyio.abc.TaskGroup, old: TokenSource | None, name: str, config: TokenConfig | None
    ) -> TokenSource | None:
        """Stop the token source `old` (if running) and start `name`'s new version in `tg` (if any), while
        serving goes on; the new source (None when removed), for the caller to publish."""
        if old is not None:
            self._scopes.pop(old.name).cancel()
            await old.flow.aclose()
        if config is None:
            log.info("token source removed", source=name)
            return None
        source = self.new_source(name, config)
        source.first_trigger = "config"  # its first fetch is logged as the reload's
        await tg.start(self.run_source, source)
        log.info("token source (re)started", source=name, flow=config.flow)
        return source

    async def _keep_credential_sinks(self, watcher: CredentialWatcher) -> None:
        """Every `sink_check_interval` (default: the identity's reload_interval, as configured now) bring the
        identity's sinks up to date: a deleted file or a wiped sink directory is written again; sinks that
        are current are only checked, and their hooks do not run."""
        while True:
            await anyio.sleep(self.sink_check_interval or watcher.source.config.reload_interval)
            await ensure_credentials(watcher)

    async def keep_token_sinks(self, tokens: Callable[[], Mapping[str, TokenSource]]) -> None:
        """Every `sink_check_interval` (default TOKEN_SINK_INTERVAL) bring the sinks of every token source
        (`tokens()`: as published now) up to date with its current token (a deleted token file is written
        again)."""
        while True:
            await anyio.sleep(self.sink_check_interval or TOKEN_SINK_INTERVAL)
            for source in list(tokens().values()):
                await ensure_token(source, self.clock)

    def ensure_sinks(self, tg: anyio.abc.TaskGroup, tokens: Mapping[str, TokenSource]) -> None:
        """Bring every sink up to date now, in `tg` (a reload: changed or not, a deleted file or directory is
        made again)."""
        for watcher in self.watchers.values():
            tg.start_soon(ensure_credentials, watcher)
        for source in tokens.values():
            tg.start_soon(ensure_token, source, self.clock)
