"""Envoy's Secret Discovery Service on the Workload API's gRPC server: the streams' I/O.
StreamSecrets, DeltaSecrets and FetchSecrets, driven by the watchers' published states and the policy.

Per call, as for the Workload API (wlidd.workload_api.server) but without its security header, which
Envoy does not send: the caller from its connection's kernel credentials; its open calls counted against
MAX_CALLS_PER_CALLER (RESOURCE_EXHAUSTED beyond); the identities its [policy] credentials rules allow
(none: PERMISSION_DENIED, audited). Then the requests, each at most MAX_SDS_REQUEST_BYTES (an Envoy node
lists every extension it was built with: tens of KB), the first within REQUEST_TIMEOUT.

A stream's protocol state is a `SotwStream` or `DeltaStream` (wlidd.workload_api.sds_protocol, pure); this
module feeds it the requests, read by a task of their own into a small `Inbox` (when it is full, reading
pauses and HTTP/2 flow control holds the client back), and wakes it (`Waker`) on every new published state
of the caller's identities (`CredentialWatcher.wait_for_change`: the publication FetchX509SVID streams
follow, no watcher of its own), from one small task per identity that lives as long as the stream (none is
made per wake-up: a rotation pushed to a thousand streams makes no task), and on every policy reload
(`WorkloadApi.policy_listeners`). Before each push the policy is checked again; a push
that holds keys is sent through `WorkloadApi.push`, which stops it the moment a reload revokes them.

Logged: a client's error_detail (a NACK) at error with the resource names (SPIRE handler.go 150-156);
requested names the caller has nothing for, at warning, when that set changes; both through the repeat
limiter (a client looping is counted, not written) and with at most LOGGED_NAMES names, cut short; every
hand-out of a key in the audit log ("secrets pushed"). Never a secret: messages that hold keys are not
logged or printed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import anyio
import anyio.abc
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from wlidd.api.authz import handout_audit
from wlidd.errors import SdsRequestError
from wlidd.logs import AuditOnce, get_logger
from wlidd.policy import Caller
from wlidd.watch import CredentialWatcher, IdentityState
from wlidd.workload_api.calls import REQUEST_TIMEOUT, read_message
from wlidd.workload_api.sds import Credentials, NodeFacts, SecretCache, credentials_of
from wlidd.workload_api.sds_protocol import Answer, DeltaStream, Received, SotwStream, fetch_answer
from wlidd.workload_api.sds_settings import SdsSettings

log = get_logger("wlidd.workload_api")

SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"
MAX_SDS_REQUEST_BYTES = 2**20  # a DiscoveryRequest's largest declared size (Envoy's node lists its extensions)
INBOX_SIZE = 4  # requests read ahead of the stream's loop
LOGGED_NAMES = 10  # resource names a log line shows (the first ones, each cut to LOGGED_NAME_LENGTH)
LOGGED_NAME_LENGTH = 256


def logged_names(names: Any) -> list[str]:
    """The first LOGGED_NAMES of a client's resource names, each cut short, for a log line of bounded size."""
    shown = [name[:LOGGED_NAME_LENGTH] for name in list(names)[:LOGGED_NAMES]]
    return shown + ([f"... {len(names) - LOGGED_NAMES} more"] if len(names) > LOGGED_NAMES else [])


class WorkloadCalls(Protocol):
    """What SDS uses of the Workload API's service (wlidd.workload_api.server.WorkloadApi): its callers,
    admission, policy decisions, published states, and its revocation-watched push."""

    watchers: Mapping[str, CredentialWatcher]
    audited: AuditOnce
    policy_listeners: set[Callable[[], None]]  # each called on every policy reload

    async def caller(self, stream: Stream[Any, Any], *, header: bool = True) -> Caller: ...

    def admitted(self, caller: Caller) -> AbstractContextManager[None]: ...

    def authorize(self, caller: Caller, method: str) -> list[str]: ...

    def still_allowed(self, caller: Caller, method: str) -> list[str]: ...

    def valid_states(self, names: list[str]) -> list[IdentityState]: ...

    async def push(
        self, stream: Stream[Any, Any], message: Any, caller: Caller, names: list[str], method: str
    ) -> None: ...


class Waker:
    """What wakes one stream's loop: a request read, a new published state of one of its identities, a
    policy reload. One event, armed anew by the loop before it looks at anything, so a wake-up during a
    pass is not lost: the next wait returns at once."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def arm(self) -> anyio.Event:
        self.event = anyio.Event()
        return self.event

    def wake(self) -> None:
        self.event.set()


class Inbox:
    """The requests one stream's reader task has read and its loop has not yet taken (at most `size`),
    and whether the client ended its side (`ended`) or broke the protocol (`error`)."""

    def __init__(self, waker: Waker, size: int = INBOX_SIZE) -> None:
        self.waker = waker
        self.size = size
        self.items: deque[Any] = deque()
        self.ended = False
        self.error: GRPCError | None = None
        self._taken: anyio.Event | None = None  # made only while the reader waits for room

    async def put(self, item: Any) -> None:
        while len(self.items) >= self.size:
            self._taken = anyio.Event()
            await self._taken.wait()
        self._taken = None
        self.items.append(item)
        self.waker.wake()

    def end(self, error: GRPCError | None = None) -> None:
        self.ended, self.error = True, error
        self.waker.wake()

    def take(self) -> list[Any]:
        items = list(self.items)
        self.items.clear()
        if self._taken is not None:
            self._taken.set()
        return items


class SecretDiscovery:
    """envoy.service.secret.v3.SecretDiscoveryService for `api`'s callers, identities and policy (`api`: the
    WorkloadApi whose server registers this service's `__mapping__`)."""

    def __init__(self, api: WorkloadCalls, settings: SdsSettings) -> None:
        self.api = api
        self.settings = settings
        self.cache = SecretCache()
        self._credentials: OrderedDict[tuple[tuple[str, int], ...], Credentials] = OrderedDict()
        self.streams = 0
        self.pushes = 0
        self.nacks = 0

    def __repr__(self) -> str:
        return f"SecretDiscovery(streams={self.streams}, pushes={self.pushes}, nacks={self.nacks})"

    def __mapping__(self) -> dict[str, Handler]:
        request, delta = discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest
        return {
            f"{SERVICE}/StreamSecrets": Handler(
                self.stream_secrets, Cardinality.STREAM_STREAM, request, discovery_pb2.DiscoveryResponse
            ),
            f"{SERVICE}/DeltaSecrets": Handler(
                self.delta_secrets, Cardinality.STREAM_STREAM, delta, discovery_pb2.DeltaDiscoveryResponse
            ),
            f"{SERVICE}/FetchSecrets": Handler(
                self.fetch_secrets, Cardinality.UNARY_UNARY, request, discovery_pb2.DiscoveryResponse
            ),
        }

    def status(self) -> dict[str, int]:
        return {"streams": self.streams, "pushes": self.pushes, "nacks": self.nacks}

    def credentials(self, names: list[str]) -> Credentials | None:
        """The Credentials of these identities now (those with a valid SVID), shared by every stream that
        holds the same states (so a rotation fingerprints each certificate once, not once per stream)."""
        states = self.api.valid_states(names)
        key = tuple((s.name, s.version) for s in states)
        found = self._credentials.get(key)
        if found is None:
            found = credentials_of(states)
            if found is None:
                return None
            self._credentials[key] = found
            while len(self._credentials) > 32:
                self._credentials.popitem(last=False)
        return found

    # ---- the three methods ----------------------------------------------------------------------------

    async def stream_secrets(self, stream: Stream[Any, Any]) -> None:
        protocol = SotwStream(self.settings, self.cache)
        await self._stream(stream, "StreamSecrets", protocol, discovery_pb2.DiscoveryRequest.FromString)

    async def delta_secrets(self, stream: Stream[Any, Any]) -> None:
        protocol = DeltaStream(self.settings, self.cache)
        await self._stream(stream, "DeltaSecrets", protocol, discovery_pb2.DeltaDiscoveryRequest.FromString)

    async def fetch_secrets(self, stream: Stream[Any, Any]) -> None:
        method = "FetchSecrets"
        caller = await self.api.caller(stream, header=False)
        with self.api.admitted(caller):
            self.api.authorize(caller, method)
            parse = discovery_pb2.DiscoveryRequest.FromString
            request = await read_message(stream, parse, limit=MAX_SDS_REQUEST_BYTES) or discovery_pb2.DiscoveryRequest()
            names = self.api.still_allowed(caller, method)
            creds = self.credentials(names)
            if creds is None:
                raise GRPCError(Status.UNAVAILABLE, "no valid X.509-SVID is available yet")
            try:
                answer = fetch_answer(self.settings, request, creds, self.cache)
            except SdsRequestError as exc:
                raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
            self._log_missing(answer.selection.missing, (), caller, method)
            await self._send(stream, answer, caller, method)

    # ---- a stream ---------------------------------------------------------------------------------------

    async def _stream(
        self, stream: Stream[Any, Any], method: str, protocol: SotwStream | DeltaStream, parse: Callable[[bytes], Any]
    ) -> None:
        caller = await self.api.caller(stream, header=False)
        with self.api.admitted(caller):
            self.api.authorize(caller, method)
            waker = Waker()
            inbox = Inbox(waker)
            failure: GRPCError | None = None
            self.streams += 1
            try:
                self.api.policy_listeners.add(waker.wake)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read, stream, parse, inbox)
                    try:
                        await self._serve(stream, method, protocol, caller, inbox, waker, tg)
                    except GRPCError as exc:  # raised out of the task group, not wrapped in an ExceptionGroup
                        failure = exc
                    tg.cancel_scope.cancel()
            finally:
                self.api.policy_listeners.discard(waker.wake)
                self.streams -= 1
            if failure is not None:
                raise failure

    @staticmethod
    async def _read(stream: Stream[Any, Any], parse: Callable[[bytes], Any], inbox: Inbox) -> None:
        """Read the stream's requests into `inbox` until the client ends its side or breaks the rules."""
        timeout: float | None = REQUEST_TIMEOUT  # for the first request only
        try:
            while True:
                request = await read_message(stream, parse, limit=MAX_SDS_REQUEST_BYTES, timeout=timeout)
                if request is None:
                    inbox.end()
                    return
                timeout = None
                await inbox.put(request)
        except GRPCError as exc:
            inbox.end(exc)

    async def _serve(
        self,
        stream: Stream[Any, Any],
        method: str,
        protocol: SotwStream | DeltaStream,
        caller: Caller,
        inbox: Inbox,
        waker: Waker,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        """Take requests, answer them, and push after every change, until the client ends the call."""
        logged_missing: tuple[tuple[str, str], ...] = ()
        following: set[str] = set()
        while True:
            woken = waker.arm()  # anything from here on wakes the wait below
            for request in inbox.take():
                try:
                    received = protocol.receive(request)
                except SdsRequestError as exc:
                    raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
                self._log_received(received, caller, method, protocol.node)
            if inbox.error is not None:
                raise inbox.error
            if inbox.ended:
                return
            names = self.api.still_allowed(caller, method)
            for name in names:
                if name not in following:
                    following.add(name)
                    tg.start_soon(self._follow_identity, name, waker)
            answer = protocol.answer(self.credentials(names))
            logged_missing = self._log_missing(protocol.missing, logged_missing, caller, method)
            if answer is not None:
                await self._send(stream, answer, caller, method)
            await woken.wait()

    async def _follow_identity(self, name: str, waker: Waker) -> None:
        """Wake the stream on every state the identity's watcher publishes (the publication the Workload
        API's streams follow: `CredentialWatcher.wait_for_change`)."""
        watcher = self.api.watchers[name]
        version = 0
        while True:
            version = (await watcher.wait_for_change(version)).version
            waker.wake()

    async def _send(self, stream: Stream[Any, Any], answer: Answer, caller: Caller, method: str) -> None:
        identities = list(answer.selection.identities)
        resources = [r.name for r in answer.selection.resources]
        if identities:  # audited before the keys leave (see WorkloadApi._serve)
            marker = tuple(r.content for r in answer.selection.resources if r.identity)
            handout_audit(
                self.api.audited, "secrets pushed", caller, method, marker, route=method, identities=identities
            )
        log.debug(
            "SDS response sent",
            route=method,
            uid=caller.uid,
            resources=resources,
            removed=list(answer.removed),
            version=answer.version,
            nonce=answer.nonce,
        )
        await self.api.push(stream, answer.message, caller, identities, method)
        self.pushes += 1

    def _log_received(self, received: Received, caller: Caller, method: str, node: NodeFacts) -> None:
        fields: dict[str, Any] = {"route": method, "uid": caller.uid, "user": caller.user, "pid": caller.pid}
        fields.update(node=node.id, cluster=node.cluster)
        if received.stale:
            log.debug(
                "SDS request with a stale nonce ignored", nonce=received.nonce, expected=received.expected, **fields
            )
        if received.error is not None or received.rejected is not None:
            self.nacks += 1
            log.limited(
                "error",
                "Envoy rejected the secrets sent",
                key={"listener": "workload_api", "uid": caller.uid, "route": method},
                resources=logged_names(received.names),
                error=received.error,
                version=received.rejected,
                **{k: v for k, v in fields.items() if k not in ("route", "uid")},
            )

    @staticmethod
    def _log_missing(
        missing: tuple[tuple[str, str], ...], logged: tuple[tuple[str, str], ...], caller: Caller, method: str
    ) -> tuple[tuple[str, str], ...]:
        """Log requested names the caller has nothing for when that set changed; the set now logged."""
        if missing and missing != logged:
            log.limited(
                "warning",
                "SDS resources requested that this caller has no secret for; left out",
                key={"listener": "workload_api", "uid": caller.uid, "route": method, "what": "missing"},
                user=caller.user,
                resources=logged_names([name for name, _ in missing]),
                reasons=sorted({why for _, why in missing}),
            )
        return missing
