"""SpiffeWorkloadAPI service: FetchX509SVID and FetchX509Bundles stream the full state on every change.
Long: the Workload API's services (X.509, bundles, JWT, and Envoy's SDS) over one gRPC server.

Envoy's Secret Discovery Service (envoy.service.secret.v3.SecretDiscoveryService) is served on the same
server, as the SPIRE agent serves it on its Workload API socket, unless its settings disable it
(wlidd.workload_api.sds_settings; the service: wlidd.workload_api.sds_service). Its calls go through the
same steps below except the security header, which Envoy does not send (SPIRE asks it of the Workload
API's methods only: spiffe/spire pkg/agent/endpoints/middleware.go `verifySecurityHeader`, lines 43-45).

Per call, in this order, before any of the request body is read: the security header
`workload.spiffe.io: true` (else INVALID_ARGUMENT); the caller, from the kernel credentials read once
when its connection was accepted (SO_PEERCRED and SO_PEERGROUPS); the identities its [policy]
credentials rules allow (none: PERMISSION_DENIED). Only then the request message, whose declared size
(the gRPC length prefix) must be at most MAX_REQUEST_BYTES (wlidd.workload_api.calls; else
RESOURCE_EXHAUSTED and the stream is reset, nothing buffered). No valid SVID among the allowed
identities yet: UNAVAILABLE (clients retry). JWT methods: UNIMPLEMENTED.

The policy is checked again before every push and on every reload (`set_policy`): a stream whose caller
lost some identities gets a new response without them at once; one that lost all ends with
PERMISSION_DENIED at once.

Bounded per connection (on top of the daemon's connection caps, counted at accept):
  - HTTP/2 receive windows of 64 KiB (the protocol's minimum; requests are empty): at most that much
    of a caller's unread DATA is held, and h2 ends the connection when a peer sends past them
    (FLOW_CONTROL_ERROR, RFC 9113 §6.9.1);
  - at most 100 concurrent streams (h2's SETTINGS_MAX_CONCURRENT_STREAMS; no lower: grpcio shares one
    connection among every client in a process), and MAX_STREAMS_PER_CONNECTION in the connection's life;
  - reading stops while the peer does not read what we write, so a client that floods PINGs or
    SETTINGS (each answered by an ACK) and never reads cannot grow our write buffer;
  - the HTTP/2 preface must arrive within the first-byte timeout (`serve_accepted`).
Protocol rules: the gRPC over HTTP/2 wire format (grpc/doc/PROTOCOL-HTTP2.md: a message is a 1-byte
compressed flag, a 4-byte big-endian length, the bytes) and the SPIFFE Workload API
(spiffe/standards/SPIFFE_Workload_Endpoint.md, SPIFFE_Workload_API.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import h2.events
import h2.exceptions
from cryptography.hazmat.primitives import serialization
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.errors import ErrorCodes

from wlidd.api.accept import ConnectionCounter
from wlidd.api.authz import handout_audit, process_fields
from wlidd.api.callers import CallerCache
from wlidd.api.peers import CallerKey, Peer, socket_peer
from wlidd.clock import Clock
from wlidd.logs import AuditOnce, get_logger
from wlidd.metrics import Metrics
from wlidd.policy import Caller, Policy
from wlidd.status import WorkloadApiStatus
from wlidd.svid.model import TrustBundle
from wlidd.watch import CredentialWatcher, IdentityState
from wlidd.workload_api import workload_pb2 as pb
from wlidd.workload_api.calls import read_message
from wlidd.workload_api.sds_settings import SdsSettings

if TYPE_CHECKING:
    from wlidd.workload_api.sds_service import SecretDiscovery

log = get_logger("wlidd.workload_api")
audit = get_logger("wlidd.audit")

SECURITY_HEADER = "workload.spiffe.io"
SEND_TIMEOUT = 30.0  # seconds a push may wait on a client that does not open its flow-control window
MAX_EMPTY_DATA_FRAMES = 1024  # per connection (no client needs one: gRPC messages are never empty on the wire)
# grpclib keeps every DATA frame a stream has not read yet as its own object (~170 bytes): within the 64 KiB
# window, one-byte frames made ~11 MB per connection. A stream holding more than this many small frames
# unread (a client sending far ahead of what wlidd reads: Envoy and the SPIFFE clients send one request
# and wait) ends its connection with ENHANCE_YOUR_CALM; larger frames are bounded by the window itself.
SMALL_FRAME_BYTES = 1024
MAX_UNREAD_SMALL_FRAMES = 64
WINDOW_BYTES = 2**16 - 1  # HTTP/2 receive windows, per connection and per stream: the minimum (RFC 9113 §6.9.2)
_PREFACE_BYTES = 24  # the HTTP/2 client connection preface (RFC 9113 §3.4)
# Streams one connection may open in its life; then GOAWAY and close (clients reconnect). h2 remembers
# up to 65,536 closed streams per connection (~200 bytes each): this keeps that table small.
MAX_STREAMS_PER_CONNECTION = 1000
MAX_CALLS_PER_CALLER = 64  # open calls (streams) of one uid across its connections, by default: each holds memory
CLOSE_GRACE = 2.0  # seconds a closing connection may take to flush its last frames before it is aborted


def _der(bundle: TrustBundle) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle.authorities)


def x509_svid_response(states: list[IdentityState]) -> Any:
    """The full X509SVIDResponse for these identities: each SVID with its own bundle; every other
    configured trust domain's bundle as federated."""
    svids = []
    federated: dict[str, bytes] = {}
    for state in states:
        svid = state.identity.svid
        svids.append(
            pb.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.chain),
                x509_svid_key=svid.key_der(),
                bundle=_der(state.identity.own_bundle),
            )
        )
        for bundle in state.identity.bundles:
            if bundle.trust_domain != svid.spiffe_id.trust_domain:
                federated[f"spiffe://{bundle.trust_domain}"] = _der(bundle)
    return pb.X509SVIDResponse(svids=svids, federated_bundles=federated)


def x509_bundles_response(states: list[IdentityState]) -> Any:
    bundles: dict[str, bytes] = {}
    for state in states:
        for bundle in state.identity.bundles:
            bundles[f"spiffe://{bundle.trust_domain}"] = _der(bundle)
    return pb.X509BundlesResponse(bundles=bundles)


def _ignore_event(event: object) -> None:
    """An h2 event wlidd has nothing to do for."""


class WorkloadProtocol(H2Protocol):
    """grpclib's HTTP/2 protocol for one connection, plus what the Workload API needs of it: the peer's
    credentials read once, at connection time; back-pressure (reading
    pauses while the transport's write buffer is above its high-water mark); and events for the
    preface having arrived and the connection having closed (for `serve_accepted`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.credentials: Peer | None = None  # a Unix peer's kernel credentials (None: none, or gone)
        self.received = 0  # bytes, counted up to the preface's length
        self.spoke = asyncio.Event()
        self.closed = asyncio.Event()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # a peer already gone has no credentials
            peer = socket_peer(sock) if sock is not None and sock.family == socket.AF_UNIX else None
            self.credentials = peer if peer is not None and peer.uid is not None else None
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        super().connection_made(transport)
        # Frames of unknown types are ignored (RFC 9113 §4.1, §5.5: a PRIORITY_UPDATE, an extension);
        # grpclib has no processor for h2's UnknownFrameReceived and raised NotImplementedError out of
        # data_received (a traceback per connection, the connection dropped).
        self.processor.processors[h2.events.UnknownFrameReceived] = _ignore_event
        # Empty DATA frames cost the sender nothing (no flow-control window) and grpclib queues an object
        # for each: past a budget the connection ends with ENHANCE_YOUR_CALM, as nghttp2 does against
        # CVE-2019-9518 ("empty frames flood"). A stream's END_STREAM may come on an empty frame: not counted.
        process_data = self.processor.processors[h2.events.DataReceived]
        self._process_data: Callable[[h2.events.DataReceived], None] = process_data  # type: ignore[assignment]
        self.processor.processors[h2.events.DataReceived] = self._data_frame
        self.empty_frames = 0

    def _uid(self) -> int | None:
        return self.credentials.uid if self.credentials is not None else None

    def _data_frame(self, event: h2.events.DataReceived) -> None:
        if not event.flow_controlled_length and event.stream_ended is None:
            self.empty_frames += 1
            if self.empty_frames > MAX_EMPTY_DATA_FRAMES:
                if self.empty_frames == MAX_EMPTY_DATA_FRAMES + 1:
                    log.warning("workload API connection ended: a flood of empty DATA frames", uid=self._uid())
                self.end(ErrorCodes.ENHANCE_YOUR_CALM)
                return  # nor anything after it on this connection
        self._process_data(event)
        if 0 < event.flow_controlled_length < SMALL_FRAME_BYTES:
            stream = self.processor.streams.get(event.stream_id)
            if stream is not None and stream.buffer._unacked.qsize() > MAX_UNREAD_SMALL_FRAMES:  # no public accessor
                log.warning("workload API connection ended: a flood of small unread DATA frames", uid=self._uid())
                self.end(ErrorCodes.ENHANCE_YOUR_CALM)

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        except UnicodeDecodeError:
            # h2 decodes header values as ASCII for grpclib (header_encoding) and raises this, not a
            # ProtocolError, for other bytes: a malformed request (gRPC metadata values are ASCII,
            # grpc/doc/PROTOCOL-HTTP2.md; binary ones are base64 in "-bin" headers). h2's state is
            # half-updated: end the connection, as for a protocol error, without a traceback.
            log.debug("workload API connection ended: a header value is not ASCII")
            self.end(ErrorCodes.PROTOCOL_ERROR)

    def _data_received(self, data: bytes) -> None:
        if self.received < _PREFACE_BYTES:
            self.received += len(data)
            if self.received >= _PREFACE_BYTES:
                self.spoke.set()
        super().data_received(data)
        h2_connection = self.connection._connection  # grpclib's H2Connection (no public accessor)
        if h2_connection.highest_inbound_stream_id > 2 * MAX_STREAMS_PER_CONNECTION:  # client ids are odd
            self.end(ErrorCodes.NO_ERROR)

    def end(self, error_code: ErrorCodes) -> None:
        """Send GOAWAY and close; abort if the peer does not take the last frames within CLOSE_GRACE."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection._connection.close_connection(error_code=error_code)
            self.connection.flush()
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.closed.set()


class _Server(Server):
    """A grpclib Server whose connections speak WorkloadProtocol, and whose h2 checks inbound headers
    (grpclib turns that off: a request without `:method` then reaches its handler, which logs a
    traceback per stream and never answers; h2 instead ends such a connection, RFC 9113 §8.3)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h2_config.validate_inbound_headers = True

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()  # registers the connection's handler with the server
        return WorkloadProtocol(plain.handler, plain.config, plain.h2_config)


def server_config() -> Configuration:
    """grpclib settings for the Workload API: the smallest HTTP/2 receive windows (see the module doc)."""
    return Configuration(http2_connection_window_size=WINDOW_BYTES, http2_stream_window_size=WINDOW_BYTES)


def build_server(api: WorkloadApi) -> Server:
    """The grpclib Server for `api`. Serve it either from a listening socket (`await server.start(sock=…)`)
    or connection by connection from the daemon's own accept loop (`serve_accepted`)."""
    return _Server([api], config=server_config())


async def serve_accepted(server: Server, sock: socket.socket, *, first_byte_timeout: float = 5.0) -> None:
    """Serve one accepted Unix socket on `server` (from `build_server`) until the connection closes.

    The peer must send the HTTP/2 preface within `first_byte_timeout` seconds, else the connection is
    dropped. Cancelled (daemon stopping), the connection is aborted and its calls are cancelled. The
    socket belongs to asyncio's transport from the start: it is closed when this returns (normally or
    cancelled), and must not be closed by the caller meanwhile.
    Raises OSError when the socket cannot be served at all (the peer already went away).
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_accepted_socket(server._protocol_factory, sock)
    if not isinstance(protocol, WorkloadProtocol):
        transport.abort()
        raise TypeError("serve_accepted needs a server from build_server")
    try:
        with anyio.move_on_after(first_byte_timeout):
            await protocol.spoke.wait()
        if protocol.spoke.is_set():
            await protocol.closed.wait()
    finally:
        if not protocol.closed.is_set():
            transport.abort()
            with anyio.CancelScope(shield=True):
                await protocol.closed.wait()  # connection_lost, called soon: the socket is closed by then


@dataclass(eq=False)
class _Sending:
    """A push under way (`WorkloadApi.push`): whose keys it carries, and the scope that stops it."""

    caller: Caller
    names: frozenset[str]
    scope: anyio.CancelScope
    revoked: bool = False


class WorkloadApi:
    """The grpclib service; one instance serves every connection (from `build_server`).
    `max_calls_per_caller`: the open calls (Workload API and SDS streams together) one uid may hold across
    its connections ([listeners.workload_api] max_calls_per_caller)."""

    def __init__(
        self,
        watchers: Mapping[str, CredentialWatcher],
        policy: Policy,
        clock: Clock,
        metrics: Metrics | None = None,
        sds: SdsSettings | None = None,
        *,
        max_calls_per_caller: int = MAX_CALLS_PER_CALLER,
    ) -> None:
        self.watchers = watchers
        self._policy = policy
        self._policy_changed = anyio.Event()
        self.clock = clock
        self.metrics = metrics
        self._callers = CallerCache()
        self.audited = AuditOnce()
        # open calls per uid (only uids with one), refused beyond max_calls_per_caller; no cap in all
        self.max_calls_per_caller = max_calls_per_caller
        self._calls = ConnectionCounter(sys.maxsize, max_calls_per_caller)
        self.streams = 0
        self.pushes = 0
        self.last_push: dict[str, dt.datetime] = {}
        self._sending: set[_Sending] = set()  # pushes under way (`push`), for `set_policy` to stop
        self.policy_listeners: set[Callable[[], None]] = set()  # called by `set_policy` (SDS streams' wake-ups)
        self.sds: SecretDiscovery | None = None  # Envoy SDS, unless its settings disable it
        settings = sds if sds is not None else SdsSettings()
        if settings.enabled:
            from wlidd.workload_api.sds_service import SecretDiscovery  # Envoy's protobuf modules: only if served

            self.sds = SecretDiscovery(self, settings)

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Install `policy` (a reload), stop every push under way whose caller it takes keys from (`push`),
        and wake every open stream to check its caller against it now."""
        self._policy = policy
        for sending in list(self._sending):
            if sending.names and not sending.names <= set(self._allowed(sending.caller)):
                sending.revoked = True
                sending.scope.cancel()
        for listener in list(self.policy_listeners):
            listener()
        self._policy_changed.set()
        self._policy_changed = anyio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return (self.sds.__mapping__() if self.sds is not None else {}) | {
            "/SpiffeWorkloadAPI/FetchX509SVID": Handler(
                self.fetch_x509_svid, Cardinality.UNARY_STREAM, pb.X509SVIDRequest, pb.X509SVIDResponse
            ),
            "/SpiffeWorkloadAPI/FetchX509Bundles": Handler(
                self.fetch_x509_bundles, Cardinality.UNARY_STREAM, pb.X509BundlesRequest, pb.X509BundlesResponse
            ),
            "/SpiffeWorkloadAPI/FetchJWTSVID": Handler(
                self.unimplemented, Cardinality.UNARY_UNARY, pb.JWTSVIDRequest, pb.JWTSVIDResponse
            ),
            "/SpiffeWorkloadAPI/FetchJWTBundles": Handler(
                self.unimplemented, Cardinality.UNARY_STREAM, pb.JWTBundlesRequest, pb.JWTBundlesResponse
            ),
            "/SpiffeWorkloadAPI/ValidateJWTSVID": Handler(
                self.unimplemented, Cardinality.UNARY_UNARY, pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse
            ),
        }

    def status(self) -> WorkloadApiStatus:
        """The Workload API's part of /v1/status, with SDS's (`sds`) while it is served."""
        sds = self.sds.status() if self.sds is not None else None
        return WorkloadApiStatus(self.streams, self.pushes, dict(sorted(self.last_push.items())), sds)

    async def unimplemented(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "JWT-SVIDs are not served by wlidd: it distributes X.509-SVIDs")

    @staticmethod
    def _connection(stream: Stream[Any, Any]) -> WorkloadProtocol:
        transport = stream.peer._transport if stream.peer is not None else None
        protocol = transport.get_protocol() if transport is not None else None
        if not isinstance(protocol, WorkloadProtocol):
            raise GRPCError(Status.INTERNAL, "the Workload API must be served by wlidd's build_server")
        return protocol

    async def caller(self, stream: Stream[Any, Any], *, header: bool = True) -> Caller:
        """The caller of a call (headers only: no body is read); with `header`, the call must carry the
        Workload API's security header (INVALID_ARGUMENT otherwise). PERMISSION_DENIED for a caller
        that cannot be identified."""
        return await self._caller(stream, self._connection(stream), header=header)

    async def _caller(self, stream: Stream[Any, Any], connection: WorkloadProtocol, *, header: bool = True) -> Caller:
        """The caller of a call that carries the security header (headers only: no body is read)."""
        if header and (stream.metadata is None or stream.metadata.get(SECURITY_HEADER) != "true"):
            raise GRPCError(Status.INVALID_ARGUMENT, f"security header missing from request: {SECURITY_HEADER}: true")
        creds = connection.credentials
        if creds is None or creds.uid is None:
            raise GRPCError(Status.PERMISSION_DENIED, "the caller cannot be identified (not a Unix socket peer)")
        # SO_PEERCRED and SO_PEERGROUPS, read at connection time; its process too when a rule asks (wlidd.workload)
        return await self._callers.caller_of(creds, self._policy)

    def _allowed(self, caller: Caller) -> list[str]:
        """The identities the current policy lets `caller` have (its [policy] credentials rules)."""
        return self._policy.identities_for(caller, self.watchers)

    def valid_states(self, names: list[str]) -> list[IdentityState]:
        """The published states of these identities whose SVID is valid now, in the order given."""
        now = self.clock()
        states = [self.watchers[n].current for n in names]
        return [s for s in states if s is not None and s.identity.svid.is_valid_at(now)]

    @staticmethod
    async def _read_request(stream: Stream[Any, Any], message: Callable[[bytes], Any]) -> None:
        """Read the one request message of a Workload API call (`read_message`); a call that ends without
        one is taken as an empty request."""
        await read_message(stream, message)

    @contextlib.contextmanager
    def admitted(self, caller: Caller) -> Iterator[None]:
        """Hold one of the caller's open calls while in the block; RESOURCE_EXHAUSTED when its uid already
        has `max_calls_per_caller` open (each open call holds memory: one uid may not pile them up; the
        listener's `max_calls_per_caller`, MAX_CALLS_PER_CALLER by default)."""
        key = CallerKey(caller.uid)
        refusal = self._calls.admit(key)
        if refusal is not None:
            held = self._calls.per_caller.get(key, 0)
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"{caller.describe()} already has {held} Workload API calls open (at most {self.max_calls_per_caller})",
            )
        try:
            yield
        finally:
            self._calls.release(key)

    def authorize(self, caller: Caller, method: str) -> list[str]:
        """The identities `caller` may have (its [policy] credentials rules); PERMISSION_DENIED (audited)
        when none."""
        names = self._allowed(caller)
        if not names:
            key = {"listener": "workload_api", "uid": caller.uid}  # repeats are counted (wlidd.logs)
            why = [r for name in self.watchers if (r := self._policy.may_have_credentials(caller, name).refusal)]
            detail = "; ".join(why[:4])  # which selector each rule found wrong (a few: the config's size)
            fields = process_fields(caller)
            audit.limited("warning", "access denied", key=key, route=method, user=caller.user, detail=detail, **fields)
            refusal = f"{caller.describe()} may have no identity here"
            if why and (caller.process is not None or caller.process_problem):  # which selector refused it
                refusal += f" ({why[0]})"
            raise GRPCError(Status.PERMISSION_DENIED, refusal)
        return names

    def still_allowed(self, caller: Caller, method: str) -> list[str]:
        """The identities `caller` may still have, checked before each push; PERMISSION_DENIED (audited)
        when a reload took them all."""
        names = self._allowed(caller)
        if not names:
            audit.warning("access revoked", route=method, uid=caller.uid, user=caller.user, listener="workload_api")
            raise GRPCError(Status.PERMISSION_DENIED, f"{caller.describe()} may no longer have any identity here")
        return names

    async def _stream(self, stream: Stream[Any, Any], method: str, render: Any, request: Any) -> None:
        caller = await self.caller(stream)
        with self.admitted(caller):
            await self._authorized_stream(stream, method, render, request, caller)

    async def _authorized_stream(
        self, stream: Stream[Any, Any], method: str, render: Any, request: Any, caller: Caller
    ) -> None:
        self.authorize(caller, method)
        await self._read_request(stream, request.FromString)
        await self._serve(stream, method, render, caller)

    async def _serve(self, stream: Stream[Any, Any], method: str, render: Any, caller: Caller) -> None:
        """Push the caller's identities now and after every change, checking the policy before each push."""
        self.streams += 1
        if self.metrics is not None:
            self.metrics.workload_api_streams.set(self.streams)
        try:
            sent: tuple[tuple[str, int], ...] | None = None
            while True:
                policy_changed = self._policy_changed  # a reload from here on wakes the wait below
                names = self.still_allowed(caller, method)
                seen = {n: self.watchers[n].current for n in names}
                states = self.valid_states(names)
                if not states:
                    raise GRPCError(Status.UNAVAILABLE, "no valid X.509-SVID is available yet")
                current = tuple((s.name, s.version) for s in states)
                if current != sent:
                    # audited before the keys leave: a client that closes as soon as it has them could
                    # otherwise end the stream (cancelling this task) between the push and its audit line
                    handout_audit(
                        self.audited,
                        "svids pushed",
                        caller,
                        method,
                        current,
                        route=method,
                        identities=[s.name for s in states],
                    )
                    await self.push(stream, render(states), caller, [s.name for s in states], method)
                    sent = current
                    self.pushes += 1
                    now = self.clock()
                    for state in states:
                        self.last_push[state.name] = now
                        if self.metrics is not None:
                            self.metrics.workload_api_pushes.labels(state.name).inc()
                            self.metrics.workload_api_last_push.labels(state.name).set(now.timestamp())
                await self._wait_for_change({n: s.version if s else 0 for n, s in seen.items()}, policy_changed)
        finally:
            self.streams -= 1
            if self.metrics is not None:
                self.metrics.workload_api_streams.set(self.streams)

    async def push(self, stream: Stream[Any, Any], message: Any, caller: Caller, names: list[str], method: str) -> None:
        """Send one response holding `names`' keys, as long as the caller may still have them.

        A client can hold a push back by not opening its HTTP/2 flow-control window; meanwhile a reload
        may revoke it. So the send is watched (registered for `set_policy`, no task of its own): the
        moment a reload takes any of `names` from the caller, or after SEND_TIMEOUT seconds without the
        message going out, the send stops — nothing more of the message (the key comes after the chain)
        leaves — and the call ends: PERMISSION_DENIED or
        DEADLINE_EXCEEDED in trailers (HEADERS are not flow-controlled), or RST_STREAM when even those
        cannot be written. Raises GRPCError (grpclib then sends nothing more).
        """
        with anyio.move_on_after(SEND_TIMEOUT) as scope:  # also cancelled by `set_policy` (revoked)
            sending = _Sending(caller, frozenset(names), scope)
            self._sending.add(sending)
            try:
                await stream.send_message(message)
            finally:
                self._sending.discard(sending)
        revoked = sending.revoked
        if not revoked and not scope.cancelled_caught:
            return
        if revoked:
            audit.warning("access revoked", route=method, uid=caller.uid, user=caller.user, listener="workload_api")
            lost = [name for name in names if name not in self._allowed(caller)] or names
            status, text = Status.PERMISSION_DENIED, f"{caller.describe()} may no longer have {', '.join(lost)}"
        else:
            status, text = Status.DEADLINE_EXCEEDED, f"the client did not read a push for {SEND_TIMEOUT:g} s"
        with anyio.move_on_after(1.0):
            await stream.send_trailing_metadata(status=status, status_message=text)
        if not stream._send_trailing_metadata_done:
            with contextlib.suppress(Exception):  # the connection may be gone already
                stream._stream.reset_nowait(ErrorCodes.CANCEL)
            stream._cancel_done = True
        raise GRPCError(status, text)

    async def _wait_for_change(self, versions: dict[str, int], policy_changed: anyio.Event) -> None:
        """Return once any of these identities has a version newer than the one given, or the policy changed."""
        async with anyio.create_task_group() as tg:

            async def one(name: str) -> None:
                await self.watchers[name].wait_for_change(versions[name])
                tg.cancel_scope.cancel()

            async def reload() -> None:
                await policy_changed.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(reload)
            for name in versions:
                tg.start_soon(one, name)

    async def fetch_x509_svid(self, stream: Stream[Any, Any]) -> None:
        await self._stream(stream, "FetchX509SVID", x509_svid_response, pb.X509SVIDRequest)

    async def fetch_x509_bundles(self, stream: Stream[Any, Any]) -> None:
        await self._stream(stream, "FetchX509Bundles", x509_bundles_response, pb.X509BundlesRequest)
