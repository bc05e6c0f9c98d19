"""The /v1/status document as types: what the daemon answers, what wlidd.client parses, what `wlidd status` prints.

One frozen dataclass per object of the document, its fields in the order of the JSON keys:

    Status
      daemon         DaemonStatus (state, waiting_for: WaitingFor, version, pid, started_at, uptime_seconds, now)
      identities     {name: IdentityStatus (last_error, last_rejection: Outcome; bundle_problems: BundleTrouble)}
      tokens         {name: TokenStatus (last_error: UpstreamFailure)}
      listeners      {name: ListenerStatus}
      sink_problems  {sink dir or path: FailingSink}
      workload_api   WorkloadApiStatus, only when [listeners.workload_api] is configured
                       sds  SdsStatus (last_nack: SdsNack), only while Envoy's SDS is served on it

`to_json(value)` writes one as JSON values (times RFC 3339 with 'Z': wlidd.clock.iso_z; tuples as lists; a field
marked OMITTED_WHEN_NONE left out while None), and `parse_status(document)` reads the document back: equal to
what was written. Parsing is strict about what it needs and lenient about the rest: a missing key, a wrong
type (a bool is not an int), an unknown daemon state or a time without its offset is refused with
InvalidValue("json_document", "<where>: <what is wrong>") naming the first field that does not fit (never a KeyError
or TypeError; a refused value is shown only for a state or a time, else only its type); keys it does not know
are ignored (a newer daemon may add some). `parse_json(cls, value)` does the same for any dataclass made of these field types.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from wlidd.clock import iso_z
from wlidd.errors import InvalidValue

DaemonState = Literal["starting", "running", "degraded"]  # /v1/status daemon.state; wlidd_daemon_state{state}
DAEMON_STATES: tuple[DaemonState, ...] = typing.get_args(DaemonState)

_REASON = "json_document"  # InvalidValue.reason: a document that does not fit its type
OMITTED_WHEN_NONE: Mapping[str, bool] = types.MappingProxyType({"omitted_when_none": True})


@dataclasses.dataclass(frozen=True)
class WaitingFor:
    """While the daemon starts: the identities whose first load runs, the required tokens not had yet."""

    identities: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DaemonStatus:
    """The process: its state (wlidd.health), what a start still waits for, version, pid, times."""

    state: DaemonState
    waiting_for: WaitingFor
    version: str
    pid: int
    started_at: dt.datetime
    uptime_seconds: int
    now: dt.datetime


@dataclasses.dataclass(frozen=True)
class Outcome:
    """An identity's last refusal of its files: the rejection's stable reason, its message, when."""

    reason: str | None
    message: str
    at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class BundleTrouble:
    """A federated trust domain's bundle that could not be read (wlidd.svid.model.BundleProblem)."""

    trust_domain: str
    reason: str
    message: str
    kept: bool  # the last good copy is still used


@dataclasses.dataclass(frozen=True)
class IdentityStatus:
    """One identity: what is loaded (None before its first load), how fresh, what went wrong last."""

    source: str
    path: str
    valid: bool
    required: bool
    spiffe_id: str | None
    serial: str | None
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    seconds_left: int | None
    trust_domains: tuple[str, ...]
    last_loaded: dt.datetime | None
    last_checked: dt.datetime | None
    last_error: Outcome | None  # why the files on disk are refused now
    last_rejection: Outcome | None  # the most recent refusal ever
    bundle_problems: tuple[BundleTrouble, ...]
    reloads: int
    retries: int
    updates: int
    rejections: int
    warnings: tuple[str, ...]
    origin: str | None = dataclasses.field(default=None, metadata=OMITTED_WHEN_NONE)  # once loaded
    version: int | None = dataclasses.field(default=None, metadata=OMITTED_WHEN_NONE)  # once loaded


@dataclasses.dataclass(frozen=True)
class UpstreamFailure:
    """A token source's last failed attempt (wlidd.errors.UpstreamError): no secret, only its reason."""

    reason: str
    status: int | None  # the upstream's HTTP status, when it answered
    message: str
    permanent: bool
    at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class TokenStatus:
    """One token source: its flow, whether its token is servable now, the refresh schedule, the last error."""

    flow: str
    identity: str | None
    valid: bool
    required: bool
    on_demand: bool
    expire_time: dt.datetime | None
    seconds_left: int | None
    last_refresh: dt.datetime | None
    next_refresh: dt.datetime | None
    failures: int
    upstream_calls: int
    last_error: UpstreamFailure | None


@dataclasses.dataclass(frozen=True)
class ListenerStatus:
    """One listener's accept loops (several sockets of one listener summed): alive, connections, caps."""

    address: str | None  # "127.0.0.1:9464", a Unix socket's path; None before it accepts
    alive: bool
    failure: str | None
    open: int
    callers: int
    max_connections: int
    max_per_caller: int
    accepted: int
    refused: int


@dataclasses.dataclass(frozen=True)
class FailingSink:
    """A sink whose last write failed (its files keep the last good content): its owner and the error."""

    kind: str  # "identity" or "token"
    owner: str
    error: str


@dataclasses.dataclass(frozen=True)
class SdsNack:
    """The last SDS response an Envoy rejected (a request with error_detail, or one that keeps an older
    version): the first resource names it concerned (at most 10, each cut to 256 characters), how many
    it named in all (0: none, i.e. every resource), and when it arrived. Envoy's error text is only in
    the log (`Envoy rejected the secrets sent`)."""

    resources: tuple[str, ...]
    names: int
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class SdsStatus:
    """Envoy's SDS on the Workload API socket: open StreamSecrets and DeltaSecrets streams, how many of them
    are nacked (their Envoy rejected the last response and has accepted none since: it runs on an older
    secret), responses sent (FetchSecrets answers included), NACKs received since start, and the last NACK
    (None: none yet)."""

    streams: int
    streams_nacked: int
    pushes: int
    nacks: int
    last_nack: SdsNack | None


@dataclasses.dataclass(frozen=True)
class WorkloadApiStatus:
    """The SPIFFE Workload API: open streams, X509-SVID responses pushed, the last push per identity; and
    Envoy's SDS on the same socket (`sds`, left out when SDS is switched off)."""

    streams: int
    pushes: int
    last_push: Mapping[str, dt.datetime]
    sds: SdsStatus | None = dataclasses.field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclasses.dataclass(frozen=True)
class Status:
    """The whole /v1/status document."""

    daemon: DaemonStatus
    identities: Mapping[str, IdentityStatus]
    tokens: Mapping[str, TokenStatus]
    listeners: Mapping[str, ListenerStatus]
    sink_problems: Mapping[str, FailingSink]
    workload_api: WorkloadApiStatus | None = dataclasses.field(default=None, metadata=OMITTED_WHEN_NONE)


def to_json(value: Any) -> Any:
    """`value` (a dataclass of this module, or a part of one) as JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None or not f.metadata.get("omitted_when_none")
        }
    if isinstance(value, dt.datetime):
        return iso_z(value)
    if isinstance(value, Mapping):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    return value


def parse_status(document: object) -> Status:
    """The Status in a /v1/status JSON document; InvalidValue("json_document", …) naming the first field that does not
    fit (see the module docstring)."""
    return parse_json(Status, document, "status")


T = TypeVar("T")


def parse_json(cls: type[T], value: object, where: str) -> T:
    """`value` (JSON values) as the dataclass `cls`; InvalidValue("json_document", "<where>…: …") when it does
    not fit (`where` names the document: "status", "token")."""
    parsed: T = _parse(cls, value, where)
    return parsed


def _refuse(where: str, expected: str, value: object) -> InvalidValue:
    got = "null" if value is None else type(value).__name__
    return InvalidValue(_REASON, f"{where}: expected {expected}, got {got}")


def _parse(kind: Any, value: object, where: str) -> Any:
    """`value` as `kind`: a dataclass, `X | None`, a Literal of strings, tuple[X, ...], Mapping[str, X] (or
    dict), datetime, str, int or bool."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):  # only `X | None` is used
        (arm,) = [arg for arg in args if arg is not type(None)]
        return None if value is None else _parse(arm, value, where)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise InvalidValue(_REASON, f"{where}: expected one of {', '.join(args)}, got {_shown(value)}")
    if origin is tuple:
        if not isinstance(value, list):
            raise _refuse(where, "a list", value)
        return tuple(_parse(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise _refuse(where, "an object", value)
        return {str(key): _parse(args[1], item, f"{where}[{key!r}]") for key, item in value.items()}
    if dataclasses.is_dataclass(kind):
        return _parse_dataclass(kind, value, where)
    return _parse_scalar(kind, value, where)


def _parse_dataclass(kind: Any, value: object, where: str) -> Any:
    if not isinstance(value, dict):
        raise _refuse(where, "an object", value)
    hints = typing.get_type_hints(kind)
    found: dict[str, Any] = {}
    for f in dataclasses.fields(kind):
        if f.name in value:
            found[f.name] = _parse(hints[f.name], value[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidValue(_REASON, f"{where}: {f.name!r} is missing")
    return kind(**found)


def _parse_scalar(kind: Any, value: object, where: str) -> Any:
    if kind is dt.datetime:
        if not isinstance(value, str):
            raise _refuse(where, "an RFC 3339 time", value)
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidValue(_REASON, f"{where}: expected an RFC 3339 time, got {_shown(value)}") from None
        if when.tzinfo is None:
            raise InvalidValue(_REASON, f"{where}: expected an RFC 3339 time with its offset, got {_shown(value)}")
        return when
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _refuse(where, "true or false", value)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _refuse(where, "an integer", value)
    if kind is str:
        if isinstance(value, str):
            return value
        raise _refuse(where, "a string", value)
    raise TypeError(f"{where}: no parser for {kind!r}")  # a field type this module does not use: a bug here


def _shown(value: object) -> str:
    """A refused enum or time value, shortened (status documents hold no secret)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
