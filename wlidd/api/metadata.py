"""A GCE-metadata-compatible API for one token source, so unmodified Google libraries work
(SPECS.md §5: what google-auth asks and expects).

    GET /                                                         ping: 200 + Metadata-Flavor: Google
    GET /computeMetadata/v1/instance/service-accounts/default/?recursive=true   {aliases, email, scopes}
    GET /computeMetadata/v1/instance/service-accounts/default/token[?scopes=a,b] {access_token, expires_in, token_type}
    GET …/default/email, …/default/scopes, project/project-id, project/numeric-project-id, universe/universe-domain
    GET …/default/identity?audience=…                             404: this source mints no ID tokens

Like the real server: no `Metadata-Flavor: Google` → 403, any `X-Forwarded-For` → 403; every answer
carries `Metadata-Flavor: Google`; JSON as application/json, plain values as application/text.
Callers are loopback TCP peers, identified by the owner of their ESTABLISHED socket (wlidd.api.peers:
sock_diag, or /proc/self/net/tcp{,6}), found at accept or on the first request, and looked up again right
before a token is handed out: a socket that closed, half-closed or changed owner meanwhile gets 403, never
the answer (a closed socket would otherwise look like root). The token's [policy] rule decides, as on the
Unix socket. ID tokens are rate-limited per caller (429 with Retry-After; wlidd.tokens.manager).
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass

from wlidd.api.authz import Caller, CallerCache, Policy, handout_audit
from wlidd.api.peers import PeerRefused, TcpOwner, run_lookup, verify_tcp_peer
from wlidd.api.server import Request, Response
from wlidd.config import MetadataListenerConfig
from wlidd.errors import ApiError, UpstreamError
from wlidd.logs import AuditOnce, get_logger
from wlidd.svid.load import Clock
from wlidd.tokens.manager import RateLimited, TokenSource

audit = get_logger("wlidd.audit")

FLAVOR = (("metadata-flavor", "Google"), ("server", "Metadata Server for VM"))
_ACCOUNT = re.compile(r"^/computeMetadata/v1/instance/service-accounts/(?P<account>[^/]+)/(?P<rest>.*)$")


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode(), "application/text", FLAVOR)


@dataclass(frozen=True)
class _Caller:
    """An authorized caller: the owner of its socket (uid, inode) and the caller it resolved to."""

    owner: TcpOwner
    caller: Caller


def _json(status: int, document: object) -> Response:
    response = Response.json(status, document)
    return Response(status, response.body, "application/json", FLAVOR)


class MetadataApi:
    """Routes of the metadata emulation, bound to one token source."""

    def __init__(self, config: MetadataListenerConfig, source: TokenSource, policy: Policy, clock: Clock) -> None:
        self.config = config
        self.source = source
        self.policy = policy
        self.clock = clock
        impersonated = source.config.impersonate.service_account if source.config.impersonate else None
        self.email = config.email or impersonated or "default"
        self.scopes = source.config.scopes()
        self._callers = CallerCache()
        self._audited = AuditOnce()

    def route_template(self, path: str) -> str:
        """The route template a path falls under, or "other": the metrics labels are a fixed set."""
        return metadata_route_template(path)

    async def __call__(self, request: Request) -> Response:
        if request.header("x-forwarded-for") is not None:
            return _text(403, "X-Forwarded-For is not allowed: requests must come from this host directly")
        if request.path != "/" and request.header("metadata-flavor") != "Google":
            return _text(403, 'Missing required header "Metadata-Flavor": "Google"')
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"GET only", "application/text", (*FLAVOR, ("allow", "GET, HEAD")))
        path = request.path
        if path == "/":
            return _text(200, "computeMetadata/\n")
        if path == "/computeMetadata/v1/project/project-id":
            return _text(200, self.config.project_id)
        if path == "/computeMetadata/v1/project/numeric-project-id":
            return _text(200, self.config.numeric_project_id)
        if path == "/computeMetadata/v1/universe/universe-domain":
            return _text(200, self.config.universe_domain)
        match = _ACCOUNT.match(path)
        if match is None:
            return _text(
                404, f"{path} is not served here (wlidd serves the service-accounts, project and universe paths)"
            )
        if match["account"] not in ("default", self.email):
            return _text(404, f"service account {match['account']!r} is not served here (only default = {self.email})")
        rest = match["rest"]
        if rest == "" and request.query.get("recursive", [""])[0] == "true":
            return _json(200, {"aliases": ["default"], "email": self.email, "scopes": list(self.scopes)})
        if rest == "email":
            return _text(200, self.email)
        if rest == "scopes":
            return _text(200, "\n".join(self.scopes) + "\n")
        if rest == "aliases":
            return _text(200, "default\n")
        if rest == "token":
            return await self._token(request)
        if rest == "identity":
            return await self._identity(request)
        return _text(404, f"{path} is not served here")

    async def _token(self, request: Request) -> Response:
        requested = [s for scope in request.query.get("scopes", []) for s in scope.split(",") if s]
        missing = sorted(set(requested) - set(self.scopes))
        if missing:
            return _text(
                400, f"scopes {', '.join(missing)} are not granted to this token (it carries {', '.join(self.scopes)})"
            )
        if request.query.get("bindCertificateFingerprint"):
            return _text(400, "certificate-bound tokens (bindCertificateFingerprint) are not served by wlidd")
        try:
            caller = await self._authorize(request)
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        try:
            token = await self.source.get()
        except ApiError as exc:
            return _text(503, exc.message)
        try:
            await self._verify_peer(request, caller.owner)  # still held by the same process?
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        now = self.clock()
        self._audit("token handed out", request, caller, f"token {self.source.name}", token.expire_time)
        return _json(
            200,
            {"access_token": token.value, "expires_in": max(0, int(token.seconds_left(now))), "token_type": "Bearer"},
        )

    async def _identity(self, request: Request) -> Response:
        if not self.source.flow.mints_id_tokens:
            return _text(
                404,
                f"ID tokens are not available from token {self.source.name!r} (flow {self.source.config.flow} without "
                "impersonation); configure impersonate.service_account or a gce-metadata upstream",
            )
        audience = request.query.get("audience", [""])[0]
        if not audience:
            return _text(400, "audience is required: .../identity?audience=<aud>")
        try:
            caller = await self._authorize(request)
            token = await self.source.id_token(audience, caller=caller.owner.uid)
            await self._verify_peer(request, caller.owner)  # still held by the same process?
        except RateLimited as exc:
            return Response(
                429, exc.message.encode(), "application/text", (*FLAVOR, ("retry-after", str(exc.retry_after)))
            )
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        except UpstreamError as exc:
            return _text(503, f"no ID token: {exc.message}")
        self._audit("id token handed out", request, caller, audience, hash(token))
        return _text(200, token)

    def _audit(self, event: str, request: Request, caller: _Caller, subject: str, marker: Hashable) -> None:
        """One audit line per uid, subject (the token, an audience) and token handed out (`marker`):
        asking again for what it already holds adds nothing to the trail (authz.handout_audit)."""
        handout_audit(
            self._audited,
            event,
            caller.caller,
            subject,
            marker,
            route=request.path,
            source=self.source.name,
            listener="metadata",
        )

    async def _authorize(self, request: Request) -> _Caller:
        """The caller's socket owner (the one found at accept, still holding the socket, else looked up
        now) and its policy decision; ApiError 403 saying why otherwise."""
        peer = request.peer
        if peer.tcp_remote is None or peer.tcp_local is None:
            raise ApiError(403, "forbidden", "only loopback TCP callers are served here")
        accepted: TcpOwner | int | None = None
        if peer.uid is not None:  # identified at accept by the daemon's accept loop
            accepted = TcpOwner(peer.uid, peer.inode) if peer.inode is not None else peer.uid
        owner = await self._verify_peer(request, accepted)
        uid = owner.uid
        caller = await self._callers.get(None, uid, None)
        reason = self.policy.token(self.source.name).check(caller, f"token {self.source.name!r}")
        if reason is not None:
            key = {"listener": "metadata", "uid": uid}  # repeats are counted, not written (wlidd.logs)
            audit.limited("warning", "access denied", key=key, route=request.path, user=caller.user, detail=reason)
            raise ApiError(403, "forbidden", reason)
        return _Caller(owner, caller)

    async def _verify_peer(self, request: Request, expected: TcpOwner | int | None) -> TcpOwner:
        """The owner of the calling socket, which must be ESTABLISHED, held by a process and (with
        `expected`) the same as before; ApiError 403 saying why otherwise. Inline while the lookup is a
        sock_diag query (microseconds), in a worker thread when it reads /proc (milliseconds)."""
        remote, local = request.peer.tcp_remote, request.peer.tcp_local
        assert remote is not None and local is not None
        try:
            return await run_lookup(verify_tcp_peer, remote, local, expected)
        except PeerRefused as exc:
            audit.limited(
                "warning",
                "access denied",
                key={"listener": "metadata", "reason": "calling socket has no owner"},
                route=request.path,
                peer=request.peer.address,
                detail=exc.message,
            )
            raise ApiError(403, "forbidden", exc.message) from None


_METADATA_PATHS = frozenset(
    {
        "/",
        "/computeMetadata/v1/project/project-id",
        "/computeMetadata/v1/project/numeric-project-id",
        "/computeMetadata/v1/universe/universe-domain",
    }
)
_ACCOUNT_LEAVES = frozenset({"", "email", "scopes", "aliases", "token", "identity"})


def metadata_route_template(path: str) -> str:
    """A metadata path as a metrics label from a fixed set: the path itself for the fixed paths,
    ".../service-accounts/{account}/<leaf>" for the account paths, "other" for everything else."""
    if path in _METADATA_PATHS:
        return path
    match = _ACCOUNT.match(path)
    if match is not None and match["rest"] in _ACCOUNT_LEAVES:
        return "/computeMetadata/v1/instance/service-accounts/{account}/" + match["rest"]
    return "other"
