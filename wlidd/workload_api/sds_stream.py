"""One SDS stream's plumbing (wlidd.workload_api.sds_service): between its reader task and its loop, its
protocol state with the budget share and NACK verdict that go with it, and the log lines of what its client
said.

The reader takes each request into the protocol state itself (`StreamState.take`: nothing is queued), then
waits in `Inbox.put` until the loop begins its next pass (`Inbox.take`): it reads at most one request ahead
of the loop, and none while a push is held back. The loop sleeps on a `Waker`.

Log lines (`log_received`, `log_missing`) carry every client-chosen field cut to a fixed length: resource
names to LOGGED_NAME_LENGTH, at most LOGGED_NAMES of them (`logged_names`); node id and cluster to
LOGGED_NAME_LENGTH; nonces to LOGGED_NONCE_LENGTH; Envoy's error text to MAX_ERROR_TEXT (`clip`); and go
through the repeat limiter (wlidd.logs), keyed by listener, uid and method: a client repeating itself is
counted, not written.
"""

from __future__ import annotations

from typing import Any

import anyio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from wlidd.errors import SdsRequestError
from wlidd.logs import get_logger
from wlidd.policy import Caller
from wlidd.workload_api.sds import NodeFacts
from wlidd.workload_api.sds_budget import Share
from wlidd.workload_api.sds_counts import LOGGED_NAME_LENGTH, LOGGED_NAMES, SdsCounts, verdict
from wlidd.workload_api.sds_delta import DeltaStream
from wlidd.workload_api.sds_protocol import MAX_ERROR_TEXT, Received, SotwStream

log = get_logger("wlidd.workload_api")

LOGGED_NONCE_LENGTH = 64  # characters of a client's response_nonce a log line shows (wlidd's nonces have 16)


def clip(text: str, limit: int = LOGGED_NAME_LENGTH) -> str:
    """A client's text cut to `limit` characters for a log line (saying how much was cut)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def logged_names(names: Any) -> list[str]:
    """The first LOGGED_NAMES of a client's resource names, each cut short, for a log line of bounded size."""
    shown = [name[:LOGGED_NAME_LENGTH] for name in list(names)[:LOGGED_NAMES]]
    return shown + ([f"... {len(names) - LOGGED_NAMES} more"] if len(names) > LOGGED_NAMES else [])


class Waker:
    """What wakes one stream's loop: a request taken in, a new published state of one of its identities, a
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
    """Between a stream's reader task and its loop (see the module docstring); also whether the client
    ended its side (`ended`) or broke the protocol (`error`)."""

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self.ended = False
        self.error: GRPCError | None = None
        self._taken: anyio.Event | None = None  # made only while the reader waits for the loop

    async def put(self) -> None:
        """A request was taken into the state: wake the loop, and return once it began a pass after it."""
        taken = self._taken = anyio.Event()
        self.waker.wake()
        await taken.wait()

    def end(self, error: GRPCError | None = None) -> None:
        self.ended, self.error = True, error
        self.waker.wake()

    def take(self) -> None:
        """The loop begins a pass: the reader may read the next request."""
        if self._taken is not None:
            self._taken.set()
            self._taken = None


class StreamState:
    """One stream: its protocol state, caller and method, its share of the request budget, whether its
    client's last verdict on a response is a NACK (`nacked`: counted in `streams_nacked` meanwhile), and
    the missing names last logged (a hash: no client name kept for it)."""

    def __init__(
        self, method: str, protocol: SotwStream | DeltaStream, caller: Caller, share: Share, counts: SdsCounts
    ) -> None:
        self.method = method
        self.protocol = protocol
        self.caller = caller
        self.share = share
        self.counts = counts
        self.nacked = False
        self.logged_missing = 0

    def take(self, request: Any) -> None:
        """Take one request into the protocol state, charge the state's size, log and count what it said.
        GRPCError INVALID_ARGUMENT for a request wlidd refuses."""
        try:
            received = self.protocol.receive(request)
        except SdsRequestError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        self.share.set_state(self.protocol.held_bytes)
        log_received(received, self.caller, self.method, self.protocol.node)
        if received.nack:
            self.counts.nack(self.method, received.names)
        judged = verdict(received)
        if judged is not None and judged != self.nacked:
            self.nacked = judged
            self.counts.stream_nacked(self.method, 1 if judged else -1)

    def close(self) -> None:
        """The stream ended: it is no longer nacked, and holds nothing of the budget."""
        if self.nacked:
            self.nacked = False
            self.counts.stream_nacked(self.method, -1)
        self.share.close()


def log_received(received: Received, caller: Caller, method: str, node: NodeFacts) -> None:
    """Log what a request said: a stale nonce at debug, an error_detail at error (SPIRE handler.go 150-156:
    with the resource names), through the repeat limiter, client text cut."""
    fields: dict[str, Any] = {"user": caller.user, "pid": caller.pid}
    fields.update(node=clip(node.id), cluster=clip(node.cluster))
    if received.stale:
        log.limited(
            "debug",
            "SDS request with a stale nonce ignored",
            key={"listener": "workload_api", "uid": caller.uid, "route": method, "what": "stale"},
            nonce=clip(received.nonce, LOGGED_NONCE_LENGTH),
            expected=received.expected,
            **fields,
        )
    if received.error is not None:
        log.limited(
            "error",
            "Envoy rejected the secrets sent",
            key={"listener": "workload_api", "uid": caller.uid, "route": method},
            resources=logged_names(received.names),
            error=clip(received.error, MAX_ERROR_TEXT),
            version=received.rejected,
            nonce=clip(received.nonce, LOGGED_NONCE_LENGTH),
            **fields,
        )


def log_missing(missing: tuple[tuple[str, str], ...], logged: int, caller: Caller, method: str) -> int:
    """Log requested names the caller has nothing for when that set changed (`logged`: the hash of the set
    logged before, 0 for none); the hash of the set now logged."""
    if missing and hash(missing) != logged:
        log.limited(
            "warning",
            "SDS resources requested that this caller has no secret for; left out",
            key={"listener": "workload_api", "uid": caller.uid, "route": method, "what": "missing"},
            user=caller.user,
            resources=logged_names([name for name, _ in missing]),
            reasons=sorted({why for _, why in missing}),
        )
        return hash(missing)
    return logged if missing else 0
