"""A small client for applications: tokens and credentials from the local wlidd over its Unix socket.

    from wlidd.client import Client
    token = Client().get_token("gcp").access_token          # sync
    async with AsyncClient() as c: creds = await c.get_credentials("default")

Errors are ClientError with the daemon's status, stable code and message (never a secret); an answer that
does not have the shape of its document (a missing field, a wrong type) is ClientError `bad_response` naming
the field, never a KeyError or TypeError. `status()` is the typed /v1/status document (wlidd.status.Status).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from wlidd.accounts import group_name, owner_names, user_name
from wlidd.errors import ClientError as ClientError  # defined with every error; applications import it here
from wlidd.errors import InvalidValue
from wlidd.status import Status, parse_json

DEFAULT_SOCKET = Path("/run/wlidd/wlidd.sock")


def default_socket() -> Path:
    return Path(os.environ.get("WLIDD_SOCKET", str(DEFAULT_SOCKET)))


@dataclass(frozen=True)
class TokenInfo:
    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    expire_time: dt.datetime


@dataclass(frozen=True)
class Credentials:
    spiffe_id: str
    serial: str
    not_after: dt.datetime
    chain_pem: str
    key_pem: str = field(repr=False)
    bundle_pem: str
    federated_bundles_pem: dict[str, str]


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        document = None
    if response.status_code != 200:
        code = document.get("error", "error") if isinstance(document, dict) else "error"
        message = (
            document.get("message", response.text.strip()) if isinstance(document, dict) else response.text.strip()
        )
        raise ClientError(response.status_code, str(code), f"wlidd answered {response.status_code}: {message}")
    if not isinstance(document, dict):
        raise ClientError(response.status_code, "bad_response", "wlidd answered without a JSON object")
    return document


T = TypeVar("T")


def _parsed(kind: type[T], document: dict[str, Any], what: str) -> T:
    """`document` as `kind` (wlidd.status.parse_json); ClientError `bad_response` naming the field that does
    not fit (never a value: a token or a key may be in the document)."""
    try:
        return parse_json(kind, document, what)
    except InvalidValue as exc:
        raise ClientError(200, "bad_response", f"wlidd answered a malformed {what}: {exc.message}") from None


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError under an httpx error (httpx wraps httpcore's, which wraps the socket's), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def access_denied_message(path: Path) -> str:
    """Why this process may not connect to the Unix socket at `path` (connect(2) gave EACCES or EPERM),
    naming owner, group and mode of what shuts it out: the first directory on the way it may not search,
    else the socket itself. Connecting needs search (x) on every directory and write (w) on the socket
    (unix(7), "Pathname socket ownership and permissions")."""
    path = Path(os.path.abspath(path))
    uid = os.geteuid()
    you = f"you (uid {uid} {user_name(uid)})"
    for directory in reversed(path.parents):
        if not os.access(directory, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            return f"permission denied: {_owned(directory)}; {you} may not search it"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"permission denied: {path}: {exc.strerror}"
    group = group_name(st.st_gid)
    if uid == st.st_uid:
        why = "own it but its mode gives the owner no write access"
    elif st.st_gid in {os.getegid(), *os.getgroups()}:
        why = f"are in group {group} but its mode gives the group no write access"
    else:
        why = f"are not its owner nor in group {group}, and its mode gives others no write access"
    return f"permission denied: {_owned(path, st)}; {you} {why}"


def _owned(path: Path, st: os.stat_result | None = None) -> str:
    """`<path> is owned by <user>:<group> mode 0NNN` (numbers where no name is known)."""
    if st is None:
        try:
            st = os.stat(path)
        except OSError as exc:  # gone or hidden meanwhile: say so rather than fail while explaining a failure
            return f"{path}: {exc.strerror}"
    return f"{path} is owned by {owner_names(st)} mode {stat.S_IMODE(st.st_mode):04o}"


def _unreachable(path: Path, exc: Exception) -> ClientError:
    """The ClientError for a request that got no answer. `reason` tells the cases apart: `not_running`
    (no socket at the path, or nothing listens on it), `permission_denied` (the socket's or a directory's
    mode shuts the caller out: the message names owner, group and mode), else `unreachable`."""
    error = _os_error(exc)
    number = error.errno if error is not None else None
    if number in (errno.EACCES, errno.EPERM):
        return ClientError(0, "permission_denied", f"cannot reach wlidd at {path}: {access_denied_message(path)}")
    if number == errno.ENOENT:
        return ClientError(0, "not_running", f"cannot reach wlidd at {path}: no such socket (is the daemon running?)")
    if number == errno.ECONNREFUSED:
        return ClientError(
            0, "not_running", f"cannot reach wlidd at {path}: nothing listens on it (is the daemon running?)"
        )
    return ClientError(0, "unreachable", f"cannot reach wlidd at {path}: {exc} (is the daemon running?)")


class Client:
    """Synchronous client."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket()
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://wlidd", timeout=timeout
        )

    def _get(self, path: str) -> dict[str, Any]:
        try:
            return _answer(self._http.get(path))
        except httpx.HTTPError as exc:
            raise _unreachable(self.socket_path, exc) from None

    def get_token(self, name: str) -> TokenInfo:
        return _parsed(TokenInfo, self._get(f"/v1/token/{name}"), "token")

    def get_credentials(self, identity: str) -> Credentials:
        return _parsed(Credentials, self._get(f"/v1/credentials/{identity}"), "credentials")

    def status(self) -> Status:
        """The daemon's /v1/status (wlidd.status)."""
        return _parsed(Status, self._get("/v1/status"), "status")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client (asyncio or trio through httpx)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket()
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path)), base_url="http://wlidd", timeout=timeout
        )

    async def _get(self, path: str) -> dict[str, Any]:
        try:
            return _answer(await self._http.get(path))
        except httpx.HTTPError as exc:
            raise _unreachable(self.socket_path, exc) from None

    async def get_token(self, name: str) -> TokenInfo:
        return _parsed(TokenInfo, await self._get(f"/v1/token/{name}"), "token")

    async def get_credentials(self, identity: str) -> Credentials:
        return _parsed(Credentials, await self._get(f"/v1/credentials/{identity}"), "credentials")

    async def status(self) -> Status:
        """The daemon's /v1/status (wlidd.status)."""
        return _parsed(Status, await self._get("/v1/status"), "status")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
