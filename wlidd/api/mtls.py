"""The mTLS listener: the identity's current SVID on the server side (hot: rotations need no
restart), a client certificate required, and callers admitted by their SPIFFE ID.

Client chains are verified by OpenSSL against the union of the configured bundles; then wlidd checks
what OpenSSL cannot: the leaf is a valid X509-SVID and its chain ends at an anchor of the bundle of
the leaf's *own* trust domain (one domain's CA cannot mint another's IDs). Then the listener's
`allow` matchers (wlidd.policy.may_use_listener), then the per-token/identity `spiffe_ids` of [policy].
"""

from __future__ import annotations

import dataclasses
import ssl

import anyio
from anyio.abc import AnyByteStream, SocketAttribute
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wlidd.api.messages import Handler, Request, Response
from wlidd.errors import SvidError
from wlidd.logs import get_logger
from wlidd.policy import may_use_listener
from wlidd.svid.spiffeid import Matcher, SpiffeId
from wlidd.svid.validate import check_leaf
from wlidd.watch import CredentialWatcher

log = get_logger("wlidd.mtls")
audit = get_logger("wlidd.audit")


def handshake_failure_reason(exc: BaseException) -> str:
    """A stable, bounded name for why a TLS handshake failed: OpenSSL's reason code
    (`CERTIFICATE_VERIFY_FAILED`, `WRONG_VERSION_NUMBER`, …) or the exception's type name."""
    reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
    return str(reason)[:100]


def report_handshake_failure(exc: BaseException, peer: str = "") -> None:
    """Log a failed mTLS handshake: a line per reason until it repeats at a caller's rate, then a
    count (`wlidd.logs.RepeatLimiter`: `repeated=<n>` when the window ends). `peer` ("host:port")
    is written with the lines that pass; it is not part of the key (every connection has its own
    port). For every path that runs a handshake on the mTLS listener."""
    log.limited(
        "info",
        "tls handshake failed",
        key={"listener": "mtls", "reason": handshake_failure_reason(exc)},
        peer=peer,
        detail=str(exc)[:200],
    )


class QuietTLSListener(TLSListener):
    """A TLS listener whose handshake failures are logged by `report_handshake_failure`."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: AnyByteStream) -> None:
        try:
            address = stream.extra(SocketAttribute.remote_address)
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        except (anyio.TypedAttributeLookupError, OSError):
            peer = ""
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        report_handshake_failure(exc, peer)


class MtlsGate:
    """Wraps the local API: identify the TLS peer, admit it by SPIFFE ID, pass it on."""

    def __init__(self, api: Handler, watcher: CredentialWatcher, allow: tuple[Matcher, ...]) -> None:
        self.api = api
        self.watcher = watcher
        self.allow = allow
        # (identity version, leaf, anchor) → verdict: a new state (new bundles) decides afresh
        self._known: dict[tuple[int, bytes, bytes], SpiffeId | str] = {}

    def route(self, request: Request) -> tuple[str, Handler]:
        """The wrapped API's route for `request` — its template is the metrics label (wlidd.api.server) —
        answered through this gate; "other" and the gate itself when the API does not route."""
        route = getattr(self.api, "route", None)
        if route is None:
            return "other", self
        template, handler = route(request)
        return str(template), lambda request: self._admit(request, handler)

    def identify(self, leaf_der: bytes, anchor_der: bytes) -> SpiffeId | str:
        """The peer's SPIFFE ID, or why it is refused."""
        state = self.watcher.current
        if state is None:
            return "no identity loaded to check callers against"
        key = (state.version, leaf_der, anchor_der)
        known = self._known.get(key)
        if known is not None:
            return known
        try:
            spiffe_id, _ = check_leaf(x509.load_der_x509_certificate(leaf_der))
        except SvidError as exc:
            result: SpiffeId | str = f"client certificate is not a valid X509-SVID: {exc.message}"
        except ValueError:
            result = "client certificate cannot be parsed"
        else:
            bundle = state.identity.bundles.get(spiffe_id.trust_domain)
            anchors = {c.public_bytes(serialization.Encoding.DER) for c in bundle.authorities} if bundle else set()
            if anchor_der not in anchors:
                result = f"the chain of {spiffe_id} does not lead to the {spiffe_id.trust_domain!r} bundle (another trust domain's CA)"
            else:
                result = spiffe_id
        if len(self._known) > 4096:
            self._known.clear()
        self._known[key] = result
        return result

    async def __call__(self, request: Request) -> Response:
        return await self._admit(request, self.api)

    async def _admit(self, request: Request, handler: Handler) -> Response:
        """`handler`'s answer to an admitted peer (its SPIFFE ID on the request), else 403 with the reason."""
        peer = request.peer
        if peer.certificate is None or not peer.verified_chain:
            return Response.error(403, "forbidden", "a client certificate is required")
        identity = self.identify(peer.certificate, peer.verified_chain[-1])
        if isinstance(identity, str):
            # the reason names the refused certificate, which chains to a configured bundle: bounded
            key = {"listener": "mtls", "detail": identity[:300]}
            audit.limited("warning", "access denied", key=key, route=request.path, peer=peer.address)
            return Response.error(403, "forbidden", identity)
        decision = may_use_listener(identity, self.allow)
        if decision.refusal is not None:
            key = {"listener": "mtls", "spiffe_id": str(identity)}
            audit.limited("warning", "access denied", key=key, route=request.path, detail=decision.refusal)
            return Response.error(403, "forbidden", decision.refusal)
        return await handler(dataclasses.replace(request, peer=dataclasses.replace(peer, spiffe_id=str(identity))))
