"""A GCE-metadata-compatible API for one token source, so unmodified Google libraries work
(SPECS.md §5: what google-auth asks and expects; the directory rules below are the real server's).

The tree wlidd serves (`{acct}` is `default` or the service account's email; nothing else is listed):

    /                                                   computeMetadata/            (ping: 200 + the flavor)
    /computeMetadata/                                   v1/
    /computeMetadata/v1/                                instance/ project/ universe/
    /computeMetadata/v1/instance/                       service-accounts/
    …/instance/service-accounts/                        default/ <email>/
    …/instance/service-accounts/{acct}/                 aliases email identity scopes token
    …/{acct}/aliases, email, scopes                     values (aliases, scopes: one per line)
    …/{acct}/token[?scopes=a,b]                         {access_token, expires_in, token_type}
    …/{acct}/identity?audience=…[&format=full]          an ID token (404 saying why where none can be minted)
    /computeMetadata/v1/project/                        numeric-project-id project-id
    /computeMetadata/v1/universe/                       universe-domain

Directories, as the real server answers them (sources: curl transcripts of the real server in
salrashid123/gce_metadata_server#3 and googleapis/gax-dotnet#410, googleapis/gcp-metadata#361, and a
real `?recursive=true&alt=text` dump in HackerOne report 1442118):
  - `dir/` is a text listing, one entry a line, subdirectories with a trailing `/` (lists such as
    `aliases` and `scopes` are values: no slash);
  - `dir` (no slash) is `301 Moved Permanently` to `dir/`, the query kept: `Location:
    http://<Host>/…/dir/`, `Content-Type: text/html`, body `/…/dir/` + newline. Clients follow it:
    gcp-metadata's detection probe is `GET /computeMetadata/v1/instance` (it needs a 2xx, after
    redirects, with `Metadata-Flavor: Google`), gsutil asks for `…/service-accounts`;
  - under /computeMetadata/v1, `dir/?recursive=true` is the whole subtree as JSON with camelCase keys
    (`serviceAccounts`, `numericProjectId`; service account names stay as they are), values typed
    (`numericProjectId` a number), the `token` and `identity` endpoints left out; with `alt=text`, one
    `path value` line per value (a list: one line per item), paths relative to `dir/`;
  - `alt=json` on a value answers it as JSON (a string, a list, a number); `alt=text` as text; `recursive`
    on a value changes nothing. A plain (non-recursive) listing is always text.

Like the real server: no `Metadata-Flavor: Google` → 403, any `X-Forwarded-For` → 403; every answer
carries `Metadata-Flavor: Google` (the HTTP layer's own 400/408/413/431/503 too: `response_headers`);
JSON as application/json, plain values as application/text.

Scopes (`…/token?scopes=a,b`): see `covering_scope`. Where the source impersonates a service account,
a request whose scope set differs from the token's gets a token minted with exactly those scopes
(TokenSource.scoped_token: IAM generateAccessToken, cached per scope set); elsewhere it is served the
token when the token's scopes cover each asked scope, else refused (400 naming the scopes).

Callers are loopback TCP peers, identified by the owner of their ESTABLISHED socket (wlidd.api.peers:
sock_diag, or /proc/self/net/tcp{,6}), found at accept or on the first request, and looked up again right
before a token is handed out: a socket that closed, half-closed or changed owner meanwhile gets 403, never
the answer (a closed socket would otherwise look like root). The token's [policy] rule decides, as on the
Unix socket. ID tokens and minted scoped tokens are rate-limited (429 with Retry-After; wlidd.tokens.manager).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode

from wlidd.api.authz import Caller, CallerCache, Policy, handout_audit
from wlidd.api.peers import PeerRefused, TcpOwner, run_lookup, verify_tcp_peer
from wlidd.api.server import Request, Response
from wlidd.config import MetadataListenerConfig
from wlidd.errors import ApiError, UpstreamError
from wlidd.logs import AuditOnce, get_logger
from wlidd.svid.load import Clock
from wlidd.tokens.manager import RateLimited, TokenSource
from wlidd.tokens.model import Token

audit = get_logger("wlidd.audit")
log = get_logger("wlidd.api")

FLAVOR = (("metadata-flavor", "Google"), ("server", "Metadata Server for VM"))
V1 = "/computeMetadata/v1/"
ACCOUNTS = V1 + "instance/service-accounts/"


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode(), "application/text", FLAVOR)


def _json(status: int, document: object) -> Response:
    response = Response.json(status, document)
    return Response(status, response.body, "application/json", FLAVOR)


# ---- the scope rule ------------------------------------------------------------------------------
GOOGLE_AUTH = "https://www.googleapis.com/auth/"
CLOUD_PLATFORM = GOOGLE_AUTH + "cloud-platform"
# Scope families under GOOGLE_AUTH (the name up to its first ".") that cloud-platform does not grant:
# Google Workspace and consumer APIs, which list only their own scopes in Google's scope table
# (https://developers.google.com/identity/protocols/oauth2/scopes; e.g. BigQuery's Drive tables need
# the drive scope besides cloud-platform: https://cloud.google.com/bigquery/docs/query-drive-data), and
# the sign-in scopes userinfo.email / userinfo.profile (like `openid`, `email`, `profile`, which lie
# outside GOOGLE_AUTH and so are never covered).
NOT_CLOUD_FAMILIES = frozenset(
    {
        "userinfo",
        "plus",
        "drive",
        "gmail",
        "calendar",
        "spreadsheets",
        "documents",
        "presentations",
        "forms",
        "script",
        "admin",
        "apps",
        "directory",
        "contacts",
        "user",
        "tasks",
        "keep",
        "chat",
        "meetings",
        "classroom",
        "groups",
        "ediscovery",
        "youtube",
        "youtubepartner",
        "yt-analytics",
        "yt-analytics-monetary",
        "photoslibrary",
        "analytics",
        "adwords",
        "adsense",
        "androidpublisher",
        "blogger",
        "books",
        "fitness",
        "webmasters",
        "siteverification",
        "indexing",
        "content",
        "dfp",
        "dfatrafficking",
        "ddmconversions",
        "doubleclickbidmanager",
        "doubleclicksearch",
        "display-video",
        "games",
        "streetviewpublish",
    }
)
READ_ONLY_SUFFIXES = (".readonly", ".read_only", ".read-only")
# Cloud Storage's scopes, each granting what those before it grant (Cloud Storage "OAuth 2.0 scopes").
STORAGE_LADDER = tuple(
    GOOGLE_AUTH + s for s in ("devstorage.read_only", "devstorage.read_write", "devstorage.full_control")
)
MAX_SCOPES = 32  # distinct scopes in one request
MAX_SCOPE_LENGTH = 512  # characters


def covering_scope(granted: Sequence[str], scope: str) -> str | None:
    """The scope among `granted` (what the served token carries) that covers `scope`, or None:
    - the scope itself;
    - `X` covers `X.readonly`, `X.read_only` and `X.read-only` (a read-only scope grants a subset);
    - a Cloud Storage scope covers the weaker ones (STORAGE_LADDER);
    - `cloud-platform` covers every `https://www.googleapis.com/auth/<name>` whose family (the name up to
      its first ".") is not in NOT_CLOUD_FAMILIES: it is the scope of all Google Cloud APIs (Compute
      Engine "Service accounts": with cloud-platform, IAM alone decides), not of Workspace, consumer or
      sign-in scopes.
    """
    if scope in granted:
        return scope
    for suffix in READ_ONLY_SUFFIXES:
        if scope.endswith(suffix) and (base := scope.removesuffix(suffix)) in granted:
            return base
    if scope in STORAGE_LADDER:
        for stronger in STORAGE_LADDER[STORAGE_LADDER.index(scope) :]:
            if stronger in granted:
                return stronger
    if CLOUD_PLATFORM in granted and scope.startswith(GOOGLE_AUTH):
        name = scope.removeprefix(GOOGLE_AUTH)
        if name and "/" not in name and name.split(".")[0] not in NOT_CLOUD_FAMILIES:
            return CLOUD_PLATFORM
    return None


def parse_scopes(values: Sequence[str]) -> tuple[str, ...]:
    """The scopes of `?scopes=a,b` (the parameter any number of times; items split at commas and
    whitespace), each once, in order. ValueError saying why: too many, too long, not printable ASCII."""
    scopes = list(dict.fromkeys(s for value in values for s in re.split(r"[,\s]+", value) if s))
    if len(scopes) > MAX_SCOPES:
        raise ValueError(f"{len(scopes)} scopes asked for; at most {MAX_SCOPES} are accepted")
    for scope in scopes:
        if len(scope) > MAX_SCOPE_LENGTH:
            raise ValueError(f"a scope of {len(scope)} characters; at most {MAX_SCOPE_LENGTH} are accepted")
        if not all(0x21 <= ord(c) <= 0x7E for c in scope):
            raise ValueError("a scope contains characters outside printable ASCII")
    return tuple(scopes)


# ---- the tree ------------------------------------------------------------------------------------
class Endpoint(enum.Enum):
    """Entries answered by a handler, not a value: listed, never part of a recursive answer."""

    TOKEN = "token"
    IDENTITY = "identity"


Value = str | int | tuple[str, ...]


@dataclass(frozen=True)
class Directory:
    """A directory: its entries in listing order. `named`: the entry names are names (service
    accounts), kept as they are in recursive JSON, not keys to camelCase. `hidden`: routed, not listed."""

    entries: Mapping[str, Directory | Value | Endpoint]
    named: bool = False
    hidden: frozenset[str] = field(default_factory=frozenset)


Node = Directory | Value | Endpoint


def _camel(key: str) -> str:
    """`numeric-project-id` → `numericProjectId` (the real server's recursive JSON keys)."""
    head, *rest = key.split("-")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _as_json(node: Node) -> object:
    if isinstance(node, Directory):
        return {
            (name if node.named else _camel(name)): _as_json(child)
            for name, child in node.entries.items()
            if not isinstance(child, Endpoint)
        }
    if isinstance(node, tuple):
        return list(node)
    return node


def _text_lines(node: Directory, prefix: str = "") -> Iterator[str]:
    """`path value` lines of a recursive alt=text answer (a list: one line per item)."""
    for name, child in node.entries.items():
        path = prefix + name
        if isinstance(child, Directory):
            yield from _text_lines(child, path + "/")
        elif isinstance(child, tuple):
            yield from (f"{path} {item}" for item in child)
        elif not isinstance(child, Endpoint):
            yield f"{path} {child}"


def _value_text(value: Value) -> str:
    if isinstance(value, tuple):
        return "".join(item + "\n" for item in value)
    return str(value)


def _listing(directory: Directory) -> str:
    return "".join(
        name + ("/" if isinstance(child, Directory) else "") + "\n"
        for name, child in directory.entries.items()
        if name not in directory.hidden
    )


_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def redirect_to_directory(request: Request, path: str) -> Response:
    """301 from `path` to `path/`, as the real server answers a directory asked for without its slash:
    an absolute Location on the Host the client used (a relative one when Host is missing or odd), the
    query kept; text/html body naming the target. `path` is one of the tree's (never caller text)."""
    target = path + "/"
    query = urlencode([(k, v) for k, values in request.query.items() for v in values], safe=",:/")
    host = request.header("host")
    base = f"http://{host}" if host is not None and _HOST.fullmatch(host) else ""
    location = base + target + (f"?{query}" if query else "")
    return Response(301, f"{target}\n".encode(), "text/html", (*FLAVOR, ("location", location)))


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
        self.source = source
        self.policy = policy
        self.clock = clock
        self._callers = CallerCache()
        self._audited = AuditOnce()

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
        path = request.path
        node = _find(self.tree(), path)
        if node is None:
            return _text(404, f"{path} is not served here ({self._not_served(path)})")
        if isinstance(node, Directory):
            if not path.endswith("/"):
                return redirect_to_directory(request, path)
            recursive = request.query.get("recursive", [""])[-1].lower() == "true"
            if recursive and path.startswith(V1):
                if alt == "text":
                    return _text(200, "".join(line + "\n" for line in _text_lines(node)))
                return _json(200, _as_json(node))
            return _text(200, _listing(node))
        if path.endswith("/"):
            return _text(404, f"{path} is not a directory")
        if node is Endpoint.TOKEN:
            return await self._token(request)
        if node is Endpoint.IDENTITY:
            return await self._identity(request)
        assert not isinstance(node, Endpoint)
        if alt == "json":
            return _json(200, _as_json(node))
        return _text(200, _value_text(node))

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
        except ValueError as exc:
            return _text(400, f"bad scopes: {exc}")
        source, granted = self.source, self.scopes
        mint = bool(asked) and source.config.impersonate is not None and set(asked) != set(granted)
        missing = [scope for scope in asked if covering_scope(granted, scope) is None]
        if missing and not mint:
            return _text(400, self._not_covered(missing, granted))
        try:
            caller = await self._authorize(request)
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        try:
            token = await self._scoped(asked, missing) if mint else await source.get()
        except RateLimited as exc:
            return Response(
                429, exc.message.encode(), "application/text", (*FLAVOR, ("retry-after", str(exc.retry_after)))
            )
        except ApiError as exc:
            return _text(exc.http_status, exc.message)
        except UpstreamError as exc:  # a mint failed: IAM refusing the scopes is the caller's 400, the rest 503
            status = 400 if exc.kind == "iam" and exc.status == 400 else 503
            return _text(status, f"no token with scopes {', '.join(asked)}: {exc.message}")
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

    async def _scoped(self, asked: tuple[str, ...], missing: list[str]) -> Token:
        """A token minted with exactly `asked`; when that fails and the source's own token covers every
        asked scope (`missing` is empty), that token instead: the caller may have it anyway by asking
        without scopes, and a client is better served by a broader token than by none."""
        source = self.source
        try:
            return await source.scoped_token(asked)
        except (UpstreamError, ApiError) as exc:
            if missing or isinstance(exc, RateLimited):
                raise
            log.warning(
                "scoped token not minted; serving the token, whose scopes cover the request",
                source=source.name,
                reason=exc.reason,
                detail=exc.message,
            )
            return await source.get()

    def _not_covered(self, missing: list[str], granted: Sequence[str]) -> str:
        names = ", ".join(missing)
        how = (
            "a source that impersonates a service account (impersonate.service_account) mints tokens with the "
            "scopes asked for"
        )
        return (
            f"scope{'s' if len(missing) > 1 else ''} {names} {'are' if len(missing) > 1 else 'is'} not covered by "
            f"token {self.source.name!r}, which carries {', '.join(granted)} ({CLOUD_PLATFORM} covers Google "
            f"Cloud API scopes, not Google Workspace, consumer or sign-in scopes); {how}"
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


def _find(root: Directory, path: str) -> Node | None:
    """The node at `path` (`/a/b` or `/a/b/`), or None. Empty segments (`//`) match nothing."""
    if not path.startswith("/"):
        return None
    node: Node = root
    inner = path[1:].removesuffix("/")
    for part in inner.split("/") if inner else ():
        if not isinstance(node, Directory) or part not in node.entries:
            return None
        node = node.entries[part]
    return node


_DIRECTORIES = (
    "/computeMetadata",
    V1.rstrip("/"),
    V1 + "instance",
    V1 + "project",
    V1 + "universe",
    ACCOUNTS.rstrip("/"),
)
_METADATA_PATHS = frozenset(
    {"/", V1 + "project/project-id", V1 + "project/numeric-project-id", V1 + "universe/universe-domain"}
    | {directory + slash for directory in _DIRECTORIES for slash in ("", "/")}
)
_ACCOUNT_ROUTE = re.compile(
    r"^/computeMetadata/v1/instance/service-accounts/[^/]+(?P<rest>/(?:aliases|email|identity|scopes|token)?)?$"
)
_ACCOUNT_TEMPLATE = ACCOUNTS + "{account}"
# Every label metadata_route_template gives besides "other" (for tests that check the label set).
METADATA_ROUTE_TEMPLATES = _METADATA_PATHS | {
    _ACCOUNT_TEMPLATE + rest for rest in ("", "/", "/aliases", "/email", "/identity", "/scopes", "/token")
}


def metadata_route_template(path: str) -> str:
    """A metadata path as a metrics label from a fixed set: the path itself for the fixed paths (the
    directories with and without their slash), ".../service-accounts/{account}[/<leaf>]" for the account
    paths, "other" for everything else."""
    if path in _METADATA_PATHS:
        return path
    match = _ACCOUNT_ROUTE.match(path)
    if match is not None:
        return _ACCOUNT_TEMPLATE + (match["rest"] or "")
    return "other"
