"""The incremental xDS protocol of one DeltaSecrets stream, sans I/O (the state-of-the-world one, and what
both share: wlidd.workload_api.sds_protocol).

The xDS protocol's "Incremental xDS" (envoy api/xds_protocol.rst; DeltaDiscoveryRequest/Response; SPIRE
answers UNIMPLEMENTED, handler.go 256-258 at ef8527e): names are subscribed and unsubscribed ("*" is the
wildcard, and a first request subscribing nothing is the legacy wildcard); initial_resource_versions says
what a reconnecting client already has; each resource carries its own version and is sent when the client
does not have that version; a subscribed name the caller has nothing for, or a resource it no longer has,
is named once in removed_resources, at most MAX_REMOVED_BYTES of names per response (the rest in the next
ones: `more`), so a response never grows with the client's names. A NACK is a request with error_detail,
counted once per response it rejects (`SentResponses`); an ACK, the last nonce without error_detail. A
NACK keeps the client on its older versions and nothing is resent until the content changes (the versions
sent are recorded whether ACKed or not). Subscriptions merge into the state as they come; a request that
would make it hold more than MAX_STATE_BYTES of client strings is refused.
"""

from __future__ import annotations

from collections.abc import Callable
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
from wlidd.workload_api.sds_protocol import (
    MAX_STATE_BYTES,
    Answer,
    Received,
    SentResponses,
    error_text,
    held_bytes,
    new_nonce,
)
from wlidd.workload_api.sds_settings import MAX_NAME_LENGTH, SdsSettings

MAX_REMOVED_BYTES = 2**16  # characters of names one DeltaSecrets response removes (the rest: the next ones)


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
        self.sent = SentResponses()
        self.missing: tuple[tuple[str, str], ...] = ()  # subscribed names the caller has nothing for, and why
        self.more = False  # the last answer left names to remove for the next (MAX_REMOVED_BYTES)

    def __repr__(self) -> str:
        return f"DeltaStream(subscribed={list(self.subscribed)!r}, wildcard={self.wildcard}, nonce={self.nonce!r})"

    @property
    def held_bytes(self) -> int:
        """The client's strings this state keeps (bytes, see the module docstring)."""
        return (
            held_bytes(self.subscribed)
            + held_bytes(self.has)
            + held_bytes(self.has.values())
            + held_bytes((self.node.id, self.node.cluster))
        )

    def receive(self, request: Any) -> Received:
        """Take one DeltaDiscoveryRequest. SdsRequestError for a request wlidd refuses (a foreign type_url,
        too many names or versions, a name or version too long, a state over MAX_STATE_BYTES)."""
        check_type_url(request.type_url)
        subscribe = self._subscribe(request)
        self.node = node_facts(request.node if request.HasField("node") else None, self.node)
        error = error_text(request)
        nonce = str(request.response_nonce)
        rejected = self.sent.nack(nonce) if error is not None else None
        concerns = self.sent.names(nonce)
        if concerns is None:
            concerns = subscribe
        nack = rejected is not None
        if nonce and nonce != self.nonce:
            return Received(
                concerns, stale=True, rejected=rejected, error=error, nonce=nonce, expected=self.nonce, nack=nack
            )
        ack = bool(nonce) and error is None
        return Received(concerns, rejected=rejected, error=error, nonce=nonce, expected=self.nonce, nack=nack, ack=ack)

    def _subscribe(self, request: Any) -> tuple[str, ...]:
        """Apply a request's initial versions (on the first), subscriptions and unsubscriptions; the names
        it subscribes. SdsRequestError past the limits."""
        subscribe = check_names(request.resource_names_subscribe)
        unsubscribe = check_names(request.resource_names_unsubscribe)
        if not self.started:
            self.started = True
            self.wildcard = not subscribe  # the legacy wildcard
            initial = dict(request.initial_resource_versions)
            if len(initial) > MAX_NAMES:
                raise SdsRequestError(f"more than {MAX_NAMES} initial_resource_versions")
            check_names(list(initial))
            if any(len(version) > MAX_NAME_LENGTH for version in initial.values()):
                raise SdsRequestError(f"an initial resource version longer than {MAX_NAME_LENGTH} characters")
            self.has.update(initial)
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
        if self.held_bytes > MAX_STATE_BYTES:
            raise SdsRequestError(f"resource names and versions of more than {MAX_STATE_BYTES} bytes subscribed")
        self.missing = ()  # `answer` finds them again (no unsubscribed name kept for it)
        return subscribe

    def answer(self, creds: Credentials | None) -> Answer | None:
        """The DeltaDiscoveryResponse to send now (resources the client lacks at their current version,
        names it should drop), or None."""
        self.more = False
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
        removed, self.more = _first_within(removed, MAX_REMOVED_BYTES)
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
        self.sent.add(nonce, message.system_version_info, tuple(r.name for r in changed))
        return Answer(message, Selection(changed, explicit.missing), message.system_version_info, nonce, tuple(removed))


def _first_within(names: list[str], limit: int) -> tuple[list[str], bool]:
    """The first of `names` whose characters add up to at most `limit` (at least one), and whether any is left."""
    total = 0
    for index, name in enumerate(names):
        total += len(name)
        if total > limit and index:
            return names[:index], True
    return names, False
