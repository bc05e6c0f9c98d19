"""The daemon: watchers, token sources, listeners, signals and systemd in one anyio task group.
Long: the wiring of every service, and its start, reload and stop.

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
`health(now)` (wlidd.health); what a reload changes (config, policy, token sources) is one Runtime
published by one assignment (wlidd.runtime). This module wires them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import resource
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from wlidd.api.accept import AcceptLoop, Refusal
from wlidd.api.listeners import bind_unix_socket
from wlidd.api.metrics_routes import MetricsRoutes
from wlidd.api.mtls import MtlsGate, QuietTLSListener
from wlidd.api.peers import CallerKey
from wlidd.api.routes import Api
from wlidd.api.server import (
    TOO_MANY_CONNECTIONS,
    Handler,
    HttpServer,
    Request,
    Response,
    ServerLimits,
    serialize_response,
)
from wlidd.clock import Clock, utc_now
from wlidd.config import (
    Config,
    MetadataListenerConfig,
    MetricsListenerConfig,
    MtlsListenerConfig,
    TokenConfig,
    UnixListenerConfig,
    WorkloadApiListenerConfig,
    load_config,
    split_address,
)
from wlidd.errors import ConfigError, ListenerError, WlidError
from wlidd.health import Health, health
from wlidd.lifecycle import SERVING, Lifecycle, State
from wlidd.logs import configure_logging, get_logger, repeat_limiter
from wlidd.metrics import Metrics
from wlidd.policy import Policy
from wlidd.runtime import Runtime, RuntimeRef
from wlidd.sinks.credentials import ensure_credentials, follow_credentials
from wlidd.sinks.problems import failing_sinks
from wlidd.sinks.tokens import ensure_token, follow_token
from wlidd.svid.load import CredentialSource
from wlidd.svid.spiffeid import parse_matcher
from wlidd.systemd import Notifier, listen_fds, watchdog_period
from wlidd.tlsctx import HotServerContext
from wlidd.watch import CredentialWatcher

# Imported only where a configuration turns them on (tests/test_lazy_imports.py): the token machinery
# (wlidd.tokens: httpx, PyJWT, the flows) in `_new_source`, the metadata listener with it, and the Workload
# API (grpclib, h2, protobuf) in `_start_listeners`. An identity with the Unix socket starts ~0.1 s sooner
# and ~5 MB smaller without them.
if TYPE_CHECKING:
    from wlidd.api.metadata import MetadataApi
    from wlidd.tokens.manager import TokenSource
    from wlidd.workload_api.server import WorkloadApi

log = get_logger("wlidd.daemon")

_HttpLimits = UnixListenerConfig | MtlsListenerConfig | MetadataListenerConfig | MetricsListenerConfig

_UNIX_LISTENERS = frozenset({"unix", "workload_api"})  # the rest listen on TCP

DRAIN_TIMEOUT = 10.0  # seconds in-flight requests get to finish on stop
STATUS_INTERVAL = 10.0  # how often the STATUS= line is recomputed
TOKEN_SINK_INTERVAL = 600.0  # seconds between checks that every token sink still holds its current token


class Daemon:
    """Everything one `wlidd run` process serves."""

    # long: the wiring: every part the daemon runs is made here, in one place
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
        identity's reload_interval, and TOKEN_SINK_INTERVAL for token sinks)."""
        self.sink_check_interval = sink_check_interval
        self.config_path = config_path
        self.clock = clock
        self.metrics = Metrics()
        env = dict(os.environ if environ is None else environ)
        self.watchers: dict[str, CredentialWatcher] = {
            name: CredentialWatcher(name, CredentialSource(name, cfg, env), clock=clock, metrics=self.metrics)
            for name, cfg in config.identities.items()
        }
        self._source_scopes: dict[str, anyio.CancelScope] = {}
        tokens = {name: self._new_source(name, cfg) for name, cfg in config.tokens.items()}
        self.started_at = clock()
        # What a reload changes (the config, its policy, the token sources): one value, one assignment.
        self.runtime = RuntimeRef(Runtime.of(config, Policy.from_config(config.policy), tokens))
        self.api = Api(self.watchers, self.metrics, clock, self.started_at, self.runtime, self.health)
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
        self._metadata_api: MetadataApi | None = None
        metadata = config.listeners.metadata
        if metadata is not None:
            from wlidd.api.metadata import MetadataApi

            api = self._metadata_api = MetadataApi(metadata, self.tokens[metadata.token], self.policy, clock)
            api.held_back = self.held_back
            self.metadata_server = self._http_server(api, "metadata", metadata)
        self.metrics_server: HttpServer | None = None
        self.metrics_port: int | None = None
        if config.listeners.metrics is not None:
            self.metrics_server = self._http_server(MetricsRoutes(self.api), "metrics", config.listeners.metrics)
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._stopping = anyio.Event()
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._activation_environ: MutableMapping[str, str] = os.environ if environ is None else dict(environ)
        self.notifier = Notifier(self._environ)
        # starting → ready | degraded ⇄ reloading → stopping: the one sender of READY=1, RELOADING=1,
        # STOPPING=1 and STATUS= (wlidd.lifecycle).
        self.lifecycle = Lifecycle(self.notifier.send)
        self.drain_timeout = DRAIN_TIMEOUT
        self._task_group: anyio.abc.TaskGroup | None = None
        self._grpc_server: Any = None
        self._bound_paths: list[Path] = []  # Unix sockets bound here: removed on stop, also after a failed start
        self.workload_api: WorkloadApi | None = None
        self.accept_loops: list[AcceptLoop] = []
        self._tcp_listeners: list[anyio.abc.Listener[Any]] = []  # keep anyio's wrappers of our TCP sockets
        self._bound: dict[str, list[socket.socket]] = {}  # listener name → sockets bound, accept loops not yet started
        self.api.extra_status["listeners"] = self.listener_status
        self.api.extra_status["sink_problems"] = self.sink_problems
        self.metrics.failing_sinks.source = lambda: [(p["kind"], p["owner"]) for p in self.sink_problems().values()]
        self.api.held_back = self.held_back
        self._loading: set[str] = set(self.watchers)  # identities whose first load has not ended yet
        self._awaiting: set[str] = {n for n, t in self.tokens.items() if t.config.require_at_start}
        self._progress = anyio.Event()  # set when the start moved on (the STATUS= line is recomputed)
        self._reload_pending = False  # a SIGHUP came while starting: it runs once READY=1 was sent
        self._reload_lock = anyio.Lock()  # one reload at a time: each is one RELOADING=1 … READY=1
        self._addresses: dict[str, str] = {}  # listener name → where it accepts ("127.0.0.1:9464", a path)

    @property
    def config(self) -> Config:
        """The running config (the current runtime's)."""
        return self.runtime.current.config

    @property
    def tokens(self) -> Mapping[str, TokenSource]:
        """The token sources by name (the current runtime's)."""
        return self.runtime.current.tokens

    @property
    def policy(self) -> Policy:
        """The resolved policy (the current runtime's)."""
        return self.runtime.current.policy

    def _http_server(self, handler: Handler, name: str, limits: _HttpLimits) -> HttpServer:
        return HttpServer(
            handler,
            name=name,
            limits=ServerLimits(
                request_timeout=limits.request_timeout,
                idle_timeout=limits.idle_timeout,
                max_connections=limits.max_connections,
                first_byte_timeout=limits.first_byte_timeout,
            ),
            on_response=self._count_response,
        )

    def _count_response(self, request: Request, response: Response, route: str) -> None:
        """Count a response by (listener, route template, status). Labels come from fixed sets only: the
        route is the template of the route that answered ("other" when none matched: wlidd.api.server),
        never the path, so a caller cannot grow the label set (5,000 random paths once made /metrics 167 MB)."""
        key = (request.listener, route, response.status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.metrics.http_requests.labels(
                request.listener, route, str(response.status)
            )
        counter.inc()

    def stop(self) -> None:
        """Stop gracefully (listeners close, in-flight requests get `drain_timeout`); while starting, the
        start is cancelled first and no READY=1 is sent."""
        self._stopping.set()

    # long: the daemon's life in order (bind, start, ready, stop, drain, close), each cleanup beside its step
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (signal or `stop()`); returns normally on a graceful stop.

        The accept loops run from right after binding (`lifecycle` "starting": see the module docstring).
        READY=1 and `task_status.started()` come only once every identity's first load was tried, required
        tokens obtained and every listener bound; a stop before that sends neither (a caller awaiting
        `tg.start(run)` then gets anyio's "exited without calling started"). STOPPING=1 when stopping;
        listeners stop accepting first, in-flight requests get `drain_timeout` to finish.
        """
        log.info(
            "starting",
            identities=sorted(self.watchers),
            sources=list(self.tokens),
            socket=str(self.socket_path),
            pid=os.getpid(),
        )
        activated = listen_fds(self._activation_environ)
        raise_open_files_limit(self._connection_budget())
        try:
            # Every listening socket first: a second daemon on the same socket fails here, before it has
            # written any sink or run any hook of the daemon that owns the socket.
            await self._bind_listeners(activated)
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                await self._start_listeners(tg)  # answer from now on: /v1/status says "starting"
                tg.start_soon(self._signals)
                if (period := watchdog_period(self._environ)) is not None:
                    tg.start_soon(self._watchdog, period)
                tg.start_soon(self._status_line)
                tg.start_soon(self._keep_token_sinks)
                if await self._start(tg):
                    invalid = [name for name, w in self.watchers.items() if not w.is_valid(self.clock())]
                    log.info("ready", socket=str(self.socket_path), invalid_identities=invalid)
                    self._settle()  # READY=1
                    self._progressed()
                    task_status.started()
                    if self._reload_pending:
                        tg.start_soon(self.reload)
                await self._stopping.wait()
                log.info("stopping")
                self.lifecycle.move(State.STOPPING, "stopping")
                with anyio.CancelScope(shield=True):
                    for loop in self.accept_loops:
                        loop.close()  # stop accepting
                    for server in self._servers():
                        server.close()
                    with anyio.move_on_after(self.drain_timeout):
                        for server in self._servers():
                            await server.drain()
                for watcher in self.watchers.values():
                    watcher.close()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for loop in self.accept_loops:
                    loop.close()
                for socks in self._bound.values():  # bound, but the start failed before their accept loops
                    for sock in socks:
                        sock.close()
                for listener in self._tcp_listeners:
                    await listener.aclose()
                for path in self._bound_paths:  # sockets this process bound (never an activated one)
                    with contextlib.suppress(OSError):
                        if path.is_socket():
                            path.unlink()
                for source in self.tokens.values():
                    await source.flow.aclose()
                for sock in activated.values():
                    sock.close()
            self.notifier.close()
            repeat_limiter().flush(everything=True)
        log.info("stopped")

    async def _start(self, tg: anyio.abc.TaskGroup) -> bool:
        """Everything between the accept loops and READY=1: every identity's first load at once (each then
        follows its sinks), every token source started — one without an identity at once, one with an
        identity once that identity's first load was tried (its first fetch needs the SVID) — and the
        required ones obtained (WlidError after their require_timeout). False when a stop came first:
        the start is cancelled, and what it started is left to the stop path."""
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as starting:

                    async def cancel_on_stop() -> None:
                        await self._stopping.wait()
                        scope.cancel()

                    starting.start_soon(cancel_on_stop)
                    async with anyio.create_task_group() as loads:
                        for source in list(self.tokens.values()):
                            if source.config.identity is None:
                                loads.start_soon(self._start_source, tg, source)
                        for watcher in self.watchers.values():
                            loads.start_soon(self._first_load, tg, watcher)
                    starting.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # a required token not had: raise it as the sequential start did
            failed = group.subgroup(lambda exc: isinstance(exc, WlidError))
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
            if failed is None:
                raise
            raise failed from None
        return not self._stopping.is_set()

    async def _first_load(self, tg: anyio.abc.TaskGroup, watcher: CredentialWatcher) -> None:
        """One identity's first load (retries included), then its sinks and the token sources that use it."""
        await tg.start(watcher.run)
        self._loading.discard(watcher.name)
        self._progressed()
        tg.start_soon(follow_credentials, watcher)
        tg.start_soon(self._keep_credential_sinks, watcher)
        async with anyio.create_task_group() as sources:
            for source in list(self.tokens.values()):
                if source.config.identity == watcher.name:
                    sources.start_soon(self._start_source, tg, source)

    async def _start_source(self, tg: anyio.abc.TaskGroup, source: TokenSource) -> None:
        """Start one token source; a required one is waited for (WlidError after its require_timeout)."""
        await tg.start(self._run_source, source)
        if source.config.require_at_start:
            await source.wait_until_servable(source.config.require_timeout)
        self._awaiting.discard(source.name)
        self._progressed()

    def _progressed(self) -> None:
        """The start moved on (or ended): the STATUS= line is recomputed now."""
        self._progress.set()

    def health(self, now: dt.datetime | None = None) -> Health:
        """The daemon's health now (wlidd.health): what /v1/health, /v1/status, STATUS=, the watchdog and
        the metrics report."""
        return health(
            now or self.clock(),
            self.lifecycle.state,
            self.watchers,
            self.tokens,
            self.accept_loops,
            loading=self._loading,
            awaiting=self._awaiting,
        )

    def _settle(self) -> bool:
        """End a start or a reload: READY=1 and the STATUS= line, into ready or degraded as health says.
        False (nothing sent: the lifecycle refuses it) when a stop came first."""
        now = self.health()
        return self.lifecycle.move(now.serving, now.serving_line())

    def held_back(self, source: TokenSource) -> str | None:
        """Why `source` must not be asked for a token yet: its identity's first load still runs (a fetch now
        would fail and put the source into backoff); None when it may be asked."""
        identity = source.config.identity
        if self.lifecycle.state is State.STARTING and identity is not None and identity in self._loading:
            return f"identity {identity!r} has no valid SVID loaded yet (wlidd is starting: its first load is running)"
        return None

    def _servers(self) -> list[HttpServer]:
        servers = (self.unix_server, self.mtls_server, self.metadata_server, self.metrics_server)
        return [s for s in servers if s is not None]

    async def _tcp(self, name: str, address: str, activated: dict[str, socket.socket]) -> list[socket.socket]:
        """The listening TCP socket(s) of a listener: the socket-activated one, or bound here."""
        sock = activated.pop(name, None)
        if sock is not None:
            return [sock]
        host, port = split_address(address)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ListenerError(f"listeners.{name}: cannot listen on {host}:{port}: {exc.strerror}") from None
        self._tcp_listeners.append(listener)
        parts = getattr(listener, "listeners", [listener])
        return [part.extra(anyio.abc.SocketAttribute.raw_socket) for part in parts]

    async def _listen(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        sock: socket.socket,
        server: HttpServer,
        limits: _HttpLimits,
        *,
        tls: ssl.SSLContext | None = None,
        refusal_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Serve `server` on `sock` through an accept loop with the listener's connection caps."""

        async def handle(conn: socket.socket, caller: CallerKey) -> None:
            await server.serve_socket(
                conn,
                caller.uid,
                caller.inode,
                tls=tls,
                on_handshake_error=QuietTLSListener.handle_handshake_error,
                owner=caller,
            )

        def refuse(conn: socket.socket, refusal: Refusal) -> bytes:
            if tls is not None:
                return b""  # no HTTP before a handshake: the peer sees the connection close
            if refusal.reason == "unidentified":
                return serialize_response(
                    Response.error(403, "forbidden", refusal.message, headers=refusal_headers), close=True
                )
            if refusal.reason == "listener_full" and not refusal_headers:
                return TOO_MANY_CONNECTIONS
            code = "too_many_connections" if refusal.reason == "listener_full" else "too_many_connections_for_caller"
            message = "connection limit reached; retry later" if refusal.reason == "listener_full" else refusal.message
            return serialize_response(
                Response.error(503, code, message, headers=(*refusal_headers, ("retry-after", "1"))), close=True
            )

        if not any(existing.name == name for existing in self.accept_loops):  # one sweeper per server
            tg.start_soon(server.run_sweeper)
        await self._accept(tg, name, sock, handle, limits, refuse=refuse, shed=server.shed_idle)

    async def _accept(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        sock: socket.socket,
        handle: Callable[[socket.socket, CallerKey], Awaitable[None]],
        limits: _HttpLimits | WorkloadApiListenerConfig,
        **options: Any,
    ) -> None:
        """Start the accept loop of one listening socket with its listener's connection caps
        (wlidd.api.accept; `options`: AcceptLoop's refuse and shed)."""
        loop = AcceptLoop(
            name,
            sock,
            handle,
            max_connections=limits.max_connections,
            max_per_caller=limits.max_connections_per_caller,
            metrics=self.metrics,
            **options,
        )
        self.accept_loops.append(loop)
        await tg.start(loop.run)

    async def _bind_listeners(self, activated: dict[str, socket.socket]) -> None:
        """Bind every configured listener's socket(s), or take them from socket activation (`activated`,
        emptied of those used), into `self._bound`; their accept loops start later (_start_listeners).
        Raises ListenerError naming the listener when a socket cannot be bound (another daemon holds it)."""
        unix = self.config.listeners.unix
        inherited = activated.pop("unix", None)
        if inherited is None:
            # A lone socket from a unit without FileDescriptorName= arrives as "unknown" or the unit's name.
            for name in ("wlidd.socket", "unknown"):
                if name in activated and activated[name].family == socket.AF_UNIX:
                    inherited = activated.pop(name)
                    break
        if inherited is not None:
            log.info("using the socket-activated Unix socket", fd=inherited.fileno())
            self._bound["unix"] = [inherited]
        else:
            self._bound["unix"] = [bind_unix_socket(self.socket_path, unix.mode, unix.group, owner=unix.owner)]
            self._bound_paths.append(self.socket_path)
        mtls = self.config.listeners.mtls
        if self.mtls_server is not None and mtls is not None:
            self._bound["mtls"] = await self._tcp("mtls", mtls.address, activated)
            self.mtls_port = self._bound["mtls"][0].getsockname()[1]
        metadata = self.config.listeners.metadata
        if self.metadata_server is not None and metadata is not None:
            self._bound["metadata"] = await self._tcp("metadata", metadata.address, activated)
            self.metadata_port = self._bound["metadata"][0].getsockname()[1]
        metrics = self.config.listeners.metrics
        if self.metrics_server is not None and metrics is not None:
            self._bound["metrics"] = await self._tcp("metrics", metrics.address, activated)
            self.metrics_port = self._bound["metrics"][0].getsockname()[1]
            public = [where for sock in self._bound["metrics"] if not _is_loopback(where := socket_address(sock))]
            if public:
                log.warning(
                    "the metrics listener is not on a loopback address: whoever reaches it reads /metrics, "
                    "/v1/health and /v1/live (names, counts, validity and failure reasons; never a key or a token)",
                    address=", ".join(public),
                )
        workload = self.config.listeners.workload_api
        if workload is not None:
            inherited_workload = activated.pop("workload_api", None)
            if inherited_workload is not None:
                self._bound["workload_api"] = [inherited_workload]
            else:
                sock = bind_unix_socket(workload.path, workload.mode, workload.group, owner=workload.owner)
                self._bound_paths.append(workload.path)
                self._bound["workload_api"] = [sock]
        for name in activated:
            log.warning("a socket-activated socket matches no configured listener; ignored", name=name)

    async def _start_listeners(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the accept loops of the sockets _bind_listeners bound."""
        unix = self.config.listeners.unix
        for sock in self._started("unix"):
            await self._listen(tg, "unix", sock, self.unix_server, unix)
        mtls = self.config.listeners.mtls
        if self.mtls_server is not None and mtls is not None:
            hot = HotServerContext(self.watchers[mtls.identity].current_tls)
            for tcp in self._started("mtls"):
                await self._listen(tg, "mtls", tcp, self.mtls_server, mtls, tls=hot.context)
        metadata = self.config.listeners.metadata
        if self.metadata_server is not None and metadata is not None:
            from wlidd.api.metadata_tree import FLAVOR

            for tcp in self._started("metadata"):
                await self._listen(tg, "metadata", tcp, self.metadata_server, metadata, refusal_headers=FLAVOR)
        metrics = self.config.listeners.metrics
        if self.metrics_server is not None and metrics is not None:
            for tcp in self._started("metrics"):
                await self._listen(tg, "metrics", tcp, self.metrics_server, metrics)
        workload = self.config.listeners.workload_api
        if workload is not None:
            from wlidd.workload_api.server import WorkloadApi, build_server, serve_accepted

            self.workload_api = WorkloadApi(self.watchers, self.policy, self.clock, self.metrics)
            self.api.extra_status["workload_api"] = self.workload_api.status
            server = self._grpc_server = build_server(self.workload_api)
            first_byte = workload.first_byte_timeout

            async def handle(conn: socket.socket, caller: CallerKey) -> None:
                with contextlib.suppress(OSError):  # the peer went away before its transport was set up
                    await serve_accepted(server, conn, first_byte_timeout=first_byte)

            for sock in self._started("workload_api"):
                await self._accept(tg, "workload_api", sock, handle, workload)
        for name, where in self._addresses.items():  # one line per listener, once all of them accept
            log.info("listener started", listener=name, **{"path" if name in _UNIX_LISTENERS else "address": where})

    def _started(self, name: str) -> list[socket.socket]:
        """The bound sockets of listener `name`, taken out of `_bound` (their accept loops start now); where
        they accept is kept for the "listener started" line and /v1/status."""
        socks = self._bound.pop(name, [])
        if socks:
            self._addresses[name] = ", ".join(socket_address(sock) for sock in socks)
        return socks

    def summary(self) -> str:
        """The STATUS= line now (wlidd.health.Health.status_line)."""
        return self.health().status_line()

    def sink_problems(self) -> dict[str, Any]:
        """`/v1/status` `sink_problems`: {place: {kind, owner, error}} for this daemon's sinks whose last
        write failed (their files keep the last good content)."""
        owners = {("identity", name) for name in self.watchers} | {("token", name) for name in self.tokens}
        return {
            problem.place: {"kind": problem.kind, "owner": problem.owner, "error": problem.error}
            for problem in failing_sinks().now()
            if (problem.kind, problem.owner) in owners
        }

    def listener_status(self) -> dict[str, Any]:
        """Each listener's accept loop for /v1/status (several sockets of one listener are summed)."""
        document: dict[str, Any] = {}
        for loop in self.accept_loops:
            status = loop.status()
            known = document.get(loop.name)
            if known is None:
                document[loop.name] = {"address": self._addresses.get(loop.name), **status}
            else:
                known["alive"] = known["alive"] and status["alive"]
                for key in ("open", "callers", "accepted", "refused"):
                    known[key] += status[key]
        return document

    def _connection_budget(self) -> int:
        """Descriptors the configured connection caps may hold at once, plus a reserve for files,
        upstream connections and watches."""
        listeners = self.config.listeners
        caps = [listeners.unix.max_connections]
        optional = (listeners.mtls, listeners.metadata, listeners.workload_api, listeners.metrics)
        caps += [cfg.max_connections for cfg in optional if cfg]
        return sum(caps) + 256

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

    async def _keep_credential_sinks(self, watcher: CredentialWatcher) -> None:
        """Every `sink_check_interval` (default: the identity's reload_interval, as configured now) bring the
        identity's sinks up to date: a deleted file or a wiped sink directory is written again; sinks that
        are current are only checked, and their hooks do not run."""
        while True:
            await anyio.sleep(self.sink_check_interval or watcher.source.config.reload_interval)
            await ensure_credentials(watcher)

    async def _keep_token_sinks(self) -> None:
        """Every `sink_check_interval` (default TOKEN_SINK_INTERVAL) bring every token source's sinks up to
        date with its current token (a deleted token file is written again)."""
        while True:
            await anyio.sleep(self.sink_check_interval or TOKEN_SINK_INTERVAL)
            for source in list(self.tokens.values()):
                await ensure_token(source, self.clock)

    async def _status_line(self) -> None:
        """STATUS= when the health's line changes (checked every STATUS_INTERVAL seconds, and at once when
        the start moves on), a started daemon moving between ready and degraded with it; and the summaries
        of repeated log lines whose window is over."""
        while True:
            self._progress = anyio.Event()
            now = self.health()
            if self.lifecycle.state in SERVING:
                self.lifecycle.move(now.serving, now.status_line())
            else:  # starting: what it waits for; reloading: the line so far; stopping: nothing is sent
                self.lifecycle.status(now.status_line())
            repeat_limiter().flush()
            with anyio.move_on_after(STATUS_INTERVAL):  # or at once when the start moves on
                await self._progress.wait()

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
                new = None
            if new is not None:
                await self._apply(new)
        for watcher in self.watchers.values():
            watcher.request_reload("sighup")
        if self._task_group is not None:  # every sink, changed or not: a deleted file or dir is made again
            for watcher in self.watchers.values():
                self._task_group.start_soon(ensure_credentials, watcher)
            for source in self.tokens.values():
                self._task_group.start_soon(ensure_token, source, self.clock)

    # long: a config reload's rules, one per section, in the order they apply
    async def _apply(self, new: Config) -> None:
        """Apply a re-read config: the live parts now, the rest reported as needing a restart.

        Each part that changed logs one line ("logging reloaded", "policy reloaded", "sinks reloaded",
        "token source (re)started" / "removed", "these changes take effect only after a restart"); a
        reload that changed nothing logs only "config unchanged". The policy is resolved again on every
        reload (a user or group named in it may have been created since) and counts as changed only
        when the resolution differs; names still unknown are logged at warning again (once per reload).
        What changed is published at the end as one Runtime (`_publish`).
        """
        old = self.config
        restart: list[str] = []
        changed = False
        if (new.daemon.log_level, new.daemon.log_format) != (old.daemon.log_level, old.daemon.log_format):
            configure_logging(new.daemon.log_level, new.daemon.log_format)
            log.info("logging reloaded", log_level=new.daemon.log_level, log_format=new.daemon.log_format)
            changed = True
        if new.daemon.runtime_dir != old.daemon.runtime_dir:
            restart.append("daemon.runtime_dir")
        policy = await anyio.to_thread.run_sync(Policy.from_config, new.policy)  # NSS lookups may block
        if policy != self.policy:
            log.info("policy reloaded")
            changed = True
        else:
            policy = self.policy
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
                log.info("sinks reloaded", section=f"identities.{name}")  # reload() brings them up to date now
                changed = True
        keep_tokens = dict(old.tokens)
        tokens = dict(self.tokens)
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
                tokens[name].config = wanted
                keep_tokens[name] = wanted
                log.info("sinks reloaded", section=f"tokens.{name}")  # reload() brings them up to date now
                changed = True
            else:
                source = await self._replace_source(name, wanted)
                changed = True
                if source is None or wanted is None:
                    tokens.pop(name, None)
                    keep_tokens.pop(name, None)
                else:
                    tokens[name] = source
                    keep_tokens[name] = wanted
        if new.listeners != old.listeners:
            restart.append("listeners")
        if restart:
            log.warning("these changes take effect only after a restart", sections=restart)
        elif not changed:
            log.info("config unchanged")
        # What runs now: the new live parts, and the old version of everything that needs a restart.
        daemon = new.daemon.model_copy(update={"runtime_dir": old.daemon.runtime_dir})
        config = old.model_copy(
            update={"daemon": daemon, "policy": new.policy, "identities": keep_ids, "tokens": keep_tokens}
        )
        self._publish(Runtime.of(config, policy, tokens))

    def _publish(self, runtime: Runtime) -> None:
        """Make `runtime` current: one assignment for every reader of the reference (the local API). The
        two servers that keep their own copy are told here: the metadata listener (its policy; its source,
        which wakes its held waits, when that was replaced) and the Workload API (a new policy: every open
        stream re-checks its caller now)."""
        previous = self.runtime.publish(runtime)
        handler = self._metadata_api
        if handler is not None:
            handler.policy = runtime.policy
            source = runtime.tokens.get(handler.source.name)
            if source is not None and source is not handler.source:
                handler.source = source
        if self.workload_api is not None and runtime.policy is not previous.policy:
            self.workload_api.set_policy(runtime.policy)

    def _new_source(self, name: str, token_config: TokenConfig) -> TokenSource:
        from wlidd.tokens.flows import Flow
        from wlidd.tokens.manager import TokenSource

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
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow_token, source, self.clock)  # its sinks follow the tokens it publishes
                await source.run(task_status=task_status)

    async def _replace_source(self, name: str, token_config: TokenConfig | None) -> TokenSource | None:
        """Stop a token source (if running) and start its new version (if any), while serving goes on; the
        new source (None when removed), for the caller to publish."""
        old = self.tokens.get(name)
        if old is not None:
            self._source_scopes.pop(name).cancel()
            await old.flow.aclose()
        if token_config is None:
            log.info("token source removed", source=name)
            return None
        source = self._new_source(name, token_config)
        source.first_trigger = "config"  # its first fetch is logged as the reload's
        assert self._task_group is not None
        await self._task_group.start(self._run_source, source)
        log.info("token source (re)started", source=name, flow=token_config.flow)
        return source


def socket_address(sock: socket.socket) -> str:
    """Where a listening socket accepts: "127.0.0.1:9464", "[::1]:9464", or a Unix socket's path."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return name.decode(errors="replace").replace("\0", "@", 1) if isinstance(name, bytes) else str(name)
    host, port = str(name[0]), int(name[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(address: str) -> bool:
    """Whether "host:port" (as socket_address writes it) is a loopback address (IPv4-mapped ones too)."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def raise_open_files_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a local flood must meet our connection caps, not
    EMFILE); warn when even that is below `needed` descriptors. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit", soft=soft, hard=hard, error=str(exc))
    if soft < needed:
        log.warning(
            "the open files limit is below what the listeners' connection caps may hold; accept() may hit "
            "EMFILE first (handled, but set LimitNOFILE= higher)",
            limit=soft,
            needed=needed,
        )
    return soft
