"""Envoy's Secret Discovery Service on the Workload API's gRPC server: the streams' I/O.
StreamSecrets, DeltaSecrets and FetchSecrets, driven by the watchers' published states and the policy.

Per call, as for the Workload API (wlidd.workload_api.server) but without its security header, which
Envoy does not send: the caller from its connection's kernel credentials; its open calls counted against
the listener's `max_calls_per_caller` (RESOURCE_EXHAUSTED beyond); the identities its [policy] credentials
rules allow (none: PERMISSION_DENIED, audited). Then the requests, each at most MAX_SDS_REQUEST_BYTES (an
Envoy node lists every extension it was built with: tens of KB): the first whole within REQUEST_TIMEOUT,
each later one whenever the client likes, but once its first byte came, its prefix and (once there is room
for it, below) its body within REQUEST_TIMEOUT each, else DEADLINE_EXCEEDED: a half-sent request is not
held.

A stream's protocol state is a `SotwStream` or `DeltaStream` (wlidd.workload_api.sds_protocol and
sds_delta, pure), in a `StreamState` with its budget share (wlidd.workload_api.sds_stream). A reader task
of its own reads each request and takes it into that state at once (a newer state-of-the-world request
supersedes the older; Delta's subscriptions merge), logs and counts what it said, and then waits (`Inbox`)
until the stream's loop has begun a pass after it, so it reads at most one request ahead of the loop: while
a push is held back, reading stops and HTTP/2 flow control holds the client back. The loop is
woken (`Waker`) by the reader, by every new published state of the caller's identities
(`CredentialWatcher.wait_for_change`: the publication FetchX509SVID streams follow, no watcher of its own),
from one small task per identity that lives as long as the stream (none is made per wake-up: a rotation
pushed to a thousand streams makes no task), and by every policy reload (`WorkloadApi.policy_listeners`).
Before each push the policy is checked again; a push that holds keys is sent through `WorkloadApi.push`,
which stops it the moment a reload revokes them (or after SEND_TIMEOUT, 30 s, unread).

Memory held for a caller's SDS calls (`budget`, wlidd.workload_api.sds_budget), worst cases:
  - per call: its state, at most MAX_STATE_BYTES (1.25 MiB; an Envoy's: a few hundred bytes); the request
    it is reading, at most MAX_SDS_REQUEST_BYTES (1 MiB), from its length prefix until it is parsed; the
    answer it is pushing (a few KB of secrets; a DeltaSecrets answer also names back at most 64 KiB of
    names, sds_protocol.MAX_REMOVED_BYTES) and its encoding, for as long as the client holds it back
    (SEND_TIMEOUT, 30 s). A FetchSecrets call holds no request while its response waits. Its unread DATA
    is bounded by its connection's HTTP/2 window (64 KiB, shared by the connection's streams). And the
    call itself: ~45 KB (tasks, grpclib and h2 stream state).
  - per uid: PER_CALLER_BYTES (16 MiB) of states, requests being read and encodings being written, by any
    number of calls (a read or push waits for room: nothing is refused); over it, what is charged at once
    (a state replacing the request it came from; an answer as built, ~0.1 MB a call at most), 64 KiB of
    unread DATA per connection (16: 1 MiB) and ~45 KB a call: ~30 MB for 64 calls. Before: the inbox (4
    parsed requests), one being read and one being answered, ~8 MB a call held for SEND_TIMEOUT, ~0.5 GB
    for a uid's 64 calls.
  - in all: TOTAL_BYTES (64 MiB), 64 KiB of unread DATA per connection (256: 16 MiB), one request being
    parsed at a time (its bytes, the message and its names: ~4 MiB), and per call what is charged at once
    and ~45 KB: ~85 MB and ~0.15 MB a call.
  Measured (RSS growth of `wlidd run`; calls of nobody and other uids with HTTP/2 windows of 0, sending
  requests of 1 MiB, 1,000 names of 1,000 characters, as fast as the daemon reads them, until it read
  nothing for 3 s): 12 calls (tests.test_sds_breaker, test_sds_limits): 16.6 MB StreamSecrets, 16.1 MB
  DeltaSecrets (before: 98 MB, 132 MB); one uid's 64 calls on 16 connections: 21.7 MB, 21.1 MB, FetchSecrets
  19.9 MB (before: 425 MB, 605 MB); 6 uids' 384 calls: 89.8 MB, 93.0 MB, of which 17.9 MB is the calls
  themselves (the same calls with Envoy-sized requests).

Logged (wlidd.workload_api.sds_stream), every client-chosen field cut to a fixed length and through the
repeat limiter: a client's error_detail at error with the resource names (SPIRE handler.go 150-156); a
request with a stale nonce at debug; requested names the caller has nothing for, at warning, when that set
changes. Every hand-out of a key in the audit log ("secrets pushed": once per identity and certificate for
a caller, whatever names it asks it by: `handout_audit` with `what` the method and identity and the
certificate's fingerprint as marker). Never a secret: messages that hold keys are not logged or printed.

Counted in `counts` (wlidd.workload_api.sds_counts: /v1/status workload_api.sds and the wlidd_sds_* metrics).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
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
from wlidd.clock import Clock
from wlidd.errors import SdsRequestError
from wlidd.logs import AuditOnce, get_logger
from wlidd.metrics import Metrics
from wlidd.policy import Caller
from wlidd.status import SdsStatus
from wlidd.watch import CredentialWatcher, IdentityState
from wlidd.workload_api.calls import REQUEST_TIMEOUT, read_message
from wlidd.workload_api.sds import Credentials, SecretCache, Selection, credentials_of
from wlidd.workload_api.sds_budget import RequestBudget, Share
from wlidd.workload_api.sds_counts import SdsCounts
from wlidd.workload_api.sds_delta import DeltaStream
from wlidd.workload_api.sds_protocol import Answer, SotwStream, fetch_answer, held_bytes
from wlidd.workload_api.sds_settings import SdsSettings
from wlidd.workload_api.sds_stream import Inbox, StreamState, Waker, log_missing, logged_names

log = get_logger("wlidd.workload_api")
audit = get_logger("wlidd.audit")

SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"
MAX_SDS_REQUEST_BYTES = 2**20  # a DiscoveryRequest's largest declared size (Envoy's node lists its extensions)
ROOM_TIMEOUT = 30.0  # seconds a push may wait for room in its caller's budget (as WorkloadApi.push for its window)


class WorkloadCalls(Protocol):
    """What SDS uses of the Workload API's service (wlidd.workload_api.server.WorkloadApi): its callers,
    admission, policy decisions, published states, and its revocation-watched push."""

    watchers: Mapping[str, CredentialWatcher]
    audited: AuditOnce
    clock: Clock
    metrics: Metrics | None
    policy_listeners: set[Callable[[], None]]  # each called on every policy reload

    async def caller(self, stream: Stream[Any, Any], *, header: bool = True) -> Caller: ...

    def admitted(self, caller: Caller) -> AbstractContextManager[None]: ...

    def authorize(self, caller: Caller, method: str) -> list[str]: ...

    def still_allowed(self, caller: Caller, method: str) -> list[str]: ...

    def valid_states(self, names: list[str]) -> list[IdentityState]: ...

    async def push(
        self, stream: Stream[Any, Any], message: Any, caller: Caller, names: list[str], method: str
    ) -> None: ...


class SecretDiscovery:
    """envoy.service.secret.v3.SecretDiscoveryService for `api`'s callers, identities and policy (`api`: the
    WorkloadApi whose server registers this service's `__mapping__`); `budget`: the request bytes its calls
    may hold (wlidd.workload_api.sds_budget)."""

    def __init__(self, api: WorkloadCalls, settings: SdsSettings, budget: RequestBudget | None = None) -> None:
        self.api = api
        self.settings = settings
        self.cache = SecretCache()
        self.budget = budget if budget is not None else RequestBudget()
        self._credentials: OrderedDict[tuple[tuple[str, int], ...], Credentials] = OrderedDict()
        self.counts = SdsCounts(api.metrics, api.clock)

    def __repr__(self) -> str:
        return f"SecretDiscovery({self.counts!r})"

    @property
    def streams(self) -> int:
        return self.counts.streams

    @property
    def pushes(self) -> int:
        return self.counts.pushes

    @property
    def nacks(self) -> int:
        return self.counts.nacks

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

    def status(self) -> SdsStatus:
        """The SDS part of /v1/status (wlidd.status.SdsStatus): counts and the last NACK, no key material."""
        return self.counts.status()

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
            share = self.budget.share(caller.uid)
            request = await read_message(stream, parse, limit=MAX_SDS_REQUEST_BYTES, room=share.reading)
            names = self.api.still_allowed(caller, method)
            creds = self.credentials(names)
            if creds is None:
                raise GRPCError(Status.UNAVAILABLE, "no valid X.509-SVID is available yet")
            try:
                answer = fetch_answer(self.settings, request or discovery_pb2.DiscoveryRequest(), creds, self.cache)
            except SdsRequestError as exc:
                raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
            del request  # nothing of it is held while the response waits for the client
            log_missing(answer.selection.missing, 0, caller, method)
            answer = dataclasses.replace(answer, selection=Selection(answer.selection.resources))
            await self._send(stream, answer, caller, method, share)

    # ---- a stream ---------------------------------------------------------------------------------------

    async def _stream(
        self, stream: Stream[Any, Any], method: str, protocol: SotwStream | DeltaStream, parse: Callable[[bytes], Any]
    ) -> None:
        caller = await self.api.caller(stream, header=False)
        with self.api.admitted(caller):
            self.api.authorize(caller, method)
            waker = Waker()
            inbox = Inbox(waker)
            state = StreamState(method, protocol, caller, self.budget.share(caller.uid), self.counts)
            failure: GRPCError | None = None
            self.counts.stream(method, 1)
            try:
                self.api.policy_listeners.add(waker.wake)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read, stream, parse, state, inbox)
                    try:
                        await self._serve(stream, state, inbox, waker, tg)
                    except GRPCError as exc:  # raised out of the task group, not wrapped in an ExceptionGroup
                        failure = exc
                    tg.cancel_scope.cancel()
            finally:
                self.api.policy_listeners.discard(waker.wake)
                state.close()
                self.counts.stream(method, -1)
            if failure is not None:
                raise failure

    @staticmethod
    async def _read(stream: Stream[Any, Any], parse: Callable[[bytes], Any], state: StreamState, inbox: Inbox) -> None:
        """Read the stream's requests and take each into its state, one ahead of the loop at most, until the
        client ends its side or breaks the rules (see the module docstring)."""
        timeout: float | None = REQUEST_TIMEOUT  # for the first request only
        try:
            while True:
                request = await read_message(
                    stream,
                    parse,
                    limit=MAX_SDS_REQUEST_BYTES,
                    timeout=timeout,
                    rest_timeout=REQUEST_TIMEOUT,
                    room=state.share.reading,
                )
                if request is None:
                    inbox.end()
                    return
                timeout = None
                state.take(request)
                del request  # only the state keeps what it needs of it
                await inbox.put()
        except GRPCError as exc:
            inbox.end(exc)

    async def _serve(
        self, stream: Stream[Any, Any], state: StreamState, inbox: Inbox, waker: Waker, tg: anyio.abc.TaskGroup
    ) -> None:
        """Answer the state after every request taken in, and push after every change, until the client ends
        the call."""
        caller, method = state.caller, state.method
        following: set[str] = set()
        while True:
            woken = waker.arm()  # anything from here on wakes the wait below
            inbox.take()
            if inbox.error is not None:
                raise inbox.error
            if inbox.ended:
                return
            names = self.api.still_allowed(caller, method)
            for name in names:
                if name not in following:
                    following.add(name)
                    tg.start_soon(self._follow_identity, name, waker)
            await self._answer(stream, state, names)
            if state.protocol.more:  # a DeltaSecrets answer left names to remove: the next pass sends them
                waker.wake()
            await woken.wait()

    async def _answer(self, stream: Stream[Any, Any], state: StreamState, names: list[str]) -> None:
        """One pass: the answer to the state now, if any, sent (its own frame: nothing of it is kept once
        sent, while the stream waits for the next wake-up)."""
        caller, method, protocol = state.caller, state.method, state.protocol
        answer = protocol.answer(self.credentials(names))
        state.logged_missing = log_missing(protocol.missing, state.logged_missing, caller, method)
        if answer is not None:
            await self._send(stream, answer, caller, method, state.share)

    async def _follow_identity(self, name: str, waker: Waker) -> None:
        """Wake the stream on every state the identity's watcher publishes (the publication the Workload
        API's streams follow: `CredentialWatcher.wait_for_change`)."""
        watcher = self.api.watchers[name]
        version = 0
        while True:
            version = (await watcher.wait_for_change(version)).version
            waker.wake()

    async def _send(self, stream: Stream[Any, Any], answer: Answer, caller: Caller, method: str, share: Share) -> None:
        """Audit, log and push one answer, charged to the call's `share` meanwhile: the answer as built (the
        message, and the client's names it refers to: a DeltaSecrets answer names back the ones the caller
        has nothing for) at once, and its encoding (twice the message's size: grpclib's send_message keeps
        it with and without its prefix) once that fits, within ROOM_TIMEOUT (else DEADLINE_EXCEEDED). A
        reload that took any of its identities meanwhile ends the call with PERMISSION_DENIED, as one during
        the push does (WorkloadApi.push)."""
        identities = list(answer.selection.identities)
        size = answer.message.ByteSize()
        built = size + held_bytes({*answer.removed, *(name for name, _ in answer.selection.missing)})
        with share.sending(built):
            with anyio.move_on_after(ROOM_TIMEOUT):
                await share.room(2 * size)
            if not share.fits(2 * size):
                raise GRPCError(
                    Status.DEADLINE_EXCEEDED,
                    f"no room for a push within {ROOM_TIMEOUT:g} s: this caller's SDS calls hold what they may",
                )
            lost = [name for name in identities if name not in self.api.still_allowed(caller, method)]
            if lost:  # a reload while the push waited for room
                audit.warning("access revoked", route=method, uid=caller.uid, user=caller.user, listener="workload_api")
                raise GRPCError(Status.PERMISSION_DENIED, f"{caller.describe()} may no longer have {', '.join(lost)}")
            self._announce(answer, caller, method)
            with share.sending(2 * size):
                await self.api.push(stream, answer.message, caller, identities, method)
        self.counts.pushed(method)

    def _announce(self, answer: Answer, caller: Caller, method: str) -> None:
        """The audit lines and the debug line of a push, before its keys leave (see WorkloadApi._serve): once
        per identity and certificate for this caller, whatever names it asks them by and however many
        streams it opens (wlidd.logs.AuditOnce)."""
        for resource in answer.selection.handed_out:
            handout_audit(
                self.api.audited,
                "secrets pushed",
                caller,
                f"{method} {resource.identity}",
                resource.fingerprint,
                route=method,
                identities=[resource.identity],
                serial=resource.svid.serial if resource.svid is not None else None,
            )
        log.debug(
            "SDS response sent",
            route=method,
            uid=caller.uid,
            resources=logged_names([r.name for r in answer.selection.resources]),
            removed=logged_names(answer.removed),
            version=answer.version,
            nonce=answer.nonce,
        )
