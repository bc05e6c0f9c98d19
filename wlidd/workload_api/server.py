"""SpiffeWorkloadAPI service: FetchX509SVID and FetchX509Bundles stream the full state on every change.

Per call: the security header `workload.spiffe.io: true` (else InvalidArgument); the caller's uid/gid
from SO_PEERCRED, and the identities its [policy] credentials rules allow (none: PermissionDenied);
no valid SVID among them yet: Unavailable (clients retry). JWT methods: Unimplemented.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from typing import Any

import anyio
from cryptography.hazmat.primitives import serialization
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from wlidd.api.authz import Caller, CallerCache, Policy
from wlidd.logs import get_logger
from wlidd.metrics import Metrics
from wlidd.svid.load import Clock, iso_z
from wlidd.svid.model import TrustBundle
from wlidd.watch import CredentialWatcher, IdentityState
from wlidd.workload_api import workload_pb2 as pb

log = get_logger("wlidd.workload_api")
audit = get_logger("wlidd.audit")

SECURITY_HEADER = "workload.spiffe.io"


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


class WorkloadApi:
    """The grpclib service; one instance serves every connection."""

    def __init__(
        self, watchers: Mapping[str, CredentialWatcher], policy: Policy, clock: Clock, metrics: Metrics | None = None
    ) -> None:
        self.watchers = watchers
        self.policy = policy
        self.clock = clock
        self.metrics = metrics
        self._callers = CallerCache()
        self.streams = 0
        self.pushes = 0
        self.last_push: dict[str, str] = {}
        self._changed = anyio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {
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

    def status(self) -> dict[str, Any]:
        return {"streams": self.streams, "pushes": self.pushes, "last_push": dict(sorted(self.last_push.items()))}

    async def unimplemented(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "JWT-SVIDs are not served by wlidd: it distributes X.509-SVIDs")

    async def _caller(self, stream: Stream[Any, Any]) -> Caller:
        if stream.metadata is None or stream.metadata.get(SECURITY_HEADER) != "true":
            raise GRPCError(Status.INVALID_ARGUMENT, f"security header missing from request: {SECURITY_HEADER}: true")
        sock = stream.peer._transport.get_extra_info("socket") if stream.peer is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            raise GRPCError(Status.PERMISSION_DENIED, "the caller cannot be identified (not a Unix socket peer)")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return await self._callers.get(pid, uid, gid)

    def _allowed(self, caller: Caller) -> list[str]:
        return [
            name for name in self.watchers if self.policy.credentials(name).check(caller, f"identity {name!r}") is None
        ]

    def _states(self, names: list[str]) -> list[IdentityState]:
        now = self.clock()
        states = [self.watchers[n].current for n in names]
        return [s for s in states if s is not None and s.identity.svid.is_valid_at(now)]

    async def _stream(self, stream: Stream[Any, Any], method: str, render: Any) -> None:
        await stream.recv_message()
        caller = await self._caller(stream)
        names = self._allowed(caller)
        if not names:
            audit.warning("access denied", route=method, uid=caller.uid, user=caller.user, listener="workload_api")
            raise GRPCError(Status.PERMISSION_DENIED, f"{caller.describe()} may have no identity here")
        self.streams += 1
        if self.metrics is not None:
            self.metrics.workload_api_streams.set(self.streams)
        try:
            versions: tuple[int, ...] | None = None
            while True:
                states = self._states(names)
                if not states:
                    raise GRPCError(Status.UNAVAILABLE, "no valid X.509-SVID is available yet")
                current = tuple(s.version for s in states)
                if current != versions:
                    await stream.send_message(render(states))
                    versions = current
                    self.pushes += 1
                    now = self.clock()
                    for state in states:
                        self.last_push[state.name] = iso_z(now)
                        if self.metrics is not None:
                            self.metrics.workload_api_pushes.labels(state.name).inc()
                            self.metrics.workload_api_last_push.labels(state.name).set(now.timestamp())
                    audit.info(
                        "svids pushed",
                        route=method,
                        uid=caller.uid,
                        user=caller.user,
                        identities=[s.name for s in states],
                    )
                await self._wait_for_change(names)
        finally:
            self.streams -= 1
            if self.metrics is not None:
                self.metrics.workload_api_streams.set(self.streams)

    async def _wait_for_change(self, names: list[str]) -> None:
        async with anyio.create_task_group() as tg:

            async def one(name: str) -> None:
                watcher = self.watchers[name]
                await watcher.wait_for_change(watcher.current.version if watcher.current else 0)
                tg.cancel_scope.cancel()

            for name in names:
                tg.start_soon(one, name)

    async def fetch_x509_svid(self, stream: Stream[Any, Any]) -> None:
        await self._stream(stream, "FetchX509SVID", x509_svid_response)

    async def fetch_x509_bundles(self, stream: Stream[Any, Any]) -> None:
        await self._stream(stream, "FetchX509Bundles", x509_bundles_response)
