"""A GCE-metadata-compatible API for one token source, so unmodified Google libraries work
(SPECS.md §5: what google-auth asks and expects). The tree it serves and the real server's directory rules:
wlidd.api.metadata_tree; the scope rule: wlidd.api.metadata_scopes.

Like the real server: no `Metadata-Flavor: Google` → 403, any `X-Forwarded-For` → 403; every answer
carries `Metadata-Flavor: Google` (the HTTP layer's own 400/408/413/431/503/505 too: `response_headers`);
JSON as application/json, plain values as application/text.

Scopes (`…/token?scopes=a,b`): see `covering_scope` and `uncovered_scopes`. Where the source impersonates a
service account, a request whose scope set differs from the token's gets a token minted with exactly those
scopes (TokenSource.scoped_token: IAM generateAccessToken, cached per scope set); elsewhere it is served the
token when the token's scopes cover each asked scope, the sign-in scopes aside (SIGN_IN_SCOPES), else
refused (400 naming the scopes).

ETags and waits (`?wait_for_change=true`, bounded): wlidd.api.metadata_wait.

Callers are loopback TCP peers, identified by the owner of their ESTABLISHED socket (wlidd.api.tcp_owner:
sock_diag, or /proc/self/net/tcp{,6}), found at accept or on the first request, and looked up again right
before a token is handed out: a socket that closed, half-closed or changed owner meanwhile gets 403, never
the answer (a closed socket would otherwise look like root). The token's [policy] rule decides, as on the
Unix socket. ID tokens and minted scoped tokens are rate-limited (429 with Retry-After; wlidd.tokens.manager).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from wlidd.api.authz import handout_audit
from wlidd.api.callers import CallerCache
from wlidd.api.messages import Request, Response
from wlidd.api.metadata_scopes import CLOUD_PLATFORM, parse_scopes, uncovered_scopes
from wlidd.api.metadata_tree import ACCOUNTS, FLAVOR, Directory, Endpoint, answer, metadata_route_template
from wlidd.api.metadata_tree import json_answer as _json  # short local names: most routes answer with them
from wlidd.api.metadata_tree import text_answer as _text
from wlidd.api.metadata_wait import Holds
from wlidd.api.tcp_owner import TcpOwner, run_lookup, verify_tcp_peer
from wlidd.clock import Clock
from wlidd.config import MetadataListenerConfig
from wlidd.errors import ApiError, InvalidValue, PeerRefused, RateLimited, TokenUnavailable, UpstreamError
from wlidd.logs import AuditOnce, get_logger
from wlidd.policy import Caller, Policy
from wlidd.tokens.manager import TokenSource

audit = get_logger("wlidd.audit")
log = get_logger("wlidd.api")


@dataclass(frozen=True)
class _Caller:
    """An authorized caller: the owner of its socket (uid, inode) and the caller it resolved to."""

    owner: TcpOwner
    caller: Caller


class MetadataApi:
    """Routes of the metadata emulation, bound to one token source."""

    response_headers = FLAVOR  # on every answer of the server this is the handler of (wlidd.api.server)

    def __init__(self, config: MetadataListenerConfig, source: TokenSource, policy: Policy, clock: Clock) -> None:
        self.config = config
        self._source = source
        self.policy = policy
        self.clock = clock
        self._callers = CallerCache()
        self._audited = AuditOnce()
        self._waits = Holds(config.max_connections, config.max_connections_per_caller)
        # Set by the daemon while it starts: why the source must not be asked yet (its identity's first load
        # still runs), else None. Token and ID-token requests then get the answer of an absent identity.
        self.held_back: Callable[[TokenSource], str | None] | None = None

    @property
    def source(self) -> TokenSource:
        """The token source served; setting it (a reload that replaced the source) wakes held waits."""
        return self._source

    @source.setter
    def source(self, source: TokenSource) -> None:
        self._source = source
        self.notify_changed()

    @property
    def held(self) -> int:
        """wait_for_change requests held now."""
        return self._waits.held

    def notify_changed(self) -> None:
        """What is served may have changed: held waits look at their value again now."""
        self._waits.notify_changed()

    def holds(self, request: Request) -> bool:
        """Whether answering `request` may take long (a wait_for_change): the HTTP layer then watches
        the connection meanwhile and drops the request when the client goes away (wlidd.api.server)."""
        return request.query.get("wait_for_change", [""])[-1].lower() == "true"

    def release_holds(self) -> None:
        """The server is stopping: every held wait answers now, and new ones are answered at once."""
        self._waits.release()

    @property
    def email(self) -> str:
        """The service account's email: configured, else the impersonated account, else `default`."""
        impersonate = self.source.config.impersonate
        return self.config.email or (impersonate.service_account if impersonate else None) or "default"

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes the served token carries (of the current source: a reload may replace it)."""
        return self.source.config.scopes()

    def route_template(self, path: str) -> str:
        """The route template a path falls under, or "other": the metrics labels are a fixed set."""
        return metadata_route_template(path)

    def tree(self) -> Directory:
        """What is served, as the directory tree the listings and recursive answers are made of."""
        config = self.config
        account = Directory(
            {
                "aliases": ("default",),
                "email": self.email,
                "identity": Endpoint.IDENTITY,
                "scopes": self.scopes,
                "token": Endpoint.TOKEN,
            },
            hidden=frozenset() if self.source.flow.mints_id_tokens else frozenset({"identity"}),
        )
        accounts = Directory(
            {"default": account} | ({self.email: account} if self.email != "default" else {}), named=True
        )
        numeric = int(config.numeric_project_id) if config.numeric_project_id.isdigit() else config.numeric_project_id
        v1 = Directory(
            {
                "instance": Directory({"service-accounts": accounts}),
                "project": Directory({"numeric-project-id": numeric, "project-id": config.project_id}),
                "universe": Directory({"universe-domain": config.universe_domain}),
            }
        )
        return Directory({"computeMetadata": Directory({"v1": v1})})

    async def __call__(self, request: Request) -> Response:
        if request.header("x-forwarded-for") is not None:
            return _text(403, "X-Forwarded-For is not allowed: requests must come from this host directly")
        if request.path != "/" and request.header("metadata-flavor") != "Google":
            return _text(403, 'Missing required header "Metadata-Flavor": "Google"')
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"GET only", "application/text", (*FLAVOR, ("allow", "GET, HEAD")))
        alt = request.query.get("alt", [""])[-1].lower()
        if alt not in ("", "json", "text"):
            return _text(400, "alt must be json or text")
        answer, watchable = self._answer(request, alt)
        wait = self.holds(request)
        if answer is Endpoint.TOKEN or answer is Endpoint.IDENTITY:
            if wait:
                return _text(
                    400,
                    f"wait_for_change is not served on the {answer.value} endpoint: a token is not a value to "
                    "watch (ask again when the one you hold nears its expiry)",
                )
            return await (self._token(request) if answer is Endpoint.TOKEN else self._identity(request))
        assert isinstance(answer, Response)
        if not wait or answer.status != 200:
            return answer
        if not watchable:
            return _text(400, "wait_for_change on a directory listing is not supported; add recursive=true")
        return await self._waits.wait(request, answer, lambda: self._answer(request, alt))

    def _answer(self, request: Request, alt: str) -> tuple[Response | Endpoint, bool]:
        """The answer for the request's path in what is served now (metadata_tree.answer), and whether it can
        be watched."""
        return answer(self.tree(), request, alt, self._not_served)

    def _not_served(self, path: str) -> str:
        if path.startswith(ACCOUNTS) and (account := path.removeprefix(ACCOUNTS).split("/")[0]) not in (
            "default",
            self.email,
        ):
            return f"service account {account!r} is not served here; only default = {self.email}"
        return "wlidd serves the directories and values listed under /computeMetadata/v1/"

    async def _token(self, request: Request) -> Response:
        if request.query.get("bindCertificateFingerprint"):
            return _text(400, "certificate-bound tokens (bindCertificateFingerprint) are not served by wlidd")
        try:
            asked = parse_scopes(request.query.get("scopes", []))
        except InvalidValue as exc:
            return _text(400, f"bad scopes: {exc}")
        source, granted = self.source, self.scopes
        mint = bool(asked) and source.config.impersonate is not None and set(asked) != set(granted)
        missing = uncovered_scopes(granted, asked)
        if missing and not mint:
            return _text(400, self._not_covered(missing, granted))
        try:
            caller = await self._authorize(request)
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        if (waiting := self._held_back(source)) is not None:
            return _text(503, waiting)
        try:
            token = (
                await source.scoped_token(asked, caller=caller.owner.uid, covered=not missing)
                if mint
                else await source.get()
            )
        except RateLimited as exc:
            return Response(
                429, exc.message.encode(), "application/text", (*FLAVOR, ("retry-after", str(exc.retry_after)))
            )
        except ApiError as exc:
            return _text(exc.http_status, exc.message, getattr(exc, "retry_after", None))
        except UpstreamError as exc:  # a mint failed: IAM refusing the scopes is the caller's 400, the rest 503
            status = 400 if exc.kind == "iam" and exc.status == 400 else 503
            return _text(status, f"no token with scopes {', '.join(asked)}: {exc.message}", exc.retry_after)
        try:
            await self._verify_peer(request, caller.owner)  # still held by the same process?
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        now = self.clock()
        subject = f"token {source.name}" + (f" scopes {','.join(sorted(asked))}" if mint else "")
        self._audit("token handed out", request, caller, subject, token.expire_time)
        return _json(
            200,
            {"access_token": token.value, "expires_in": max(0, int(token.seconds_left(now))), "token_type": "Bearer"},
        )

    def _held_back(self, source: TokenSource) -> str | None:
        """The 503 text while `source` must not be asked yet (the daemon starts), else None."""
        reason = self.held_back(source) if self.held_back is not None else None
        return None if reason is None else TokenUnavailable(source.name, reason).message

    def _not_covered(self, missing: list[str], granted: Sequence[str]) -> str:
        names = ", ".join(missing)
        how = (
            "a source that impersonates a service account (impersonate.service_account) mints tokens with the "
            "scopes asked for"
        )
        return (
            f"scope{'s' if len(missing) > 1 else ''} {names} {'are' if len(missing) > 1 else 'is'} not covered by "
            f"token {self.source.name!r}, which carries {', '.join(granted)} ({CLOUD_PLATFORM} covers the scopes "
            "of Google Cloud APIs, not those of Google Workspace or consumer APIs nor made-up names; sign-in scopes "
            f"are never refused); {how}"
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
            if (waiting := self._held_back(self.source)) is not None:
                return _text(503, waiting)
            token = await self.source.id_token(audience, caller=caller.owner.uid)
            await self._verify_peer(request, caller.owner)  # still held by the same process?
        except RateLimited as exc:
            return Response(
                429, exc.message.encode(), "application/text", (*FLAVOR, ("retry-after", str(exc.retry_after)))
            )
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        except UpstreamError as exc:
            return _text(503, f"no ID token: {exc.message}", exc.retry_after)
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
        decision = self.policy.may_have_token(caller, self.source.name)
        if decision.refusal is not None:
            key = {"listener": "metadata", "uid": uid}  # repeats are counted, not written (wlidd.logs)
            detail = decision.refusal
            audit.limited("warning", "access denied", key=key, route=request.path, user=caller.user, detail=detail)
            raise ApiError(403, "forbidden", decision.refusal)
        return _Caller(owner, caller)

    async def _verify_peer(self, request: Request, expected: TcpOwner | int | None) -> TcpOwner:
        """The owner of the calling socket, which must be ESTABLISHED, held by a process and (with
        `expected`) the same as before; PeerRefused (an ApiError 403) saying why otherwise. Inline while the
        lookup is a sock_diag query (microseconds), in a worker thread when it reads /proc (milliseconds)."""
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
            raise
