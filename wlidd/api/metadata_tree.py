"""The tree the metadata API serves, and its answers' shapes as the real server gives them (SPECS.md §5).

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
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from wlidd.api.messages import Request, Response

FLAVOR = (("metadata-flavor", "Google"), ("server", "Metadata Server for VM"))


V1 = "/computeMetadata/v1/"


ACCOUNTS = V1 + "instance/service-accounts/"


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


def as_json(node: Node) -> object:
    if isinstance(node, Directory):
        return {
            (name if node.named else _camel(name)): as_json(child)
            for name, child in node.entries.items()
            if not isinstance(child, Endpoint)
        }
    if isinstance(node, tuple):
        return list(node)
    return node


def text_lines(node: Directory, prefix: str = "") -> Iterator[str]:
    """`path value` lines of a recursive alt=text answer (a list: one line per item)."""
    for name, child in node.entries.items():
        path = prefix + name
        if isinstance(child, Directory):
            yield from text_lines(child, path + "/")
        elif isinstance(child, tuple):
            yield from (f"{path} {item}" for item in child)
        elif not isinstance(child, Endpoint):
            yield f"{path} {child}"


def value_text(value: Value) -> str:
    if isinstance(value, tuple):
        return "".join(item + "\n" for item in value)
    return str(value)


def listing(directory: Directory) -> str:
    return "".join(
        name + ("/" if isinstance(child, Directory) else "") + "\n"
        for name, child in directory.entries.items()
        if name not in directory.hidden
    )


def text_answer(status: int, text: str, retry_after: float | None = None) -> Response:
    """A text answer; `retry_after` (seconds, from a held or rate-limited token source) as Retry-After."""
    headers = FLAVOR if retry_after is None else (*FLAVOR, ("retry-after", str(max(1, math.ceil(retry_after)))))
    return Response(status, text.encode(), "application/text", headers)


def json_answer(status: int, document: object) -> Response:
    response = Response.json(status, document)
    return Response(status, response.body, "application/json", FLAVOR)


def etag(body: bytes) -> str:
    """The ETag of an answer: the first 16 hex digits of its body's SHA-256 (stable across restarts;
    the real server's ETags are 16 alphanumerics too)."""
    return hashlib.sha256(body).hexdigest()[:16]


def tagged(response: Response) -> Response:
    """`response` with its ETag header."""
    return Response(
        response.status, response.body, response.content_type, (*response.headers, ("etag", etag(response.body)))
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


def find_node(root: Directory, path: str) -> Node | None:
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
    r"/computeMetadata/v1/instance/service-accounts/[^/]+(?P<rest>/(?:aliases|email|identity|scopes|token)?)?"
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
    match = _ACCOUNT_ROUTE.fullmatch(path)
    if match is not None:
        return _ACCOUNT_TEMPLATE + (match["rest"] or "")
    return "other"


def answer(
    root: Directory, request: Request, alt: str, not_served: Callable[[str], str]
) -> tuple[Response | Endpoint, bool]:
    """The answer for the node of `root` at the request's path, or the endpoint (token, identity) that
    answers it; and whether it can be watched (wait_for_change: a value or a recursive directory)."""
    path = request.path
    node = find_node(root, path)
    if node is None:
        return text_answer(404, f"{path} is not served here ({not_served(path)})"), False
    if isinstance(node, Directory):
        if not path.endswith("/"):
            return redirect_to_directory(request, path), False
        recursive = request.query.get("recursive", [""])[-1].lower() == "true"
        if recursive and path.startswith(V1):
            if alt == "text":
                return tagged(text_answer(200, "".join(line + "\n" for line in text_lines(node)))), True
            return tagged(json_answer(200, as_json(node))), True
        return tagged(text_answer(200, listing(node))), False
    if path.endswith("/"):
        return text_answer(404, f"{path} is not a directory"), False
    if isinstance(node, Endpoint):
        return node, False
    if alt == "json":
        return tagged(json_answer(200, as_json(node))), True
    return tagged(text_answer(200, value_text(node))), True
