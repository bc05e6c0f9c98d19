"""Every user-facing failure of wlidd is a WlidError.

    WlidError                       exit_code, http_status, reason (stable, for metrics and APIs)
    ├── ConfigError                 bad or missing configuration; names the key and the file
    ├── InvalidValue                a value from outside does not parse (a SPIFFE ID matcher, host:port, a
    │   │                           request's scopes); reason names the rule; a config model's validator
    │   │                           turns it into the ValueError pydantic reports against the key
    │   └── SdsRequestError         an Envoy SDS request refused (gRPC INVALID_ARGUMENT): sds_request
    ├── ListenerError               a listener could not be set up (exit code 3)
    ├── ProcessUnidentified         a caller's process could not be read for a unit/executable/sha256 rule
    ├── SvidError                   a credential set was refused; `reason` says exactly why
    │   └── RetryableSvidError      may be a rotation in progress (missing file, key/leaf mismatch)
    ├── ApiError                    a local API request failed; carries the HTTP status
    │   ├── TokenUnavailable        503 token_unavailable: no token to serve; retry_after
    │   ├── RateLimited             429 rate_limited: more upstream work than the caller's share; retry_after
    │   └── PeerRefused             403 forbidden: the calling socket has no owner to authorize
    ├── ClientError                 wlidd.client: the daemon refused (status, its code as reason) or could
    │                               not be reached (status 0: not_running, permission_denied, unreachable)
    ├── SinkRefused (an OSError)    a written path another user could steer; the message names the reason
    ├── NotRegularFile (an OSError) a credential path names a FIFO, device, socket or directory
    └── UpstreamError               an upstream (Entra ID, STS, IAM Credentials, metadata) refused or failed
                                    kind: "entra" | "sts" | "iam" | "metadata" | "identity" | "wlidd";
                                    status; code; retryable; retry_after; reason = <kind>_<code>

Messages never contain secrets: no key, token or assertion is ever put into one. The two OSErrors stay
OSErrors, so every file path's error handling covers them, and keep OSError's text.

UpstreamError.reason is a metric label value, so it comes from a fixed set per kind (`upstream_reasons`):
the upstream's own code, lower-cased with every run of characters outside [a-z0-9] made one `_`, when it
is one the kind documents (OAuth 2.0 RFC 6749 §5.2 and RFC 8693 §2.2.2 codes, Google's canonical AIP-193
status names, the AADSTS codes listed below, `http_<status>`); any other code is `<kind>_other`. The
upstream's text stays in the message (scrubbed and cut short by the provider), never in a label.
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args


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


class InvalidValue(WlidError):
    """A value from outside (a config field, a request parameter) does not parse; `reason` names the
    rule it breaks (``spiffe_id_matcher``, ``address``, ``scopes``), the message the value's fault.
    400 where a request carried it; exit code 2 (a bad configuration) where a config did."""

    exit_code = 2
    http_status = 400

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)

    def __repr__(self) -> str:
        return f"InvalidValue({self.reason!r}, {self.message!r})"


class SdsRequestError(InvalidValue):
    """An Envoy SDS request wlidd refuses (a foreign type_url, too many or too long resource names): the
    stream ends with gRPC INVALID_ARGUMENT carrying the message (wlidd.workload_api.sds)."""

    def __init__(self, message: str) -> None:
        super().__init__("sds_request", message)


class ProcessUnidentified(WlidError):
    """A local caller's process could not be identified for a rule on units, executables or sha256 (it
    exited during identification, wlidd cannot see its /proc entry, its executable is on a filesystem
    wlidd does not trust): the caller is refused; `why` is the refusal's text (wlidd.workload.proc)."""

    reason = "process_unidentified"

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class ListenerError(WlidError):
    """A listener could not be set up (path in use, not a socket, bad group …)."""

    exit_code = 3
    reason = "listener"


class TokenUnavailable(ApiError):
    """503: no token to serve; `retry_after` is the seconds until the next attempt when one is planned
    (for a Retry-After header), else None."""

    def __init__(self, name: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(503, "token_unavailable", f"token {name!r} is not available: {message}")
        self.retry_after = retry_after


class RateLimited(ApiError):
    """429: a caller asked for more upstream work than its share; `retry_after` in seconds (>= 1)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, "rate_limited", message)
        self.retry_after = max(1, math.ceil(retry_after))


class PeerRefused(ApiError):
    """403: the calling socket has no owner we can authorize (closed, half-closed, another owner now, or
    the kernel's tables cannot be read); the message says which, with addresses and TCP states only."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "forbidden", message)


class ClientError(WlidError):
    """wlidd.client: the daemon refused or could not answer; `status` 0 means it could not be reached, and
    then `reason` is `not_running`, `permission_denied` or `unreachable` (wlidd.client `_unreachable`)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, reason=code)
        self.status = status


class SinkRefused(WlidError, OSError):
    """A sink path, pid file, signal target or socket directory that could let another user steer the
    daemon's writes or signals; the message names the reason. An OSError, so every caller's error handling
    covers it."""

    reason = "sink_refused"

    def __init__(self, message: str) -> None:
        OSError.__init__(self, message)
        self.message = message


class NotRegularFile(WlidError, OSError):
    """The path names a FIFO, a device, a socket or a directory: not a file wlidd reads. Made as an OSError
    is (errno, strerror, filename) and shown as one."""

    reason = "not_regular_file"

    def __init__(self, code: int, strerror: str, filename: str) -> None:
        OSError.__init__(self, code, strerror, filename)
        self.message = OSError.__str__(self)


UpstreamKind = Literal["entra", "sts", "iam", "metadata", "identity", "wlidd"]
UPSTREAM_KINDS: frozenset[str] = frozenset(get_args(UpstreamKind))

# Failures of wlidd's own side of a call: no answer in time, no connection, an answer it cannot use.
_TRANSPORT = frozenset({"timeout", "connect", "bad_response", "other"})
# HTTP statuses named in a reason when the body carries no code; the rest fall into their class.
_HTTP = frozenset(
    {f"http_{n}" for n in (400, 401, 403, 404, 405, 408, 409, 410, 412, 413, 415, 425, 429)}
    | {f"http_{n}" for n in (500, 501, 502, 503, 504)}
    | {"http_4xx", "http_5xx", "http_other"}
)
# OAuth 2.0 token endpoint errors (RFC 6749 §5.2, RFC 8693 §2.2.2) and what Entra ID and STS add.
_OAUTH = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "access_denied",
        "unsupported_token_type",
        "invalid_token",
        "server_error",
        "temporarily_unavailable",
        "slow_down",
    }
)
# Google's canonical status names (google.rpc.Code, AIP-193), lower-cased.
_GOOGLE = frozenset(
    {
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    }
)
# Entra ID codes a client-credentials grant with a certificate assertion meets (Microsoft's AADSTS
# error code reference); any other AADSTS code is entra_other (the code stays in the message).
_AADSTS = frozenset(
    f"aadsts{n}"
    for n in (
        50012,  # authentication failed (e.g. the client assertion)
        50027,  # invalid or malformed JWT
        50196,  # client request loop (throttled)
        500011,  # resource principal (the scope's app) not found in the tenant
        5002738,  # unsupported assertion algorithm
        70003,  # unsupported grant type
        70011,  # invalid scope
        700011,  # invalid client_assertion_type
        700016,  # application (client id) not found in the tenant
        700021,  # assertion audience is not the token endpoint
        700023,  # assertion iss/sub is not the client id
        700024,  # assertion outside its time range
        700025,  # public client may not use a client assertion
        700027,  # assertion signature not verified (certificate not registered)
        7000112,  # application disabled
        7000215,  # invalid client secret or assertion
        7000222,  # client credentials expired
        90002,  # tenant not found
        90014,  # a required field is missing
        90033,  # a transient error has occurred
        900023,  # invalid tenant identifier
        900144,  # a required parameter is missing
        900561,  # the endpoint only accepts POST
        1002012,  # the scope is not <App ID URI>/.default
    )
)
_CODES: dict[str, frozenset[str]] = {
    "entra": _TRANSPORT | _HTTP | _OAUTH | _AADSTS | {"key_not_rsa", "signer"},
    "sts": _TRANSPORT | _HTTP | _OAUTH | _GOOGLE,
    "iam": _TRANSPORT | _HTTP | _GOOGLE,
    "metadata": _TRANSPORT | _HTTP | _GOOGLE | {"not_metadata"},
    "identity": frozenset({"unavailable", "expired", "other"}),
    "wlidd": frozenset({"internal", "id_token_unsupported", "no_federated_token", "ca_file", "other"}),
}
# Codes that make a 4xx answer transient: the upstream says it is overloaded or failing, not refusing.
TRANSIENT_CODES = frozenset(
    {
        "temporarily_unavailable",
        "server_error",
        "slow_down",
        "unavailable",
        "resource_exhausted",
        "internal",
        "deadline_exceeded",
        "aborted",
        "aadsts90033",  # "a transient error has occurred"
        "aadsts50196",  # "the server terminated an operation because it encountered a client request loop"
    }
)
TRANSIENT_STATUS = frozenset({408, 425, 429})  # and every 5xx
_NOT_CODE = re.compile(r"[^a-z0-9]+")
MAX_CODE = 48


def normalize_code(code: object) -> str:
    """An upstream's code in the reason alphabet: lower case, each run outside [a-z0-9] one `_`, at most
    MAX_CODE characters ("" when nothing is left). A bare three-digit code is an HTTP status (http_NNN)."""
    text = _NOT_CODE.sub("_", str(code).lower()).strip("_")
    if len(text) == 3 and text.isdigit():
        text = f"http_{text}"
    return text[:MAX_CODE]


def upstream_reasons(kind: str) -> frozenset[str]:
    """Every reason an UpstreamError of `kind` can carry: the fixed label set of wlidd_token_failures."""
    kind = kind if kind in UPSTREAM_KINDS else "wlidd"
    return frozenset(f"{kind}_{code}" for code in _CODES[kind])


def reason_for(kind: str, code: object) -> str:
    """`<kind>_<code>` when the kind knows the (normalized) code, else `<kind>_other`; an HTTP status
    outside the named ones is `http_4xx`, `http_5xx` or `http_other`. An unknown kind (a bug) is wlidd's."""
    if kind not in UPSTREAM_KINDS:
        return "wlidd_other"
    known = _CODES[kind]
    normalized = normalize_code(code)
    if normalized not in known and re.fullmatch(r"http_\d{3}", normalized):
        normalized = {"4": "http_4xx", "5": "http_5xx"}.get(normalized[5], "http_other")
    return f"{kind}_{normalized if normalized in known else 'other'}"


def is_transient(status: int | None, code: object) -> bool:
    """Whether backing off and trying again can help, from the upstream's HTTP status and code: 408, 425,
    429 and every 5xx are transient; any other 4xx (400 bad request, 401, 403, 404 …) or 3xx is permanent
    unless the code says the upstream is overloaded or failing (TRANSIENT_CODES); no status (no answer, an
    unusable 200) is transient."""
    if status is None or status == 200:
        return True
    if status in TRANSIENT_STATUS or 500 <= status <= 599:
        return True
    return normalize_code(code) in TRANSIENT_CODES


class UpstreamError(WlidError):
    """An upstream token service failed. `code` is its own error code (AADSTS…, invalid_grant,
    PERMISSION_DENIED …) or a transport reason (timeout, connect), printable and at most 64 characters;
    `reason` is `<kind>_<code>` from the fixed set `upstream_reasons(kind)`; `retryable` says whether
    backing off and trying again can help (default: `is_transient(status, code)`); `retry_after` is the
    server's Retry-After in seconds, if any."""

    http_status = 503

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason_for(kind, code))
        self.kind = kind
        self.status = status
        self.code = "".join(c if c.isprintable() else "?" for c in str(code))[:64]
        self.retryable = is_transient(status, code) if retryable is None else retryable
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        return not self.retryable

    def again(self, note: str) -> UpstreamError:
        """A copy with `note` appended to the message: the answer from the last error, raised afresh
        (re-raising one instance from many requests would grow its traceback)."""
        copy = UpstreamError(
            self.kind,
            f"{self.message}; {note}",
            status=self.status,
            code=self.code,
            retryable=self.retryable,
            retry_after=self.retry_after,
        )
        copy.reason = self.reason
        return copy

    def __repr__(self) -> str:
        return f"UpstreamError({self.kind!r}, status={self.status}, code={self.code!r})"
