"""The daemon: watchers, token sources, listeners, signals and systemd in one anyio task group.

Start: every listener's socket bound first (or taken from socket activation), so a socket another
daemon holds fails the start before any sink is written or hook run; then the accept loops (each logs
"listener started" with its address or path), so the daemon answers while it starts: /v1/status says
"starting" and what it waits for, /v1/health 503; then every identity's first load (its sinks brought up
to date), every token source started (one with an identity once that identity's first load was tried),
the required ones obtained — then READY=1 and `task_status.started()`. Until then a request that needs
an identity still loading gets the answer of an absent identity, while a token source needing none
(gce-metadata) is served at once. A stop during the start ends it: listeners close, no READY=1 is sent,
and SIGHUP waits for the start to finish. SIGHUP: RELOADING=1, the config re-read (log level, policy,
sinks and token sources live; an invalid file refused whole), every identity re-read, every sink
brought up to date (wlidd.sinks.credentials.ensure_credentials, wlidd.sinks.tokens.ensure_token: only what is missing or stale is
written), READY=1; the same check runs every reload_interval. SIGTERM/SIGINT: STOPPING=1, listeners
stop accepting, requests in flight get DRAIN_TIMEOUT, exit code 0.

The watchdog tracks liveness, not credential validity: WATCHDOG=1 while the event loop answers in time
and every listener's accept loop runs. A daemon that is merely degraded (nothing provisioned yet, an
upstream down) keeps pinging — a restart would fix nothing and cost the fleet's STS quota — and says so
in /v1/health, STATUS= and the metrics instead.

Where the decisions live: the lifecycle (starting → ready | degraded ⇄ reloading → stopping) and every
READY=1, RELOADING=1, STOPPING=1 and STATUS= it sends are a table in wlidd.lifecycle, which refuses READY=1
after STOPPING=1; what /v1/health, /v1/status, STATUS=, the watchdog and the metrics report is one
`health(now)` (wlidd.health); what a reload changes is decided section by section in wlidd.config_reload
and published as one Runtime by one assignment (wlidd.runtime); the listeners are one ListenerSet
(wlidd.api.listener_set), the watchers and token sources with their sinks and the start are Services
(wlidd.services). This module wires them.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from wlidd.api.listener_set import ListenerSet
from wlidd.api.listeners import raise_open_files_limit
from wlidd.api.routes import Api
from wlidd.clock import Clock, utc_now
from wlidd.config import Config, IdentityConfig, load_config
from wlidd.config_reload import config_changes
from wlidd.errors import ConfigError
from wlidd.health import Health, health
from wlidd.lifecycle import Lifecycle, State
from wlidd.logs import configure_logging, get_logger, repeat_limiter
from wlidd.metrics import Metrics
from wlidd.policy import Policy
from wlidd.runtime import Runtime, RuntimeRef, RuntimeView
from wlidd.services import Services
from wlidd.status import FailingSink
from wlidd.status_report import sink_problems
from wlidd.svid.load.source import CredentialSource
from wlidd.systemd import Notifier, listen_fds, watchdog_period
from wlidd.watch import CredentialWatcher

# Imported only where a configuration turns them on (tests/test_lazy_imports.py): the token machinery
# (wlidd.tokens: httpx, PyJWT, the flows) in wlidd.services, the metadata listener with it, and the Workload
# API (grpclib, h2, protobuf) in wlidd.api.listener_set. An identity with the Unix socket starts ~0.1 s sooner
# and ~5 MB smaller without them.
if TYPE_CHECKING:
    from wlidd.tokens.manager import TokenSource
    from wlidd.workload_api.server import WorkloadApi

log = get_logger("wlidd.daemon")

DRAIN_TIMEOUT = 10.0  # seconds in-flight requests get to finish on stop
STATUS_INTERVAL = 10.0  # how often the STATUS= line is recomputed


class Daemon(RuntimeView):
    """Everything one `wlidd run` process serves; `config`, `policy` and `tokens` are the current runtime's."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Clock = utc_now,
        config_path: Path | None = None,
        sink_check_interval: float | None = None,
    ) -> None:
        """`sink_check_interval`: seconds between the checks that every sink is up to date (None: each
        identity's reload_interval, and wlidd.services.TOKEN_SINK_INTERVAL for token sinks)."""
        self.config_path = config_path
        self.clock = clock
        self.metrics = Metrics()
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._activation_environ: MutableMapping[str, str] = os.environ if environ is None else dict(environ)
        self.watchers: dict[str, CredentialWatcher] = {
            name: CredentialWatcher(name, self._source(name, cfg), clock=clock, metrics=self.metrics)
            for name, cfg in config.identities.items()
        }
        required = [name for name, cfg in config.tokens.items() if cfg.require_at_start]
        self.services = Services(
            self.watchers, required, clock=clock, metrics=self.metrics, sink_check_interval=sink_check_interval
        )
        tokens = {name: self.services.new_source(name, cfg) for name, cfg in config.tokens.items()}
        self.started_at = clock()
        # What a reload changes (the config, its policy, the token sources): one value, one assignment.
        self.runtime = RuntimeRef(Runtime.of(config, Policy.from_config(config.policy), tokens))
        self.api = Api(
            self.watchers, self.metrics, clock, self.started_at, self.runtime, self.health, held_back=self.held_back
        )
        self.listeners = ListenerSet(config.listeners, self.api)
        self.api.listener_status, self.api.workload_status = self.listeners.status, self.listeners.workload_status
        self.metrics.failing_sinks.source = lambda: [(p.kind, p.owner) for p in self.sink_problems().values()]
        self.notifier = Notifier(self._environ)
        # starting → ready | degraded ⇄ reloading → stopping: the one sender of READY=1, RELOADING=1,
        # STOPPING=1 and STATUS= (wlidd.lifecycle).
        self.lifecycle = Lifecycle(self.notifier.send)
        self.drain_timeout = DRAIN_TIMEOUT
        self._stopping = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._reload_pending = False  # a SIGHUP came while starting: it runs once READY=1 was sent
        self._reload_lock = anyio.Lock()  # one reload at a time: each is one RELOADING=1 … READY=1

    def _source(self, name: str, config: IdentityConfig) -> CredentialSource:
        """Where the identity `name` of `config` reads its files (its environment: the daemon's)."""
        return CredentialSource(name, config, dict(self._environ))

    @property
    def socket_path(self) -> Path:
        """The local API's Unix socket."""
        return self.listeners.socket_path

    @property
    def mtls_port(self) -> int | None:
        return self.listeners.mtls_port

    @property
    def metadata_port(self) -> int | None:
        return self.listeners.metadata_port

    @property
    def metrics_port(self) -> int | None:
        return self.listeners.metrics_port

    @property
    def workload_api(self) -> WorkloadApi | None:
        return self.listeners.workload_api

    def stop(self) -> None:
        """Stop gracefully (listeners close, in-flight requests get `drain_timeout`); while starting, the
        start is cancelled first and no READY=1 is sent."""
        self._stopping.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (signal or `stop()`); returns normally on a graceful stop.

        The accept loops run from right after binding (`lifecycle` "starting": see the module docstring).
        READY=1 and `task_status.started()` come only once every identity's first load was tried, required
        tokens obtained and every listener bound; a stop before that sends neither (a caller awaiting
        `tg.start(run)` then gets anyio's "exited without calling started"). STOPPING=1 when stopping;
        listeners stop accepting first, in-flight requests get `drain_timeout` to finish.
        """
        where = {"socket": str(self.socket_path), "pid": os.getpid()}
        log.info("starting", identities=sorted(self.watchers), sources=list(self.tokens), **where)
        activated = listen_fds(self._activation_environ)
        raise_open_files_limit(self.listeners.connection_budget())
        try:
            # Every listening socket first: a second daemon on the same socket fails here, before it has
            # written any sink or run any hook of the daemon that owns the socket.
            await self.listeners.bind(activated)
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                await self.listeners.start(tg)  # answer from now on: /v1/status says "starting"
                tg.start_soon(self._signals)
                if (period := watchdog_period(self._environ)) is not None:
                    tg.start_soon(self._watchdog, period)
                tg.start_soon(self._status_line)
                tg.start_soon(self.services.keep_token_sinks, lambda: self.tokens)
                if await self.services.start(tg, self.tokens, self._stopping):
                    self._ready(tg, task_status)
                await self._stopping.wait()
                await self._stop()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.listeners.close()
                for source in self.tokens.values():
                    await source.flow.aclose()
                for sock in activated.values():
                    sock.close()
            self.notifier.close()
            repeat_limiter().flush(everything=True)
        log.info("stopped")

    def _ready(self, tg: anyio.abc.TaskGroup, task_status: TaskStatus[None]) -> None:
        """The start is over: READY=1, `task_status.started()`, and the reload a SIGHUP asked for meanwhile."""
        invalid = [name for name, w in self.watchers.items() if not w.is_valid(self.clock())]
        log.info("ready", socket=str(self.socket_path), invalid_identities=invalid)
        self._settle()  # READY=1
        self.services.progressed()
        task_status.started()
        if self._reload_pending:
            tg.start_soon(self.reload)

    async def _stop(self) -> None:
        """STOPPING=1; the listeners stop accepting and the requests in flight get `drain_timeout`."""
        log.info("stopping")
        self.lifecycle.move(State.STOPPING, "stopping")
        with anyio.CancelScope(shield=True):
            self.listeners.stop_accepting()
            await self.listeners.drain(self.drain_timeout)
        for watcher in self.watchers.values():
            watcher.close()

    def health(self, now: dt.datetime | None = None) -> Health:
        """The daemon's health now (wlidd.health): what /v1/health, /v1/status, STATUS=, the watchdog and
        the metrics report."""
        return health(
            now or self.clock(),
            self.lifecycle.state,
            self.watchers,
            self.tokens,
            self.listeners.accept_loops,
            loading=self.services.loading,
            awaiting=self.services.awaiting,
        )

    def _settle(self) -> bool:
        """End a start or a reload: READY=1 and the STATUS= line, into ready or degraded as health says.
        False (nothing sent: the lifecycle refuses it) when a stop came first."""
        now = self.health()
        return self.lifecycle.move(now.serving, now.serving_line())

    def held_back(self, source: TokenSource) -> str | None:
        """Why `source` must not be asked for a token yet (wlidd.services.Services.held_back), or None."""
        return self.services.held_back(source, self.lifecycle.state is State.STARTING)

    def summary(self) -> str:
        """The STATUS= line now (wlidd.health.Health.status_line)."""
        return self.health().status_line()

    def sink_problems(self) -> dict[str, FailingSink]:
        """`/v1/status` `sink_problems` (wlidd.status_report.sink_problems) of this daemon's sinks."""
        return sink_problems(self.watchers, self.tokens)

    async def _watchdog(self, period: float) -> None:
        """WATCHDOG=1 every half period while alive: the event loop answered in time and every
        listener's accept loop runs. Credential validity is not liveness (see the module docstring)."""
        warned = False
        while True:
            before = anyio.current_time()
            await anyio.sleep(period)
            lag = anyio.current_time() - before - period
            dead = self.health().liveness_problems
            if lag < period and not dead:
                self.notifier.watchdog()
                if warned:
                    log.info("liveness restored: watchdog pings resumed")
                warned = False
            elif not warned:
                log.error("liveness check failed: watchdog pings withheld", loop_lag=round(lag, 3), problems=dead)
                warned = True

    async def _status_line(self) -> None:
        """STATUS= when the health's line changes (checked every STATUS_INTERVAL seconds, and at once when
        the start moves on), a started daemon moving between ready and degraded with it (Lifecycle.report);
        and the summaries of repeated log lines whose window is over."""
        while True:
            moved = self.services.watch_progress()
            now = self.health()
            self.lifecycle.report(now.serving, now.status_line())
            repeat_limiter().flush()
            with anyio.move_on_after(STATUS_INTERVAL):  # or at once when the start moves on
                await moved.wait()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("signal received, stopping", signal=signal.Signals(signum).name)
                    self.stop()

    async def reload(self) -> None:
        """SIGHUP: re-read the config (applying what can change safely: wlidd.config_reload) and every
        identity's files; a new config that does not validate is refused with its reason and the old one kept.

        RELOADING=1 … READY=1 belong to a started daemon (wlidd.lifecycle): a reload asked for while
        starting runs once READY=1 was sent (the first loads read the files anyway); one asked for while
        stopping is refused by the lifecycle (logged, nothing sent), and a stop during a reload ends it
        without READY=1. Reloads run one at a time.
        """
        if self.lifecycle.state is State.STARTING:
            self._reload_pending = True
            log.info("SIGHUP while starting: the reload runs once the start is over")
            return
        async with self._reload_lock:
            if not self.lifecycle.move(State.RELOADING):
                log.info("SIGHUP while stopping: ignored")
                return
            self._reload_pending = False
            log.info("SIGHUP: reloading")
            await self._reload()
            self._settle()  # READY=1, unless a stop came meanwhile

    async def _reload(self) -> None:
        """The reload's work (see `reload`), between RELOADING=1 and READY=1."""
        if self.config_path is not None:
            try:
                new = load_config(self.config_path, dict(self._environ))
            except ConfigError as exc:
                log.error("reload refused: the new configuration is invalid; the running one stays", detail=exc.message)
                self.lifecycle.status("reload refused: " + exc.message.splitlines()[-1].strip())
            else:
                await self._apply(new)
        for watcher in self.watchers.values():
            watcher.request_reload("sighup")
        if self._task_group is not None:  # every sink, changed or not: a deleted file or dir is made again
            self.services.ensure_sinks(self._task_group, self.tokens)

    async def _apply(self, new: Config) -> None:
        """Apply a re-read config: the live parts now, the rest reported as needing a restart
        (wlidd.config_reload), then published as one Runtime (`runtime.publish`).

        Each part that changed logs one line ("logging reloaded", "policy reloaded", "sinks reloaded",
        "token source (re)started" / "removed", "these changes take effect only after a restart"); a
        reload that changed nothing logs only "config unchanged". The policy is resolved again on every
        reload (a user or group named in it may have been created since) and counts as changed only
        when the resolution differs; names still unknown are logged at warning again (once per reload).
        """
        changes = config_changes(self.config, new)
        if changes.logging:
            configure_logging(new.daemon.log_level, new.daemon.log_format)
            log.info("logging reloaded", log_level=new.daemon.log_level, log_format=new.daemon.log_format)
        policy = await anyio.to_thread.run_sync(Policy.from_config, new.policy)  # NSS lookups may block
        policy_changed = policy != self.policy
        if policy_changed:
            log.info("policy reloaded")
        for name in changes.identity_sinks:
            self.watchers[name].source = self._source(name, changes.running.identities[name])
            log.info("sinks reloaded", section=f"identities.{name}")  # reload() brings them up to date now
        tokens = dict(self.tokens)
        for name, change in changes.tokens.items():
            wanted = changes.running.tokens.get(name)
            if change == "sinks" and wanted is not None:
                tokens[name].config = wanted
                log.info("sinks reloaded", section=f"tokens.{name}")  # reload() brings them up to date now
                continue
            assert self._task_group is not None, "a reload runs in a started daemon"
            source = await self.services.replace_source(self._task_group, tokens.get(name), name, wanted)
            if source is None:
                tokens.pop(name, None)
            else:
                tokens[name] = source
        if changes.restart:
            log.warning("these changes take effect only after a restart", sections=list(changes.restart))
        elif not changes.live and not policy_changed:
            log.info("config unchanged")
        running = Runtime.of(changes.running, policy if policy_changed else self.policy, tokens)
        # One assignment for every reader of the reference (the local API); the servers that keep their own
        # copy (the metadata listener, the Workload API) are told by the listeners.
        self.listeners.publish(running, self.runtime.publish(running))
