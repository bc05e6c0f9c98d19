"""A small client for applications: tokens and credentials from the local wlidd over its Unix socket.

    from wlidd.client import Client
    token = Client().get_token("gcp").access_token          # sync
    async with AsyncClient() as c: creds = await c.get_credentials("default")

Errors are ClientError with the daemon's status, stable code and message (never a secret).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from wlidd.errors import WlidError

DEFAULT_SOCKET = Path("/run/wlidd/wlidd.sock")


def default_socket() -> Path:
    return Path(os.environ.get("WLIDD_SOCKET", str(DEFAULT_SOCKET)))


class ClientError(WlidError):
    """The daemon refused or could not answer; `status` 0 means it could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, reason=code)
        self.status = status


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


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


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


def _token(document: dict[str, Any]) -> TokenInfo:
    return TokenInfo(
        document["access_token"], document["token_type"], int(document["expires_in"]), _time(document["expire_time"])
    )


def _credentials(document: dict[str, Any]) -> Credentials:
    return Credentials(
        document["spiffe_id"],
        document["serial"],
        _time(document["not_after"]),
        document["chain_pem"],
        document["key_pem"],
        document["bundle_pem"],
        dict(document.get("federated_bundles_pem") or {}),
    )


def _unreachable(path: Path, exc: Exception) -> ClientError:
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
        return _token(self._get(f"/v1/token/{name}"))

    def get_credentials(self, identity: str) -> Credentials:
        return _credentials(self._get(f"/v1/credentials/{identity}"))

    def status(self) -> dict[str, Any]:
        return self._get("/v1/status")

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
        return _token(await self._get(f"/v1/token/{name}"))

    async def get_credentials(self, identity: str) -> Credentials:
        return _credentials(await self._get(f"/v1/credentials/{identity}"))

    async def status(self) -> dict[str, Any]:
        return await self._get("/v1/status")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
