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
carries `Metadata-Flavor: Google` (the HTTP layer's own 400/408/413/431/503/505 too: `response_headers`);
JSON as application/json, plain values as application/text.

Scopes (`…/token?scopes=a,b`): see `covering_scope` and `uncovered_scopes`. Where the source impersonates a
service account, a request whose scope set differs from the token's gets a token minted with exactly those
scopes (TokenSource.scoped_token: IAM generateAccessToken, cached per scope set); elsewhere it is served the
token when the token's scopes cover each asked scope, the sign-in scopes aside (SIGN_IN_SCOPES), else
refused (400 naming the scopes).

ETags and waits (the real server's "wait for change", as its clients use it: Go's `metadata.Subscribe`,
the guest agent's watcher, google-cloud-dotnet's `WaitForChange`, Google's `compute/metadata` samples):
  - every value, listing and recursive answer carries `ETag: <16 hex digits>`, a hash of its body (the
    real server's form: google-cloud-dotnet validates ETags as `[a-zA-Z0-9]{16}`), so a directory's
    recursive and plain answers have different ETags, as on the real server;
  - `?wait_for_change=true` on a value or a recursive directory: with `last_etag` different from the
    current ETag (the guest agent's first `NONE`, the samples' `0`), the current answer at once; with the
    current one, or without `last_etag` (the real server then waits for the next change), the request is
    held until the answer's ETag changes (a reload that replaces the source: its scopes, its account) or
    `timeout_sec` (whole seconds; absent or larger: MAX_WAIT_SECONDS) passes, then answered with what is
    current; on a plain listing 400 (the real server refuses it: waits need `recursive=true` there); on the
    `token` and `identity` endpoints 400 (a token is not a value to watch: it changes on every refresh);
  - held requests are bounded: per caller uid max_connections_per_caller // 2 and per listener
    max_connections // 2 at once (beyond: 503 + Retry-After, from which Subscribe backs off), so waits can
    never take every connection; the HTTP layer keeps watching a held request's connection (`holds`) and
    drops it when the client goes away, and answers them all at once when the server stops
    (`release_holds`). A held request is "busy" to the HTTP layer: no idle deadline applies to it.

Callers are loopback TCP peers, identified by the owner of their ESTABLISHED socket (wlidd.api.peers:
sock_diag, or /proc/self/net/tcp{,6}), found at accept or on the first request, and looked up again right
before a token is handed out: a socket that closed, half-closed or changed owner meanwhile gets 403, never
the answer (a closed socket would otherwise look like root). The token's [policy] rule decides, as on the
Unix socket. ID tokens and minted scoped tokens are rate-limited (429 with Retry-After; wlidd.tokens.manager).
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode

import anyio

from wlidd.api.authz import Caller, CallerCache, Policy, handout_audit
from wlidd.api.peers import PeerRefused, TcpOwner, run_lookup, verify_tcp_peer
from wlidd.api.server import Request, Response
from wlidd.clock import Clock
from wlidd.config import MetadataListenerConfig
from wlidd.errors import ApiError, UpstreamError
from wlidd.logs import AuditOnce, get_logger
from wlidd.tokens.manager import RateLimited, TokenSource, TokenUnavailable

audit = get_logger("wlidd.audit")
log = get_logger("wlidd.api")

FLAVOR = (("metadata-flavor", "Google"), ("server", "Metadata Server for VM"))
V1 = "/computeMetadata/v1/"
ACCOUNTS = V1 + "instance/service-accounts/"


def _text(status: int, text: str, retry_after: float | None = None) -> Response:
    """A text answer; `retry_after` (seconds, from a held or rate-limited token source) as Retry-After."""
    headers = FLAVOR if retry_after is None else (*FLAVOR, ("retry-after", str(max(1, math.ceil(retry_after)))))
    return Response(status, text.encode(), "application/text", headers)


def _json(status: int, document: object) -> Response:
    response = Response.json(status, document)
    return Response(status, response.body, "application/json", FLAVOR)


def etag(body: bytes) -> str:
    """The ETag of an answer: the first 16 hex digits of its body's SHA-256 (stable across restarts;
    the real server's ETags are 16 alphanumerics too)."""
    return hashlib.sha256(body).hexdigest()[:16]


def _tagged(response: Response) -> Response:
    """`response` with its ETag header."""
    return Response(
        response.status, response.body, response.content_type, (*response.headers, ("etag", etag(response.body)))
    )


MAX_WAIT_SECONDS = 3600  # the longest a wait is held (absent or larger timeout_sec: this); wlidd's bound
RECHECK_SECONDS = 5.0  # a held request looks at its value again at least this often (besides notify_changed)
HOLD_RETRY_AFTER = 5  # seconds, on the 503 answering a wait beyond the hold caps


# ---- the scope rule ------------------------------------------------------------------------------
GOOGLE_AUTH = "https://www.googleapis.com/auth/"
CLOUD_PLATFORM = GOOGLE_AUTH + "cloud-platform"
# Scope families under GOOGLE_AUTH (the name up to its first ".") that cloud-platform does not grant:
# Google Workspace, advertising, Play and consumer APIs, which list only their own scopes in Google's
# scope table (https://developers.google.com/identity/protocols/oauth2/scopes; e.g. BigQuery's Drive
# tables need the drive scope besides cloud-platform: https://cloud.google.com/bigquery/docs/query-drive-data),
# and the sign-in family userinfo (see SIGN_IN_SCOPES). An API whose entry in that table lists
# cloud-platform (Cloud Identity, Firebase, every Cloud product) is not here.
NOT_CLOUD_FAMILIES = frozenset(
    {
        # sign-in
        "userinfo",
        "plus",
        # Google Workspace
        "admin",
        "apps",
        "appsmarketplace",
        "calendar",
        "chat",
        "classroom",
        "cloud_search",
        "contacts",
        "directory",
        "documents",
        "drive",
        "ediscovery",
        "forms",
        "gmail",
        "groups",
        "keep",
        "meetings",
        "postmaster",
        "presentations",
        "script",
        "spreadsheets",
        "tasks",
        "user",
        "workspace",
        # Chrome, Android and Play
        "androidenterprise",
        "androidmanagement",
        "androidpublisher",
        "chrome",
        "chromewebstore",
        "games",
        "playdeveloperreporting",
        "playintegrity",
        "verifiedaccess",
        # advertising, analytics and marketing
        "adexchange",
        "admob",
        "adsense",
        "adsensehost",
        "adwords",
        "analytics",
        "authorized-buyers-marketplace",
        "content",
        "datastudio",
        "ddmconversions",
        "dfareporting",
        "dfatrafficking",
        "dfp",
        "display-video",
        "display-video-mediaplanning",
        "display-video-user-management",
        "doubleclickbidmanager",
        "doubleclicksearch",
        "manufacturercenter",
        "realtime-bidding",
        "tagmanager",
        # consumer and other non-Cloud APIs
        "blogger",
        "books",
        "business",
        "fitness",
        "homegraph",
        "indexing",
        "photoslibrary",
        "photospicker",
        "sdm",
        "siteverification",
        "streetviewpublish",
        "tables",
        "travelpartner",
        "webmasters",
        "youtube",
        "youtubepartner",
        "youtubepartner-channel-audit",
        "yt-analytics",
        "yt-analytics-monetary",
    }
)
# The sign-in scopes: they add identity claims to a token (the account's email through tokeninfo and
# userinfo) and grant no API access. They never cause a refusal (`uncovered_scopes`): Terraform's Google
# provider asks cloud-platform + userinfo.email by default (its DefaultClientScopes), x/oauth2's
# ComputeTokenSource sends them as ?scopes=, and the real metadata server ignores scopes altogether.
SIGN_IN_SCOPES = frozenset(
    {"openid", "email", "profile", GOOGLE_AUTH + "userinfo.email", GOOGLE_AUTH + "userinfo.profile"}
)
# A scope name under GOOGLE_AUTH: "."-separated segments of lower-case letters, digits, "_" and "-"
# (every name in Google's scope table has this form: `devstorage.read_only`, `yt-analytics.readonly`,
# `cloud_search.query`).
SCOPE_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
# Families whose every scope wlidd knows (Google's scope table): a name in such a family, or one that
# begins with its name (`cloud-platformx`, `devstorage2.read`), is a scope only if it is listed here;
# anything else is a made-up name, covered by nothing but itself.
CLOSED_FAMILIES: Mapping[str, frozenset[str]] = {
    "cloud-platform": frozenset({"cloud-platform", "cloud-platform.read-only"}),
    "devstorage": frozenset({"devstorage.read_only", "devstorage.read_write", "devstorage.full_control"}),
}
READ_ONLY_SUFFIXES = (".readonly", ".read_only", ".read-only")
# Cloud Storage's scopes, each granting what those before it grant (Cloud Storage "OAuth 2.0 scopes").
STORAGE_LADDER = tuple(
    GOOGLE_AUTH + s for s in ("devstorage.read_only", "devstorage.read_write", "devstorage.full_control")
)
MAX_SCOPES = 32  # distinct scopes in one request
MAX_SCOPE_LENGTH = 512  # characters


def scope_name(scope: str) -> str | None:
    """The name of a well-formed scope under GOOGLE_AUTH (`devstorage.read_only`), or None: outside
    GOOGLE_AUTH, not of SCOPE_NAME's form, or a made-up name in a closed family (CLOSED_FAMILIES)."""
    if not scope.startswith(GOOGLE_AUTH):
        return None
    name = scope.removeprefix(GOOGLE_AUTH)
    if SCOPE_NAME.fullmatch(name) is None:
        return None
    family = name.split(".")[0]
    for closed, names in CLOSED_FAMILIES.items():
        if family.startswith(closed) and name not in names:
            return None
    return name


def covering_scope(granted: Sequence[str], scope: str) -> str | None:
    """The scope among `granted` (what the served token carries) that covers `scope`, or None:
    - the scope itself;
    - and for a well-formed scope name under GOOGLE_AUTH (`scope_name`; anything else is covered by
      itself only):
      - `X` covers `X.readonly`, `X.read_only` and `X.read-only` (a read-only scope grants a subset);
      - a Cloud Storage scope covers the weaker ones (STORAGE_LADDER);
      - `cloud-platform` covers every name whose family (up to its first ".") is not in
        NOT_CLOUD_FAMILIES: it is the scope of all Google Cloud APIs (Compute Engine "Service accounts":
        with cloud-platform, IAM alone decides), not of Workspace, consumer or sign-in scopes.
    """
    if scope in granted:
        return scope
    name = scope_name(scope)
    if name is None:
        return None
    for suffix in READ_ONLY_SUFFIXES:
        if scope.endswith(suffix) and (base := scope.removesuffix(suffix)) in granted:
            return base
    if scope in STORAGE_LADDER:
        for stronger in STORAGE_LADDER[STORAGE_LADDER.index(scope) :]:
            if stronger in granted:
                return stronger
    if CLOUD_PLATFORM in granted and name.split(".")[0] not in NOT_CLOUD_FAMILIES:
        return CLOUD_PLATFORM
    return None


def uncovered_scopes(granted: Sequence[str], asked: Sequence[str]) -> list[str]:
    """The scopes of `asked` that nothing in `granted` covers (`covering_scope`), in order; the sign-in
    scopes (SIGN_IN_SCOPES) are never among them: a token without them is what the real metadata server
    hands out for them too."""
    return [scope for scope in asked if scope not in SIGN_IN_SCOPES and covering_scope(granted, scope) is None]


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
        self._source = source
        self.policy = policy
        self.clock = clock
        self._callers = CallerCache()
        self._audited = AuditOnce()
        self._changed: anyio.Event | None = None  # made by the first wait (an Event needs a running loop)
        self._closing = False
        self._holds: dict[int | None, int] = {}  # held wait_for_change requests per caller uid
        self.max_holds = max(1, config.max_connections // 2)
        self.max_holds_per_caller = max(1, config.max_connections_per_caller // 2)
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
        return sum(self._holds.values())

    def notify_changed(self) -> None:
        """What is served may have changed: held waits look at their value again now."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def holds(self, request: Request) -> bool:
        """Whether answering `request` may take long (a wait_for_change): the HTTP layer then watches
        the connection meanwhile and drops the request when the client goes away (wlidd.api.server)."""
        return request.query.get("wait_for_change", [""])[-1].lower() == "true"

    def release_holds(self) -> None:
        """The server is stopping: every held wait answers now, and new ones are answered at once."""
        self._closing = True
        self.notify_changed()

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
        return await self._wait_for_change(request, alt, answer)

    def _answer(self, request: Request, alt: str) -> tuple[Response | Endpoint, bool]:
        """The answer for the tree's node at the request's path, or the endpoint (token, identity) that
        answers it; and whether it can be watched (wait_for_change: a value or a recursive directory)."""
        path = request.path
        node = _find(self.tree(), path)
        if node is None:
            return _text(404, f"{path} is not served here ({self._not_served(path)})"), False
        if isinstance(node, Directory):
            if not path.endswith("/"):
                return redirect_to_directory(request, path), False
            recursive = request.query.get("recursive", [""])[-1].lower() == "true"
            if recursive and path.startswith(V1):
                if alt == "text":
                    return _tagged(_text(200, "".join(line + "\n" for line in _text_lines(node)))), True
                return _tagged(_json(200, _as_json(node))), True
            return _tagged(_text(200, _listing(node))), False
        if path.endswith("/"):
            return _text(404, f"{path} is not a directory"), False
        if isinstance(node, Endpoint):
            return node, False
        if alt == "json":
            return _tagged(_json(200, _as_json(node))), True
        return _tagged(_text(200, _value_text(node))), True

    async def _wait_for_change(self, request: Request, alt: str, answer: Response) -> Response:
        """`answer` (the current one) at once when `last_etag` names another ETag; else the first answer
        whose ETag differs from the current one, or the current answer once `timeout_sec` passed (module
        docstring: the real server's wait_for_change, bounded)."""
        raw_timeout = request.query.get("timeout_sec", [str(MAX_WAIT_SECONDS)])[-1]
        if not raw_timeout.isdigit() or not raw_timeout.isascii():
            return _text(400, f"timeout_sec must be a whole number of seconds, not {raw_timeout[:32]!r}")
        digits = raw_timeout.lstrip("0") or "0"
        timeout = MAX_WAIT_SECONDS if len(digits) > 5 else min(int(digits), MAX_WAIT_SECONDS)
        current = dict(answer.headers)["etag"]
        last = request.query.get("last_etag", [None])[-1]
        if (last is not None and last != current) or self._closing:
            return answer
        uid = request.peer.uid
        if self._holds.get(uid, 0) >= self.max_holds_per_caller or self.held >= self.max_holds:
            who = f"uid {uid}" if uid is not None else "unidentified callers"
            return Response(
                503,
                f"too many wait_for_change requests held (for {who} at most {self.max_holds_per_caller}, for "
                f"everyone at most {self.max_holds}); retry later".encode(),
                "application/text",
                (*FLAVOR, ("retry-after", str(HOLD_RETRY_AFTER))),
            )
        self._holds[uid] = self._holds.get(uid, 0) + 1
        try:
            deadline = anyio.current_time() + timeout
            while not self._closing and (left := deadline - anyio.current_time()) > 0:
                if self._changed is None:
                    self._changed = anyio.Event()
                with anyio.move_on_after(min(left, RECHECK_SECONDS)):
                    await self._changed.wait()
                now, _ = self._answer(request, alt)
                if not isinstance(now, Response) or now.status != 200 or dict(now.headers).get("etag") != current:
                    return now if isinstance(now, Response) else _text(404, f"{request.path} is no longer a value")
                answer = now
            return answer
        finally:
            held = self._holds.pop(uid, 1) - 1
            if held:
                self._holds[uid] = held

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
