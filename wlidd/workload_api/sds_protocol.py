"""The xDS protocol of one SDS stream, sans I/O: requests in, what to log and what to send out.
State-of-the-world (StreamSecrets) and FetchSecrets answers as pure state, and what every stream shares.

The stream layer (wlidd.workload_api.sds_service) feeds each request to `receive`, logs what it returns,
and after every request and every credential change asks `answer(credentials)` for the message to send,
if any. Nothing here reads a socket, a clock or a file; nonces come from an injected function.

State of the world (envoy api/envoy/service/discovery/v3/discovery.proto, DiscoveryRequest; envoy
api/xds_protocol.rst "ACK/NACK and resource type instance version", "How the client specifies what resources
to return", "Unsubscribing From Resources"; SPIRE pkg/agent/endpoints/sdsv3/handler.go StreamSecrets, lines
96-238 at ef8527e):
  - each response carries a fresh nonce; a request whose response_nonce is not the last one sent is stale
    and ignored whole (handler.go 158-168);
  - a NACK is a request carrying error_detail ("Only the NACK should populate the error_detail"); it is
    counted (`Received.nack`) when it answers one of the last SENT_HISTORY responses the stream sent, once
    per nonce: a stale NACK of an earlier response counts, a nonce never sent does not, and the requests
    Envoy sends after a NACK (the nonce it NACKed, its last accepted version_info, no error_detail: e.g.
    a subscription change) are not NACKs. An ACK (`Received.ack`) is a request with the last nonce, no
    error_detail and the version sent as its version_info. error_detail, when present, is always
    reported with the resource names (handler.go 150-156);
  - the legacy wildcard (everything the caller has, handler.go 309-315) is a first request that names
    nothing, and holds while requests name nothing; once a request named a resource, an empty
    resource_names is an unsubscription from everything ("If the list of resource names becomes empty,
    that means that the client is no longer interested in any resources"): nothing is sent until names
    come again;
  - a response is sent on the first request, whenever the set of requested names changes (186-193,
    `subListChanged`), and whenever the answer's content changes (`Selection.version`): a NACKed version
    is therefore not resent until its content changes, however many unrelated updates arrive;
  - the node is read from the first request that carries one and kept (178-181, 233-236);
  - no response before the caller has credentials (195-198), and none that would hold no resource (Envoy
    NACKs an empty SDS update: wlidd.workload_api.sds).

Incremental (DeltaSecrets): wlidd.workload_api.sds_delta, on the same `Received`, `Answer` and
`SentResponses`.

Memory: a stream's state keeps the client's strings it needs (the names it asks for, the versions it says
it has), at most MAX_STATE_BYTES (`held_bytes`, by sys.getsizeof: what one request of at most 1 MiB can
carry); a request that would make it hold more is refused. Each request is taken into the state as
it comes (a newer SotW request supersedes the older, xds_protocol.rst "new DiscoveryRequests supersede any
prior DiscoveryRequests"; Delta's subscriptions merge), so a stream holds no queue of requests.
"""

from __future__ import annotations

import secrets
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]

from wlidd.errors import SdsRequestError
from wlidd.workload_api.sds import (
    SECRET_TYPE_URL,
    Credentials,
    NodeFacts,
    SecretCache,
    Selection,
    check_names,
    check_type_url,
    node_facts,
    select,
    spiffe_validation,
)
from wlidd.workload_api.sds_settings import SdsSettings

MAX_ERROR_TEXT = 1024  # characters of a client's error_detail message that are logged
MAX_STATE_BYTES = 5 * 2**18  # a stream's state: what one request of at most 1 MiB carries, with str overheads
SENT_HISTORY = 8  # responses a stream remembers (nonce, version, names) to judge a NACK that comes late


def new_nonce() -> str:
    """A response nonce: 8 random bytes in hex (SPIRE uses 4, handler.go 623-630)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Received:
    """What one request said, for the stream to log and count.

    names     the names it concerns: for a request answering a response this stream sent, the resources
              that response held; else the request's own (resource_names, or Delta's subscriptions)
    stale     it answers a response other than the last one sent (or none sent): ignored
    rejected  the version of the response a counted NACK rejects (SotW version_info, Delta
              system_version_info), else None
    error     its error_detail message, cut to MAX_ERROR_TEXT (any request that carries one)
    nack      a NACK to count: error_detail answering a response this stream sent, the first for its nonce
    ack       it accepts the last response (its nonce, no error_detail; SotW: the version sent)
    nonce     its response_nonce, as the client sent it (cut it before logging)
    expected  the version (SotW) or nonce (Delta, and stale requests) last sent, for the log line
    """

    names: tuple[str, ...]
    stale: bool = False
    rejected: str | None = None
    error: str | None = None
    nonce: str = ""
    expected: str = ""
    nack: bool = False
    ack: bool = False


@dataclass
class _Response:
    version: str
    names: tuple[str, ...]
    nacked: bool = False


class SentResponses:
    """The last SENT_HISTORY responses one stream sent, by nonce: what a NACK rejects, and whether that
    nonce was NACKed already (a NACK is counted once per nonce, and only for a response sent)."""

    def __init__(self, size: int = SENT_HISTORY) -> None:
        self.size = size
        self._by_nonce: OrderedDict[str, _Response] = OrderedDict()

    def __repr__(self) -> str:
        return f"SentResponses({list(self._by_nonce)!r})"

    def add(self, nonce: str, version: str, names: tuple[str, ...]) -> None:
        self._by_nonce[nonce] = _Response(version, names)
        while len(self._by_nonce) > self.size:
            self._by_nonce.popitem(last=False)

    def names(self, nonce: str) -> tuple[str, ...] | None:
        """The resource names of the response sent with `nonce`, None for a nonce not (or no longer) known."""
        sent = self._by_nonce.get(nonce)
        return None if sent is None else sent.names

    def nack(self, nonce: str) -> str | None:
        """The version of the response a NACK of `nonce` rejects, the first time that nonce is NACKed; None
        (not a NACK to count) for a nonce never sent, forgotten, or NACKed already."""
        sent = self._by_nonce.get(nonce)
        if sent is None or sent.nacked:
            return None
        sent.nacked = True
        return sent.version


def held_bytes(strings: Iterable[str]) -> int:
    """The memory these strings take (sys.getsizeof: characters and each object's header)."""
    return sum(sys.getsizeof(s) for s in strings)


@dataclass(frozen=True)
class Answer:
    """A response to send: the message (it holds private keys when `selection.identities` is not empty:
    never log it), what it answers, and its version and nonce."""

    message: Any = field(repr=False)  # it may hold private keys
    selection: Selection
    version: str
    nonce: str
    removed: tuple[str, ...] = ()


def error_text(request: Any) -> str | None:
    """A request's error_detail message, cut to MAX_ERROR_TEXT; None when it carries none."""
    if not request.HasField("error_detail"):
        return None
    return str(request.error_detail.message)[:MAX_ERROR_TEXT] or f"(code {request.error_detail.code}, no message)"


class SotwStream:
    """One StreamSecrets stream's protocol state (see the module docstring)."""

    def __init__(self, settings: SdsSettings, cache: SecretCache, nonces: Callable[[], str] = new_nonce) -> None:
        self.settings = settings
        self.cache = cache
        self.nonces = nonces
        self.names: tuple[str, ...] | None = None  # None until the first request
        self.wildcard = False  # the legacy wildcard: the first request named nothing, and none has since
        self.node = NodeFacts()
        self.nonce = ""  # of the last response sent
        self.version = ""  # of the last response sent
        self.sent = SentResponses()
        self.missing: tuple[tuple[str, str], ...] = ()  # requested names the caller has nothing for, and why
        self.more = False  # never: a state-of-the-world answer is whole
        self._force = False

    def __repr__(self) -> str:
        return f"SotwStream(names={self.names!r}, version={self.version!r}, nonce={self.nonce!r})"

    @property
    def held_bytes(self) -> int:
        """The client's strings this state keeps (bytes, see the module docstring)."""
        return held_bytes(self.names or ()) + held_bytes((self.node.id, self.node.cluster))

    def receive(self, request: Any) -> Received:
        """Take one DiscoveryRequest. SdsRequestError for a request wlidd refuses (a foreign type_url,
        too many names)."""
        check_type_url(request.type_url)
        names = check_names(request.resource_names)
        error = error_text(request)
        nonce = str(request.response_nonce)
        rejected = self.sent.nack(nonce) if error is not None else None
        concerns = self.sent.names(nonce) or names
        if self.nonce and nonce != self.nonce:
            return Received(
                concerns,
                stale=True,
                rejected=rejected,
                error=error,
                nonce=nonce,
                expected=self.nonce,
                nack=rejected is not None,
            )
        if held_bytes(names) > MAX_STATE_BYTES:
            raise SdsRequestError(f"resource names of more than {MAX_STATE_BYTES} bytes in one request")
        ack = bool(self.nonce) and error is None and request.version_info == self.version
        self.node = node_facts(request.node if request.HasField("node") else None, self.node)
        if self.names is None:
            self.wildcard = not names
        elif names:
            self.wildcard = False
        if self.names is None or _names_changed(self.names, names):
            self._force = True
        self.names = names
        self.missing = ()  # `answer` finds them again (no name of an older request kept for it)
        return Received(
            concerns,
            rejected=rejected,
            error=error,
            nonce=nonce,
            expected=self.version,
            nack=rejected is not None,
            ack=ack,
        )

    def answer(self, creds: Credentials | None) -> Answer | None:
        """The DiscoveryResponse to send now, or None (nothing requested yet, unsubscribed from everything,
        no credentials yet, nothing changed, or nothing the caller has)."""
        if self.names is None or creds is None:
            return None
        if not self.wildcard and not any(self.names):  # names came before: no name now is no resource
            self.missing = ()
            return None
        selection = select(self.settings, self.names, spiffe_validation(self.settings, self.node), creds)
        self.missing = selection.missing
        version = selection.version
        if not selection.resources or (version == self.version and not self._force):
            return None
        nonce = self.nonces()
        message = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=SECRET_TYPE_URL,
            nonce=nonce,
            resources=[self.cache.packed(r) for r in selection.resources],
        )
        self.version, self.nonce, self._force = version, nonce, False
        self.sent.add(nonce, version, tuple(r.name for r in selection.resources))
        return Answer(message, selection, version, nonce)


def _names_changed(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """SPIRE's subListChanged (handler.go 240-254): a different count, or a name not asked for before."""
    return len(old) != len(new) or not set(new) <= set(old)


def fetch_answer(settings: SdsSettings, request: Any, creds: Credentials, cache: SecretCache) -> Answer:
    """FetchSecrets: the DiscoveryResponse for one request, without version or nonce (handler.go 267-293,
    `buildResponse("", …)`); names the caller has nothing for are left out. No name at all asks for
    everything (handler.go 309-315); names that are all empty ask for nothing."""
    check_type_url(request.type_url)
    names = check_names(request.resource_names)
    node = node_facts(request.node if request.HasField("node") else None, NodeFacts())
    selection = select(settings, names, spiffe_validation(settings, node), creds) if any(names) or not names else None
    message = discovery_pb2.DiscoveryResponse(
        type_url=SECRET_TYPE_URL, resources=[cache.packed(r) for r in selection.resources] if selection else []
    )
    return Answer(message, selection or Selection(()), "", "")
