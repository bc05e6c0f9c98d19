"""The daemon: watchers, listeners and signals in one anyio task group.

Start order: every identity's watcher is started (initial load tried), then the listeners are
bound, then `task_status.started()` — the point where READY will be sent (issue: systemd).
SIGHUP re-reads every identity; SIGTERM/SIGINT stop gracefully with exit code 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketListener, TaskStatus

from wlidd.api.authz import Policy, parse_matcher
from wlidd.api.listeners import ListenerError, bind_unix_socket
from wlidd.api.metadata import MetadataApi
from wlidd.api.mtls import MtlsGate, QuietTLSListener
from wlidd.api.routes import Api
from wlidd.api.server import HttpServer, Request, Response, ServerLimits
from wlidd.config import Config, split_address
from wlidd.metrics import Metrics
from wlidd.sinks import follow_credentials
from wlidd.svid.load import Clock, CredentialSource, utc_now
from wlidd.tlsctx import HotServerContext
from wlidd.tokens.flows import Flow
from wlidd.tokens.manager import TokenSource
from wlidd.watch import CredentialWatcher

log = structlog.get_logger("wlidd.daemon")


class Daemon:
    """Everything one `wlidd run` process serves."""

    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None, clock: Clock = utc_now) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        env = dict(os.environ if environ is None else environ)
        self.watchers: dict[str, CredentialWatcher] = {
            name: CredentialWatcher(name, CredentialSource(name, cfg, env), clock=clock, metrics=self.metrics)
            for name, cfg in config.identities.items()
        }
        self.tokens: dict[str, TokenSource] = {}
        for name, token_config in config.tokens.items():
            watcher = self.watchers.get(token_config.identity) if token_config.identity else None
            current = (lambda w: lambda: w.current)(watcher) if watcher is not None else None
            self.tokens[name] = TokenSource(
                name,
                token_config,
                Flow(name, token_config, current),
                watcher=watcher,
                clock=clock,
                metrics=self.metrics,
            )
        self.started_at = clock()
        self.policy = Policy.from_config(config.policy)
        self.api = Api(self.watchers, self.metrics, clock, self.started_at, self.tokens, self.policy)
        unix = config.listeners.unix
        self.unix_server = HttpServer(
            self.api,
            name="unix",
            limits=ServerLimits(
                request_timeout=unix.request_timeout,
                idle_timeout=unix.idle_timeout,
                max_connections=unix.max_connections,
            ),
            on_response=self._count_response,
        )
        self.socket_path: Path = unix.path
        self.mtls_server: HttpServer | None = None
        self.mtls_port: int | None = None
        mtls = config.listeners.mtls
        if mtls is not None:
            self.mtls_server = HttpServer(
                MtlsGate(self.api, self.watchers[mtls.identity], tuple(parse_matcher(p) for p in mtls.allow)),
                name="mtls",
                limits=ServerLimits(
                    request_timeout=mtls.request_timeout,
                    idle_timeout=mtls.idle_timeout,
                    max_connections=mtls.max_connections,
                ),
                on_response=self._count_response,
            )
        self.metadata_server: HttpServer | None = None
        self.metadata_port: int | None = None
        metadata = config.listeners.metadata
        if metadata is not None:
            self.metadata_server = HttpServer(
                MetadataApi(metadata, self.tokens[metadata.token], self.policy, clock),
                name="metadata",
                limits=ServerLimits(
                    request_timeout=metadata.request_timeout,
                    idle_timeout=metadata.idle_timeout,
                    max_connections=metadata.max_connections,
                ),
                on_response=self._count_response,
            )
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._stopping = anyio.Event()

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
        """Run until stopped (signal or `stop()`); returns normally on a graceful stop."""
        log.info(
            "starting",
            identities=sorted(self.watchers),
            sources=list(self.tokens),
            socket=str(self.socket_path),
            pid=os.getpid(),
        )
        listener: SocketListener | None = None
        extra_listeners: list[anyio.abc.Listener[Any]] = []
        try:
            async with anyio.create_task_group() as tg:
                for watcher in self.watchers.values():
                    await tg.start(watcher.run)
                    if watcher.source.config.sinks:
                        tg.start_soon(follow_credentials, watcher, watcher.source.config.sinks)
                for source in self.tokens.values():
                    await tg.start(source.run)
                for source in self.tokens.values():
                    if source.config.require_at_start:
                        await source.wait_until_servable(source.config.require_timeout)
                unix = self.config.listeners.unix
                sock = bind_unix_socket(self.socket_path, unix.mode, unix.group, owner=unix.owner)
                listener = await SocketListener.from_socket(sock)
                tg.start_soon(self._serve, listener)
                if self.mtls_server is not None and self.config.listeners.mtls is not None:
                    mtls = self.config.listeners.mtls
                    host, port = split_address(mtls.address)
                    try:
                        tcp_mtls = await anyio.create_tcp_listener(local_host=host, local_port=port)
                    except OSError as exc:
                        raise ListenerError(f"listeners.mtls: cannot listen on {host}:{port}: {exc.strerror}") from None
                    extra_listeners.append(tcp_mtls)
                    self.mtls_port = tcp_mtls.extra(anyio.abc.SocketAttribute.local_port)
                    hot = HotServerContext(self.watchers[mtls.identity].current_tls)
                    tg.start_soon(
                        self.mtls_server.serve,
                        QuietTLSListener(
                            tcp_mtls, hot.context, standard_compatible=False, handshake_timeout=mtls.request_timeout
                        ),
                    )
                if self.metadata_server is not None and self.config.listeners.metadata is not None:
                    host, port = split_address(self.config.listeners.metadata.address)
                    try:
                        tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
                    except OSError as exc:
                        raise ListenerError(
                            f"listeners.metadata: cannot listen on {host}:{port}: {exc.strerror}"
                        ) from None
                    extra_listeners.append(tcp)
                    self.metadata_port = tcp.extra(anyio.abc.SocketAttribute.local_port)
                    tg.start_soon(self.metadata_server.serve, tcp)
                tg.start_soon(self._signals)
                now = self.clock()
                invalid = [name for name, w in self.watchers.items() if not w.is_valid(now)]
                log.info("ready", socket=str(self.socket_path), invalid_identities=invalid)
                task_status.started()
                await self._stopping.wait()
                log.info("stopping")
                for watcher in self.watchers.values():
                    watcher.close()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if listener is not None:
                    await listener.aclose()
                for other in extra_listeners:
                    await other.aclose()
                for source in self.tokens.values():
                    await source.flow.aclose()
        try:
            if self.socket_path.is_socket():
                self.socket_path.unlink()
        except OSError:
            pass
        log.info("stopped")

    async def _serve(self, listener: SocketListener) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            await self.unix_server.serve(listener)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: re-reading credentials")
                    for watcher in self.watchers.values():
                        watcher.request_reload("sighup")
                else:
                    log.info("signal received, stopping", signal=signal.Signals(signum).name)
                    self.stop()
