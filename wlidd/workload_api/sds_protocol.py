"""The xDS protocol of one SDS stream, sans I/O: requests in, what to log and what to send out.
State-of-the-world (StreamSecrets), incremental (DeltaSecrets) and FetchSecrets answers as pure state.

The stream layer (wlidd.workload_api.sds_service) feeds each request to `receive`, logs what it returns,
and after every request and every credential change asks `answer(credentials)` for the message to send,
if any. Nothing here reads a socket, a clock or a file; nonces come from an injected function.

State of the world (envoy api/envoy/service/discovery/v3/discovery.proto, DiscoveryRequest; the xDS
protocol's ACK/NACK; SPIRE pkg/agent/endpoints/sdsv3/handler.go StreamSecrets, lines 96-238 at ef8527e):
  - each response carries a fresh nonce; a request whose response_nonce is not the last one sent is stale
    and ignored whole (handler.go 158-168);
  - a request with the last nonce ACKs when its version_info is the version sent, else NACKs (the client
    kept an older version, handler.go 170-177); error_detail, when present, is always logged with the
    request's resource names (150-156);
  - a response is sent on the first request, whenever the set of requested names changes (186-193,
    `subListChanged`), and whenever the answer's content changes (`Selection.version`): a NACKed version
    is therefore not resent until its content changes, however many unrelated updates arrive;
  - the node is read from the first request that carries one and kept (178-181, 233-236);
  - no response before the caller has credentials (195-198), and none that would hold no resource (Envoy
    NACKs an empty SDS update: wlidd.workload_api.sds).

Incremental (the xDS protocol's "Incremental xDS"; DeltaDiscoveryRequest/Response; SPIRE answers
UNIMPLEMENTED, handler.go 256-258): names are subscribed and unsubscribed ("*" is the wildcard, and a first
request subscribing nothing is the legacy wildcard); initial_resource_versions says what a reconnecting
client already has; each resource carries its own version and is sent when the client does not have that
version; a subscribed name the caller has nothing for, or a resource it no longer has, is named once in
removed_resources. A NACK keeps the client on its older versions and nothing is resent until the content
changes (the versions sent are recorded whether ACKed or not).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]

from wlidd.errors import SdsRequestError
from wlidd.workload_api.sds import (
    MAX_NAMES,
    SECRET_TYPE_URL,
    Credentials,
    NodeFacts,
    SecretCache,
    Selection,
    check_names,
    check_type_url,
    digest,
    node_facts,
    select,
    spiffe_validation,
)
from wlidd.workload_api.sds_settings import SdsSettings

MAX_ERROR_TEXT = 1024  # characters of a client's error_detail message that are logged


def new_nonce() -> str:
    """A response nonce: 8 random bytes in hex (SPIRE uses 4, handler.go 623-630)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Received:
    """What one request said, for the stream to log: the names it concerns, whether it was stale (ignored),
    the version it NACKed (`rejected`), the client's error_detail message (cut to MAX_ERROR_TEXT)."""

    names: tuple[str, ...]
    stale: bool = False
    rejected: str | None = None
    error: str | None = None
    nonce: str = ""
    expected: str = ""  # the version (SotW) or nonce last sent, for the log line


@dataclass(frozen=True)
class Answer:
    """A response to send: the message (it holds private keys when `selection.identities` is not empty:
    never log it), what it answers, and its version and nonce."""

    message: Any = field(repr=False)  # it may hold private keys
    selection: Selection
    version: str
    nonce: str
    removed: tuple[str, ...] = ()


def _error_text(request: Any) -> str | None:
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
        self.node = NodeFacts()
        self.nonce = ""  # of the last response sent
        self.version = ""  # of the last response sent
        self.missing: tuple[tuple[str, str], ...] = ()  # requested names the caller has nothing for, and why
        self._force = False

    def __repr__(self) -> str:
        return f"SotwStream(names={self.names!r}, version={self.version!r}, nonce={self.nonce!r})"

    def receive(self, request: Any) -> Received:
        """Take one DiscoveryRequest. SdsRequestError for a request wlidd refuses (a foreign type_url,
        too many names)."""
        check_type_url(request.type_url)
        names = check_names(request.resource_names)
        error = _error_text(request)
        if self.nonce and request.response_nonce != self.nonce:
            return Received(names, stale=True, error=error, nonce=request.response_nonce, expected=self.nonce)
        rejected = None
        if self.nonce and (not request.version_info or request.version_info != self.version):
            rejected = self.version
        self.node = node_facts(request.node if request.HasField("node") else None, self.node)
        if self.names is None or _names_changed(self.names, names):
            self._force = True
        self.names = names
        return Received(names, rejected=rejected, error=error, nonce=request.response_nonce, expected=self.version)

    def answer(self, creds: Credentials | None) -> Answer | None:
        """The DiscoveryResponse to send now, or None (nothing requested yet, no credentials yet, nothing
        changed, or nothing the caller has)."""
        if self.names is None or creds is None:
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
        return Answer(message, selection, version, nonce)


def _names_changed(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """SPIRE's subListChanged (handler.go 240-254): a different count, or a name not asked for before."""
    return len(old) != len(new) or not set(new) <= set(old)


class DeltaStream:
    """One DeltaSecrets stream's protocol state (see the module docstring)."""

    def __init__(self, settings: SdsSettings, cache: SecretCache, nonces: Callable[[], str] = new_nonce) -> None:
        self.settings = settings
        self.cache = cache
        self.nonces = nonces
        self.started = False
        self.wildcard = False
        self.subscribed: dict[str, None] = {}  # an ordered set
        self.node = NodeFacts()
        self.has: dict[str, str] = {}  # name -> the version the client has (or was last sent)
        self.told_missing: set[str] = set()
        self.nonce = ""
        self.missing: tuple[tuple[str, str], ...] = ()  # subscribed names the caller has nothing for, and why
        self._last_names: tuple[str, ...] = ()  # what the last response held, for a NACK's log line

    def __repr__(self) -> str:
        return f"DeltaStream(subscribed={list(self.subscribed)!r}, wildcard={self.wildcard}, nonce={self.nonce!r})"

    def receive(self, request: Any) -> Received:
        """Take one DeltaDiscoveryRequest. SdsRequestError for a request wlidd refuses."""
        check_type_url(request.type_url)
        subscribe = check_names(request.resource_names_subscribe)
        unsubscribe = check_names(request.resource_names_unsubscribe)
        if not self.started:
            self.started = True
            self.wildcard = not subscribe  # the legacy wildcard
            if len(request.initial_resource_versions) > MAX_NAMES:
                raise SdsRequestError(f"more than {MAX_NAMES} initial_resource_versions")
            self.has.update(request.initial_resource_versions)
        for name in subscribe:
            if name == "*":
                self.wildcard = True
            elif name:
                self.subscribed[name] = None
                self.told_missing.discard(name)
        for name in unsubscribe:
            if name == "*":
                self.wildcard = False
            else:
                self.subscribed.pop(name, None)
                self.has.pop(name, None)
                self.told_missing.discard(name)
        if len(self.subscribed) > MAX_NAMES:
            raise SdsRequestError(f"more than {MAX_NAMES} resource names subscribed")
        self.node = node_facts(request.node if request.HasField("node") else None, self.node)
        error = _error_text(request)
        nonce = request.response_nonce
        if nonce and nonce != self.nonce:
            return Received(tuple(subscribe), stale=True, error=error, nonce=nonce, expected=self.nonce)
        rejected = ",".join(self._last_names) if nonce and error is not None else None
        return Received(self._last_names if nonce else tuple(subscribe), rejected=rejected, error=error, nonce=nonce)

    def answer(self, creds: Credentials | None) -> Answer | None:
        """The DeltaDiscoveryResponse to send now (resources the client lacks at their current version,
        names it should drop), or None."""
        if not self.started or creds is None:
            return None
        spiffe = spiffe_validation(self.settings, self.node)
        explicit = select(self.settings, list(self.subscribed), spiffe, creds) if self.subscribed else Selection(())
        self.missing = explicit.missing
        found = {r.name: r for r in explicit.resources}
        if self.wildcard:
            for resource in select(self.settings, [], spiffe, creds).resources:
                found.setdefault(resource.name, resource)
        changed = tuple(r for r in found.values() if self.has.get(r.name) != r.version)
        removed = [name for name in self.has if name not in found]
        removed += [n for n in self.subscribed if n not in found and n not in self.has and n not in self.told_missing]
        if not changed and not removed:
            return None
        nonce = self.nonces()
        for resource in changed:
            self.has[resource.name] = resource.version
        for name in removed:
            self.has.pop(name, None)
            if name in self.subscribed:
                self.told_missing.add(name)
        message = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=digest(tuple(sorted(self.has.items()))),
            type_url=SECRET_TYPE_URL,
            nonce=nonce,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=self.cache.packed(r)) for r in changed
            ],
            removed_resources=removed,
        )
        self.nonce = nonce
        self._last_names = tuple(r.name for r in changed)
        return Answer(message, Selection(changed, explicit.missing), message.system_version_info, nonce, tuple(removed))


def fetch_answer(settings: SdsSettings, request: Any, creds: Credentials, cache: SecretCache) -> Answer:
    """FetchSecrets: the DiscoveryResponse for one request, without version or nonce (handler.go 267-293,
    `buildResponse("", …)`); names the caller has nothing for are left out."""
    check_type_url(request.type_url)
    names = check_names(request.resource_names)
    node = node_facts(request.node if request.HasField("node") else None, NodeFacts())
    selection = select(settings, names, spiffe_validation(settings, node), creds)
    message = discovery_pb2.DiscoveryResponse(
        type_url=SECRET_TYPE_URL, resources=[cache.packed(r) for r in selection.resources]
    )
    return Answer(message, selection, "", "")
