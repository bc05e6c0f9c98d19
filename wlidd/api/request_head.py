"""A request head to a `Request`: the hot path's parser, and what every head goes through after it.

The hot path takes the requests nearly every client sends (GET or HEAD, HTTP/1.1, printable ASCII, one
Host, no body) with one regex per line (`parse_simple_request`); anything else goes to h11 unchanged
(wlidd.api.connection), so this parser only needs to be stricter than h11, never more lenient.

Rules applied to every request, from either parser (`make_request`):
  - an absolute-form target (`GET http://host/path?q HTTP/1.1`, RFC 9112 §3.2.2: a server MUST accept it)
    is served as its path and query, with the target's authority as the request's Host (the RFC: the Host
    header, still required of HTTP/1.1 clients, is then ignored);
  - the path is percent-decoded, the query parsed (blank values kept), header names lower-cased.
A request head with bare-LF line endings is refused at once (RFC 9112 §2.2 lets a server accept them; we
do not guess): `BARE_LF` finds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from wlidd.api.messages import Request
from wlidd.api.peers import Peer

if TYPE_CHECKING:  # h11 reads only what this parser leaves (wlidd.api.connection), imported there
    import h11

BARE_LF = re.compile(rb"(?<!\r)\n")
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://(?P<authority>[^/?#]*)(?P<rest>[^#]*)")
_SIMPLE_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1")
_SIMPLE_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[!-~](?:[ -~\t]*[!-~])?)?)[ \t]*")


def parse_simple_request(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bool] | None:
    """The request head of the hot path (GET or HEAD, HTTP/1.1, printable ASCII, exactly one Host, no
    body headers) as (method, target, headers with lower-case names, close); None for anything else,
    which goes to h11 unchanged. Stricter than h11 everywhere, so it accepts nothing h11 would refuse."""
    lines = head.split(b"\r\n")
    first = _SIMPLE_REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    for line in lines[1:]:
        field = _SIMPLE_FIELD.fullmatch(line)
        if field is None:
            return None
        name, value = field.group(1).lower(), field.group(2)
        if name == b"content-length" or name == b"transfer-encoding":
            return None
        if name == b"host":
            hosts += 1
        headers.append((name, value))
    if hosts != 1:
        return None
    return first.group(1), first.group(2), headers, _asks_to_close(headers)


def _asks_to_close(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def keep_alive(event: h11.Request) -> bool:
    """Whether the client of an h11-read request keeps the connection open after the answer."""
    return not _asks_to_close(event.headers) and event.http_version != b"1.0"


def make_request(
    method: bytes,
    target_bytes: bytes,
    raw_headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    peer: Peer,
    listener: str,
) -> Request:
    """The Request of a parsed head (either parser's) and its body, from `peer` on `listener`."""
    target = target_bytes.decode("latin-1")
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw_headers)
    absolute = None if target.startswith("/") else _ABSOLUTE_FORM.fullmatch(target)  # origin form: no match
    if absolute is not None:  # RFC 9112 §3.2.2: the target's authority replaces the Host header
        authority = absolute["authority"].rpartition("@")[2]
        target = absolute["rest"] if absolute["rest"].startswith("/") else "/" + absolute["rest"]
        headers = tuple((k, authority if k == "host" else v) for k, v in headers)
    path, _, query = target.partition("?")
    return Request(
        method=method.decode("ascii", "replace"),
        path=unquote(path) or "/",
        query=parse_qs(query, keep_blank_values=True) if query else {},
        headers=headers,
        body=body,
        peer=peer,
        listener=listener,
    )
