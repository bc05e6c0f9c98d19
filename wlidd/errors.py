"""Every user-facing failure of wlidd is a WlidError.

    WlidError                       exit_code, http_status, reason (stable, for metrics and APIs)
    ├── ConfigError                 bad or missing configuration; names the key and the file
    ├── SvidError                   a credential set was refused; `reason` says exactly why
    │   └── RetryableSvidError      may be a rotation in progress (missing file, key/leaf mismatch)
    ├── ApiError                    a local API request failed; carries the HTTP status
    └── UpstreamError               an upstream (Entra ID, STS, IAM Credentials, metadata) refused or failed
                                    kind: "entra" | "sts" | "iam" | "metadata"; status; code; retry_after

Messages never contain secrets: no key, token or assertion is ever put into one.
"""

from __future__ import annotations


class WlidError(Exception):
    """Base of every error wlidd reports to a user."""

    exit_code: int = 1
    http_status: int = 500
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class ConfigError(WlidError):
    """The configuration is invalid; the message names the key and where it came from."""

    exit_code = 2
    reason = "config"


class SvidError(WlidError):
    """A credential set was refused. `reason` is a stable code such as ``leaf_expired``."""

    http_status = 503

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)

    def __repr__(self) -> str:
        return f"SvidError({self.reason!r}, {self.message!r})"


class RetryableSvidError(SvidError):
    """A refusal that a half-done rotation explains (missing file, key not matching the leaf)."""


class ApiError(WlidError):
    """A local API request failed; rendered as a JSON error body with `http_status`."""

    def __init__(self, http_status: int, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)
        self.http_status = http_status


class UpstreamError(WlidError):
    """An upstream token service failed. `code` is its own error code (AADSTS…, invalid_grant,
    PERMISSION_DENIED …) or a transport reason (timeout, connect); `retryable` says whether backing
    off and trying again can help; `retry_after` is the server's Retry-After in seconds, if any."""

    http_status = 503

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=f"{kind}_{code}".lower())
        self.kind = kind
        self.status = status
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"UpstreamError({self.kind!r}, status={self.status}, code={self.code!r})"
