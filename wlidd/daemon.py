"""The daemon: watchers, token sources, listeners, signals and systemd in one anyio task group.

Start: every identity's first load, every token source started (required ones obtained), every
listener bound (or taken from socket activation) — then READY=1 and `task_status.started()`.
SIGHUP: RELOADING=1, the config re-read (log level, policy, sinks and token sources live; an invalid
file refused whole), every identity re-read, READY=1. SIGTERM/SIGINT: STOPPING=1, listeners stop
accepting, requests in flight get DRAIN_TIMEOUT, exit code 0. The watchdog is fed only while healthy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketListener, TaskStatus

from wlidd.api.authz import Policy, parse_matcher
from wlidd.api.listeners import ListenerError, bind_unix_socket
from wlidd.api.metadata import MetadataApi
from wlidd.api.mtls import MtlsGate, QuietTLSListener
from wlidd.api.routes import Api
from wlidd.api.server import Handler, HttpServer, Request, Response, ServerLimits
from wlidd.config import (
    Config,
    MetadataListenerConfig,
    MtlsListenerConfig,
    TokenConfig,
    UnixListenerConfig,
    load_config,
    split_address,
)
from wlidd.errors import ConfigError
from wlidd.logs import configure_logging, get_logger
from wlidd.metrics import Metrics
from wlidd.sinks import follow_credentials
from wlidd.svid.load import Clock, CredentialSource, utc_now
from wlidd.systemd import Notifier, listen_fds, watchdog_period
from wlidd.tlsctx import HotServerContext
from wlidd.tokens.flows import Flow
from wlidd.tokens.manager import TokenSource
from wlidd.watch import CredentialWatcher

if TYPE_CHECKING:  # imported only with a Workload API listener: grpclib, h2 and protobuf cost ~0.1 s and 4 MB
    from wlidd.workload_api.server import WorkloadApi

log = get_logger("wlidd.daemon")

DRAIN_TIMEOUT = 10.0  # seconds in-flight requests get to finish on stop
STATUS_INTERVAL = 10.0  # how often the STATUS= line is recomputed


class Daemon:
    """Everything one `wlidd run` process serves."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Clock = utc_now,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.metrics = Metrics()
        env = dict(os.environ if environ is None else environ)
        self.watchers: dict[str, CredentialWatcher] = {
            name: CredentialWatcher(name, CredentialSource(name, cfg, env), clock=clock, metrics=self.metrics)
            for name, cfg in config.identities.items()
        }
        self._source_scopes: dict[str, anyio.CancelScope] = {}
        self.tokens: dict[str, TokenSource] = {name: self._new_source(name, cfg) for name, cfg in config.tokens.items()}
        self.started_at = clock()
        self.policy = Policy.from_config(config.policy)
        self.api = Api(self.watchers, self.metrics, clock, self.started_at, self.tokens, self.policy)
        unix = config.listeners.unix
        self.unix_server = self._http_server(self.api, "unix", unix)
        self.socket_path: Path = unix.path
        self.mtls_server: HttpServer | None = None
        self.mtls_port: int | None = None
        mtls = config.listeners.mtls
        if mtls is not None:
            gate = MtlsGate(self.api, self.watchers[mtls.identity], tuple(parse_matcher(p) for p in mtls.allow))
            self.mtls_server = self._http_server(gate, "mtls", mtls)
        self.metadata_server: HttpServer | None = None
        self.metadata_port: int | None = None
        metadata = config.listeners.metadata
        if metadata is not None:
            api = MetadataApi(metadata, self.tokens[metadata.token], self.policy, clock)
            self.metadata_server = self._http_server(api, "metadata", metadata)
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._stopping = anyio.Event()
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._activation_environ: MutableMapping[str, str] = os.environ if environ is None else dict(environ)
        self.notifier = Notifier(self._environ)
        self.drain_timeout = DRAIN_TIMEOUT
        self._unix_activated = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._grpc_server: Any = None
        self.workload_api: WorkloadApi | None = None

    def _http_server(
        self, handler: Handler, name: str, limits: UnixListenerConfig | MtlsListenerConfig | MetadataListenerConfig
    ) -> HttpServer:
        return HttpServer(
            handler,
            name=name,
            limits=ServerLimits(
                request_timeout=limits.request_timeout,
                idle_timeout=limits.idle_timeout,
                max_connections=limits.max_connections,
            ),
            on_response=self._count_response,
        )

    def _count_response(self, request: Request, response: Response) -> None:
        if response.status == 404:
            route = "unknown"
        elif request.path in ("/v1/status", "/v1/health", "/metrics", "/get_wif_token"):
            route = request.path
        else:
            route = "/" + "/".join(request.path.split("/")[1:3])
        key = (request.listener, route, response.status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.metrics.http_requests.labels(
                request.listener, route, str(response.status)
            )
        counter.inc()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (signal or `stop()`); returns normally on a graceful stop.

        READY=1 is sent only once credentials were loaded, required tokens obtained and every listener
        bound; STOPPING=1 when stopping; listeners stop accepting first, in-flight requests get
        `drain_timeout` to finish.
        """
        log.info(
            "starting",
            identities=sorted(self.watchers),
            sources=list(self.tokens),
            socket=str(self.socket_path),
            pid=os.getpid(),
        )
        activated = listen_fds(self._activation_environ)
        listeners: list[anyio.abc.Listener[Any]] = []
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                for watcher in self.watchers.values():
                    await tg.start(watcher.run)
                    tg.start_soon(follow_credentials, watcher)
                for source in list(self.tokens.values()):
                    await tg.start(self._run_source, source)
                for source in self.tokens.values():
                    if source.config.require_at_start:
                        self.notifier.status(f"waiting for token {source.name!r}")
                        await source.wait_until_servable(source.config.require_timeout)
                await self._start_listeners(tg, activated, listeners)
                tg.start_soon(self._signals)
                if (period := watchdog_period(self._environ)) is not None:
                    tg.start_soon(self._watchdog, period)
                tg.start_soon(self._status_line)
                invalid = [name for name, w in self.watchers.items() if not w.is_valid(self.clock())]
                log.info("ready", socket=str(self.socket_path), invalid_identities=invalid)
                self.notifier.ready(self.summary())
                task_status.started()
                await self._stopping.wait()
                log.info("stopping")
                self.notifier.stopping()
                with anyio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()  # stop accepting
                    with anyio.move_on_after(self.drain_timeout):
                        for server in self._servers():
                            await server.drain()
                for watcher in self.watchers.values():
                    watcher.close()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
                if self._grpc_server is not None:
                    self._grpc_server.close()
                    with anyio.move_on_after(2):
                        await self._grpc_server.wait_closed()
                    workload = self.config.listeners.workload_api
                    if workload is not None:
                        with contextlib.suppress(OSError):
                            workload.path.unlink()
                for source in self.tokens.values():
                    await source.flow.aclose()
                for sock in activated.values():
                    sock.close()
            self.notifier.close()
        if not self._unix_activated:
            with contextlib.suppress(OSError):
                if self.socket_path.is_socket():
                    self.socket_path.unlink()
        log.info("stopped")

    def _servers(self) -> list[HttpServer]:
        return [s for s in (self.unix_server, self.mtls_server, self.metadata_server) if s is not None]

    async def _tcp(self, name: str, address: str, activated: dict[str, socket.socket]) -> anyio.abc.Listener[Any]:
        sock = activated.pop(name, None)
        if sock is not None:
            sock.setblocking(False)
            return await SocketListener.from_socket(sock)
        host, port = split_address(address)
        try:
            return await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ListenerError(f"listeners.{name}: cannot listen on {host}:{port}: {exc.strerror}") from None

    async def _start_listeners(
        self, tg: anyio.abc.TaskGroup, activated: dict[str, socket.socket], listeners: list[anyio.abc.Listener[Any]]
    ) -> None:
        unix = self.config.listeners.unix
        inherited = activated.pop("unix", None)
        if inherited is None:
            # A lone socket from a unit without FileDescriptorName= arrives as "unknown" or the unit's name.
            for name in ("wlidd.socket", "unknown"):
                if name in activated and activated[name].family == socket.AF_UNIX:
                    inherited = activated.pop(name)
                    break
        if inherited is not None:
            self._unix_activated = True
            inherited.setblocking(False)
            log.info("using the socket-activated Unix socket", fd=inherited.fileno())
            sock = inherited
        else:
            sock = bind_unix_socket(self.socket_path, unix.mode, unix.group, owner=unix.owner)
        listener = await SocketListener.from_socket(sock)
        listeners.append(listener)
        tg.start_soon(self._serve, self.unix_server, listener)
        mtls = self.config.listeners.mtls
        if self.mtls_server is not None and mtls is not None:
            tcp = await self._tcp("mtls", mtls.address, activated)
            listeners.append(tcp)
            self.mtls_port = tcp.extra(anyio.abc.SocketAttribute.local_port)
            hot = HotServerContext(self.watchers[mtls.identity].current_tls)
            tls = QuietTLSListener(tcp, hot.context, standard_compatible=False, handshake_timeout=mtls.request_timeout)
            tg.start_soon(self._serve, self.mtls_server, tls)
        metadata = self.config.listeners.metadata
        if self.metadata_server is not None and metadata is not None:
            tcp = await self._tcp("metadata", metadata.address, activated)
            listeners.append(tcp)
            self.metadata_port = tcp.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(self._serve, self.metadata_server, tcp)
        workload = self.config.listeners.workload_api
        if workload is not None:
            from grpclib.server import Server

            inherited_workload = activated.pop("workload_api", None)
            sock = inherited_workload or bind_unix_socket(
                workload.path, workload.mode, workload.group, owner=workload.owner
            )
            from wlidd.workload_api.server import WorkloadApi

            self.workload_api = WorkloadApi(self.watchers, self.policy, self.clock, self.metrics)
            self.api.extra_status["workload_api"] = self.workload_api.status
            self._grpc_server = Server([self.workload_api])
            await self._grpc_server.start(sock=sock)
            log.info("SPIFFE Workload API listening", path=str(workload.path))
        for name in activated:
            log.warning("a socket-activated socket matches no configured listener; ignored", name=name)

    def summary(self) -> str:
        """One line for systemctl status: how many identities and tokens are valid, and what is not."""
        now = self.clock()
        bad = [f"identity {n}" for n, w in self.watchers.items() if not w.is_valid(now)]
        bad += [f"token {n}" for n, t in self.tokens.items() if t.servable(now) is None and not t.config.on_demand]
        head = f"{len(self.watchers)} identities, {len(self.tokens)} tokens"
        return f"serving {head}" if not bad else f"degraded ({head}): not valid: {', '.join(bad)}"

    def healthy(self) -> bool:
        """Every required identity valid and every required token servable, now."""
        now = self.clock()
        return all(w.is_valid(now) for w in self.watchers.values() if w.source.config.required) and all(
            t.servable(now) is not None for t in self.tokens.values() if t.config.require_at_start
        )

    async def _watchdog(self, period: float) -> None:
        """WATCHDOG=1 every half period, only while healthy: the loop answered in time and credentials are valid."""
        warned = False
        while True:
            before = anyio.current_time()
            await anyio.sleep(period)
            lag = anyio.current_time() - before - period
            if lag < period and self.healthy():
                self.notifier.watchdog()
                warned = False
            elif not warned:
                log.warning(
                    "health check failed: watchdog pings withheld", loop_lag=round(lag, 3), status=self.summary()
                )
                warned = True

    async def _status_line(self) -> None:
        last = ""
        while True:
            line = self.summary()
            if line != last:
                self.notifier.status(line)
                last = line
            await anyio.sleep(STATUS_INTERVAL)

    @staticmethod
    async def _serve(server: HttpServer, listener: anyio.abc.Listener[Any]) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            await server.serve(listener)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("signal received, stopping", signal=signal.Signals(signum).name)
                    self.stop()

    async def reload(self) -> None:
        """SIGHUP: re-read the config (applying what can change safely) and every identity's files.

        A new config that does not validate is refused with its reason and the old one kept.
        Safe to change live: log level and format, [policy], sinks of identities and tokens. Anything
        else is reported as needing a restart.
        """
        self.notifier.reloading()
        log.info("SIGHUP: reloading")
        if self.config_path is not None:
            try:
                new = load_config(self.config_path, dict(self._environ))
            except ConfigError as exc:
                log.error("reload refused: the new configuration is invalid; the running one stays", detail=exc.message)
                self.notifier.status("reload refused: " + exc.message.splitlines()[-1].strip())
                new = None
            if new is not None:
                await self._apply(new)
        for watcher in self.watchers.values():
            watcher.request_reload("sighup")
        self.notifier.ready(self.summary())

    async def _apply(self, new: Config) -> None:
        old = self.config
        restart: list[str] = []
        if new.daemon != old.daemon:
            configure_logging(new.daemon.log_level, new.daemon.log_format)
            if new.daemon.runtime_dir != old.daemon.runtime_dir:
                restart.append("daemon.runtime_dir")
        if new.policy != old.policy:
            self.policy = Policy.from_config(new.policy)
            self.api.policy = self.policy
            if self.metadata_server is not None and isinstance(self.metadata_server.handler, MetadataApi):
                self.metadata_server.handler.policy = self.policy
            if self.workload_api is not None:
                self.workload_api.policy = self.policy
            log.info("policy reloaded")
        keep_ids = dict(old.identities)
        for name in sorted(set(old.identities) | set(new.identities)):
            before, after = old.identities.get(name), new.identities.get(name)
            if before is None or after is None:
                restart.append(f"identities.{name} (added or removed)")
            elif before.model_dump(exclude={"sinks"}) != after.model_dump(exclude={"sinks"}):
                restart.append(f"identities.{name}")
            elif before.sinks != after.sinks:
                self.watchers[name].source = CredentialSource(name, after, dict(self._environ))
                keep_ids[name] = after
                log.info("sinks reloaded", section=f"identities.{name}")
        keep_tokens = dict(old.tokens)
        pinned = old.listeners.metadata.token if old.listeners.metadata is not None else None
        for name in list(dict.fromkeys([*old.tokens, *new.tokens])):
            was, wanted = old.tokens.get(name), new.tokens.get(name)
            if was == wanted:
                continue
            if wanted is not None and wanted.identity is not None and wanted.identity not in self.watchers:
                restart.append(f"tokens.{name} (its identity is not running)")
            elif name == pinned and (wanted is None or was is None or was.flow != wanted.flow):
                restart.append(f"tokens.{name} (served by the metadata listener)")
            elif (
                was is not None
                and wanted is not None
                and was.model_dump(exclude={"sinks"}) == wanted.model_dump(exclude={"sinks"})
            ):
                self.tokens[name].config = wanted
                keep_tokens[name] = wanted
                log.info("sinks reloaded", section=f"tokens.{name}")
            else:
                await self._replace_source(name, wanted)
                if wanted is None:
                    keep_tokens.pop(name, None)
                else:
                    keep_tokens[name] = wanted
        if new.listeners != old.listeners:
            restart.append("listeners")
        if restart:
            log.warning("these changes take effect only after a restart", sections=restart)
        # What runs now: the new live parts, and the old version of everything that needs a restart.
        self.config = old.model_copy(
            update={"daemon": new.daemon, "policy": new.policy, "identities": keep_ids, "tokens": keep_tokens}
        )

    def _new_source(self, name: str, token_config: TokenConfig) -> TokenSource:
        watcher = self.watchers.get(token_config.identity) if token_config.identity else None
        current = (lambda w: lambda: w.current)(watcher) if watcher is not None else None
        return TokenSource(
            name,
            token_config,
            Flow(name, token_config, current),
            watcher=watcher,
            clock=self.clock,
            metrics=self.metrics,
        )

    async def _run_source(
        self, source: TokenSource, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            self._source_scopes[source.name] = scope
            await source.run(task_status=task_status)

    async def _replace_source(self, name: str, token_config: TokenConfig | None) -> None:
        """Stop a token source (if running) and start its new version (if any), while serving goes on."""
        old = self.tokens.get(name)
        if old is not None:
            self._source_scopes.pop(name).cancel()
            await old.flow.aclose()
        if token_config is None:
            self.tokens.pop(name, None)
            log.info("token source removed", source=name)
            return
        source = self._new_source(name, token_config)
        assert self._task_group is not None
        await self._task_group.start(self._run_source, source)
        self.tokens[name] = source
        if (
            self.metadata_server is not None
            and isinstance(self.metadata_server.handler, MetadataApi)
            and self.metadata_server.handler.source.name == name
        ):
            self.metadata_server.handler.source = source
        log.info("token source (re)started", source=name, flow=token_config.flow)
