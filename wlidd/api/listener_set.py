"""Every listener a config names, as one set: its server, its listening sockets, its accept loops.

The daemon drives it in order (wlidd.daemon): `bind` every socket first (or take it from socket
activation), so a socket another daemon holds fails the start before anything is written; `start` the
accept loops (each logs "listener started" with its address or path); on stop, `stop_accepting`, `drain`
the requests in flight, and `close` what is left (also after a failed start: sockets bound here are
removed, an activated one never). Servers: the local API on the Unix socket (wlidd.api.routes.Api),
behind the mTLS gate on [listeners.mtls], the GCE metadata emulation on [listeners.metadata], the public
health and metrics routes on [listeners.metrics], and the SPIFFE Workload API (gRPC) on
[listeners.workload_api]. The metadata API and the Workload API are imported only when configured
(tests/test_lazy_imports.py: the token machinery, grpclib, h2 and protobuf stay out of a small node).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from wlidd.api.accept import AcceptLoop, Refusal
from wlidd.api.connection import ServerLimits
from wlidd.api.listeners import bind_unix_socket, is_loopback, socket_address
from wlidd.api.messages import Handler, Request, Response, serialize_response
from wlidd.api.metrics_routes import MetricsRoutes
from wlidd.api.mtls import MtlsGate, QuietTLSListener
from wlidd.api.peers import CallerKey
from wlidd.api.routes import Api
from wlidd.api.server import TOO_MANY_CONNECTIONS, HttpServer
from wlidd.config import split_address
from wlidd.config.listeners import ConnectionLimits, ListenersConfig, WorkloadApiListenerConfig
from wlidd.errors import ListenerError
from wlidd.logs import get_logger
from wlidd.runtime import Runtime
from wlidd.status import ListenerStatus, WorkloadApiStatus
from wlidd.svid.spiffeid import parse_matcher
from wlidd.tlsctx import HotServerContext

if TYPE_CHECKING:
    from wlidd.api.metadata import MetadataApi
    from wlidd.workload_api.server import WorkloadApi

log = get_logger("wlidd.api.listener_set")

_UNIX_LISTENERS = frozenset({"unix", "workload_api"})  # the rest listen on TCP


def refusal_bytes(refusal: Refusal, tls: bool, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """What an HTTP listener writes to a connection its accept loop refuses (wlidd.api.accept): nothing on
    TLS (no HTTP before a handshake: the peer sees the connection close), 403 for an unidentified caller,
    503 with Retry-After at a connection cap or when out of descriptors or memory
    (`out_of_resources`); `headers` (the metadata flavor) on every answer."""
    if tls:
        return b""
    if refusal.reason == "unidentified":
        return serialize_response(Response.error(403, "forbidden", refusal.message, headers=headers), close=True)
    if refusal.reason == "listener_full" and not headers:
        return TOO_MANY_CONNECTIONS
    code, message = {
        "listener_full": ("too_many_connections", "connection limit reached; retry later"),
        "out_of_resources": ("out_of_resources", "the daemon is out of file descriptors or memory; retry later"),
    }.get(refusal.reason, ("too_many_connections_for_caller", refusal.message))
    return serialize_response(Response.error(503, code, message, headers=(*headers, ("retry-after", "1"))), close=True)


class ListenerSet:
    """The listeners of `config` serving `api` (its watchers, published runtime, metrics and clock)."""

    def __init__(self, config: ListenersConfig, api: Api) -> None:
        self.config = config
        self.api = api
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self.unix_server = self._http_server(api, "unix", config.unix)
        self.mtls_server: HttpServer | None = None
        self.metadata_server: HttpServer | None = None
        self.metrics_server: HttpServer | None = None
        self.mtls_port: int | None = None
        self.metadata_port: int | None = None
        self.metrics_port: int | None = None
        if config.mtls is not None:
            gate = MtlsGate(api, api.watchers[config.mtls.identity], tuple(parse_matcher(p) for p in config.mtls.allow))
            self.mtls_server = self._http_server(gate, "mtls", config.mtls)
        self.metadata_api: MetadataApi | None = None
        if config.metadata is not None:
            from wlidd.api.metadata import MetadataApi

            runtime = api.runtime.current
            handler = MetadataApi(config.metadata, runtime.tokens[config.metadata.token], runtime.policy, api.clock)
            handler.held_back = api.held_back
            self.metadata_api = handler
            self.metadata_server = self._http_server(handler, "metadata", config.metadata)
        if config.metrics is not None:
            self.metrics_server = self._http_server(MetricsRoutes(api), "metrics", config.metrics)
        self.workload_api: WorkloadApi | None = None
        self.accept_loops: list[AcceptLoop] = []
        self._tcp_listeners: list[anyio.abc.Listener[Any]] = []  # keep anyio's wrappers of our TCP sockets
        self._bound: dict[str, list[socket.socket]] = {}  # listener name → sockets bound, accept loops not yet started
        self._bound_paths: list[Path] = []  # Unix sockets bound here: removed on close, also after a failed start
        self._addresses: dict[str, str] = {}  # listener name → where it accepts ("127.0.0.1:9464", a path)

    @property
    def socket_path(self) -> Path:
        """The local API's Unix socket."""
        return self.config.unix.path

    def _http_server(self, handler: Handler, name: str, limits: ConnectionLimits) -> HttpServer:
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
            counter = self._request_counters[key] = self.api.metrics.http_requests.labels(
                request.listener, route, str(response.status)
            )
        counter.inc()

    def servers(self) -> list[HttpServer]:
        """The HTTP servers configured (the Workload API is gRPC: not among them)."""
        servers = (self.unix_server, self.mtls_server, self.metadata_server, self.metrics_server)
        return [s for s in servers if s is not None]

    def connection_budget(self) -> int:
        """Descriptors the configured connection caps may hold at once, plus a reserve for files,
        upstream connections and watches."""
        optional = (self.config.mtls, self.config.metadata, self.config.workload_api, self.config.metrics)
        return sum([self.config.unix.max_connections, *(cfg.max_connections for cfg in optional if cfg)]) + 256

    async def bind(self, activated: dict[str, socket.socket]) -> None:
        """Bind every configured listener's socket(s), or take them from socket activation (`activated`,
        emptied of those used); their accept loops start later (`start`). Raises ListenerError naming the
        listener when a socket cannot be bound (another daemon holds it)."""
        unix = self.config.unix
        inherited = activated.pop("unix", None)
        # A lone socket from a unit without FileDescriptorName= arrives as "unknown" or the unit's name.
        for name in ("wlidd.socket", "unknown"):
            if inherited is None and name in activated and activated[name].family == socket.AF_UNIX:
                inherited = activated.pop(name)
        if inherited is not None:
            log.info("using the socket-activated Unix socket", fd=inherited.fileno())
            self._bound["unix"] = [inherited]
        else:
            self._bound["unix"] = [bind_unix_socket(unix.path, unix.mode, unix.group, owner=unix.owner)]
            self._bound_paths.append(unix.path)
        for name, tcp in (
            ("mtls", self.config.mtls),
            ("metadata", self.config.metadata),
            ("metrics", self.config.metrics),
        ):
            if tcp is not None:
                self._bound[name] = await self._tcp(name, tcp.address, activated)
        self.mtls_port, self.metadata_port, self.metrics_port = map(self._port, ("mtls", "metadata", "metrics"))
        public = [where for sock in self._bound.get("metrics", ()) if not is_loopback(where := socket_address(sock))]
        if public:
            log.warning(
                "the metrics listener is not on a loopback address: whoever reaches it reads /metrics, "
                "/v1/health and /v1/live (names, counts, validity and failure reasons; never a key or a token)",
                address=", ".join(public),
            )
        workload = self.config.workload_api
        if workload is not None:
            sock = activated.pop("workload_api", None)
            if sock is None:
                sock = bind_unix_socket(workload.path, workload.mode, workload.group, owner=workload.owner)
                self._bound_paths.append(workload.path)
            self._bound["workload_api"] = [sock]
        for name in activated:
            log.warning("a socket-activated socket matches no configured listener; ignored", name=name)

    def _port(self, name: str) -> int | None:
        """The port the first socket of TCP listener `name` is bound to, or None when it has none."""
        socks = self._bound.get(name)
        return int(socks[0].getsockname()[1]) if socks else None

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

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the accept loops of the sockets `bind` bound, in `tg`; then one "listener started" line each."""
        config = self.config
        for sock in self._started("unix"):
            await self._listen(tg, "unix", sock, self.unix_server, config.unix)
        if self.mtls_server is not None and config.mtls is not None:
            hot = HotServerContext(self.api.watchers[config.mtls.identity].current_tls)
            for tcp in self._started("mtls"):
                await self._listen(tg, "mtls", tcp, self.mtls_server, config.mtls, tls=hot.context)
        if self.metadata_server is not None and config.metadata is not None:
            from wlidd.api.metadata_tree import FLAVOR

            for tcp in self._started("metadata"):
                await self._listen(tg, "metadata", tcp, self.metadata_server, config.metadata, headers=FLAVOR)
        if self.metrics_server is not None and config.metrics is not None:
            for tcp in self._started("metrics"):
                await self._listen(tg, "metrics", tcp, self.metrics_server, config.metrics)
        if config.workload_api is not None:
            await self._start_workload_api(tg, config.workload_api)
        for name, where in self._addresses.items():  # one line per listener, once all of them accept
            log.info("listener started", listener=name, **{"path" if name in _UNIX_LISTENERS else "address": where})

    async def _start_workload_api(self, tg: anyio.abc.TaskGroup, config: WorkloadApiListenerConfig) -> None:
        """The SPIFFE Workload API's accept loop, over the current policy (wlidd.workload_api.server)."""
        from wlidd.workload_api.sds_settings import SdsSettings
        from wlidd.workload_api.server import WorkloadApi, build_server, serve_accepted

        api = self.api
        sds = SdsSettings.from_config(config.sds)
        self.workload_api = WorkloadApi(
            api.watchers,
            api.runtime.current.policy,
            api.clock,
            api.metrics,
            sds,
            max_calls_per_caller=config.max_calls_per_caller,
        )
        server = build_server(self.workload_api)

        async def handle(conn: socket.socket, caller: CallerKey) -> None:
            with contextlib.suppress(OSError):  # the peer went away before its transport was set up
                await serve_accepted(server, conn, first_byte_timeout=config.first_byte_timeout)

        for sock in self._started("workload_api"):
            await self._accept(tg, "workload_api", sock, handle, config)

    def _started(self, name: str) -> list[socket.socket]:
        """The bound sockets of listener `name`, taken out of `_bound` (their accept loops start now); where
        they accept is kept for the "listener started" line and /v1/status."""
        socks = self._bound.pop(name, [])
        if socks:
            self._addresses[name] = ", ".join(socket_address(sock) for sock in socks)
        return socks

    async def _listen(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        sock: socket.socket,
        server: HttpServer,
        limits: ConnectionLimits,
        *,
        tls: ssl.SSLContext | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Serve `server` on `sock` through an accept loop with the listener's connection caps; `headers`
        go on the answers to refused connections (`refusal_bytes`)."""

        async def handle(conn: socket.socket, caller: CallerKey) -> None:
            handshake_error = QuietTLSListener.handle_handshake_error
            await server.serve_socket(
                conn, caller.uid, caller.inode, tls=tls, on_handshake_error=handshake_error, owner=caller
            )

        def refuse(conn: socket.socket, refusal: Refusal) -> bytes:
            return refusal_bytes(refusal, tls is not None, headers)

        if not any(existing.name == name for existing in self.accept_loops):  # one sweeper per server
            tg.start_soon(server.run_sweeper)
        await self._accept(tg, name, sock, handle, limits, refuse=refuse, shed=server.shed_idle)

    async def _accept(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        sock: socket.socket,
        handle: Callable[[socket.socket, CallerKey], Awaitable[None]],
        limits: ConnectionLimits | WorkloadApiListenerConfig,
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
            metrics=self.api.metrics,
            **options,
        )
        self.accept_loops.append(loop)
        await tg.start(loop.run)

    def stop_accepting(self) -> None:
        """Close every listening socket and tell the servers to finish (connections admitted run on)."""
        for loop in self.accept_loops:
            loop.close()
        for server in self.servers():
            server.close()

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the requests in flight to finish."""
        with anyio.move_on_after(timeout):
            for server in self.servers():
                await server.drain()

    async def close(self) -> None:
        """Close every socket still open, also those bound by a start that failed before their accept loops,
        and remove the Unix sockets bound here (never an activated one)."""
        for loop in self.accept_loops:
            loop.close()
        for socks in self._bound.values():
            for sock in socks:
                sock.close()
        for listener in self._tcp_listeners:
            await listener.aclose()
        for path in self._bound_paths:
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()

    def publish(self, runtime: Runtime, previous: Runtime) -> None:
        """Tell the servers that keep their own copy of a reload's values (wlidd.runtime): the metadata
        listener its policy and its source (which wakes its held waits) when that was replaced, the
        Workload API a new policy (every open stream re-checks its caller now)."""
        handler = self.metadata_api
        if handler is not None:
            handler.policy = runtime.policy
            source = runtime.tokens.get(handler.source.name)
            if source is not None and source is not handler.source:
                handler.source = source
        if self.workload_api is not None and runtime.policy is not previous.policy:
            self.workload_api.set_policy(runtime.policy)

    def status(self) -> dict[str, ListenerStatus]:
        """Each listener's accept loops for /v1/status (several sockets of one listener are summed)."""
        found: dict[str, ListenerStatus] = {}
        for loop in self.accept_loops:
            status = loop.status()
            known = found.get(loop.name)
            if known is None:
                found[loop.name] = dataclasses.replace(status, address=self._addresses.get(loop.name))
                continue
            found[loop.name] = dataclasses.replace(
                known,
                alive=known.alive and status.alive,
                open=known.open + status.open,
                callers=known.callers + status.callers,
                accepted=known.accepted + status.accepted,
                refused=known.refused + status.refused,
            )
        return found

    def workload_status(self) -> WorkloadApiStatus | None:
        """The Workload API's part of /v1/status, once it was started."""
        return self.workload_api.status() if self.workload_api is not None else None
