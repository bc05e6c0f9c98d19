"""The listeners (`[listeners.*]`): the local API's Unix socket, the metadata API on loopback, the mTLS
listener, the Workload API's socket and the metrics listener; each with its connection limits.

A listener's own keys come first, then its limits (`ConnectionLimits`), in the docs as in `wlidd check
--print`: pydantic orders a model's fields from the last class of its MRO to itself, so a listener names
`ConnectionLimits` first among its bases and the model of its own keys second.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from wlidd.config.values import Duration, ExpandedPath, FileMode, _address, _matcher, _Strict


class ConnectionLimits(_Strict):
    """How many connections a listener holds and how long it waits on each (wlidd.api.accept counts them
    from accept()), with the local API's defaults; the metrics listener holds fewer."""

    max_connections: int = Field(default=256, ge=1)
    max_connections_per_caller: int = Field(default=64, ge=1)  # per uid (per remote address off loopback)
    first_byte_timeout: Duration = 5.0  # from accept to the first request byte (on mTLS, the TLS handshake included)
    request_timeout: Duration = 10.0
    idle_timeout: Duration = 60.0


class _UnixSocket(_Strict):
    path: ExpandedPath = Path("/run/wlidd/wlidd.sock")
    mode: FileMode = 0o660
    owner: str | None = None
    group: str | None = None


class UnixListenerConfig(ConnectionLimits, _UnixSocket):
    """The local API on a Unix socket; callers are told apart by SO_PEERCRED."""


class _MetadataKeys(_Strict):
    address: str = "127.0.0.1:8980"
    token: str
    email: str | None = None
    project_id: str = "wlidd-project"
    numeric_project_id: str = "0"
    universe_domain: str = "googleapis.com"


class MetadataListenerConfig(ConnectionLimits, _MetadataKeys):
    """A GCE-metadata-compatible API on loopback, serving one token source to unmodified Google libraries."""

    @model_validator(mode="after")
    def _check(self) -> MetadataListenerConfig:
        import ipaddress

        host, port = _address(self.address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise ValueError(
                f"address {self.address!r} is not a loopback address; the metadata API must never face a network"
            )
        del port
        return self


class _MtlsKeys(_Strict):
    address: str = "127.0.0.1:8443"
    identity: str
    allow: tuple[str, ...]


class MtlsListenerConfig(ConnectionLimits, _MtlsKeys):
    """An mTLS TCP listener presenting an identity's SVID; callers are told apart by their SPIFFE ID."""

    @model_validator(mode="after")
    def _check(self) -> MtlsListenerConfig:
        _address(self.address)
        if not self.allow:
            raise ValueError("allow: name at least one SPIFFE ID matcher (exact, spiffe://td, '*' or '**' patterns)")
        for pattern in self.allow:
            _matcher(pattern)
        return self


SDS_MAX_NAME_LENGTH = 2048 + len(
    "spiffe://"
)  # a resource name may be a SPIFFE ID: at most 2048 bytes (SPIFFE-ID.md §2.3)


class SdsConfig(_Strict):
    """Envoy's Secret Discovery Service on the Workload API socket (`[listeners.workload_api.sds]`), with the
    SPIRE agent's `sds` settings and defaults (spiffe/spire doc/spire_agent.md "SDS Configuration";
    `enabled` is the inverse of its `disable_sds_api`). Read at start: a change takes a restart."""

    enabled: bool = True
    default_svid_name: str = Field(
        default="default", min_length=1, max_length=SDS_MAX_NAME_LENGTH
    )  # tls_certificate: the caller's SVID
    default_bundle_name: str = Field(
        default="ROOTCA", min_length=1, max_length=SDS_MAX_NAME_LENGTH
    )  # its trust domain's bundle
    default_all_bundles_name: str = Field(
        default="ALL", min_length=1, max_length=SDS_MAX_NAME_LENGTH
    )  # every bundle (federation)
    disable_spiffe_cert_validation: bool = False  # trusted_ca instead of the SPIFFE validator; node metadata overrides


class WorkloadApiListenerConfig(_Strict):
    """The SPIFFE Workload API (gRPC) on a Unix socket, with Envoy's SDS on it (`sds`); callers are told
    apart by SO_PEERCRED."""

    path: ExpandedPath = Path("/run/wlidd/workload.sock")
    mode: FileMode = 0o666
    owner: str | None = None
    group: str | None = None
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_caller: int = Field(default=16, ge=1)  # per uid: a client holds one (HTTP/2 multiplexes)
    first_byte_timeout: Duration = 5.0  # from accept to the HTTP/2 preface
    max_calls_per_caller: int = Field(default=64, ge=1)  # per uid: open calls (streams), Workload API and SDS
    sds: SdsConfig = SdsConfig()


class _MetricsAddress(_Strict):
    address: str = "127.0.0.1:9464"


class MetricsListenerConfig(ConnectionLimits, _MetricsAddress):
    """A plain-HTTP listener for Prometheus: GET /metrics, /v1/health and /v1/live only, nothing secret, no caller
    authorization. Any address may be given (a pod's scraper is not on loopback); the daemon warns when it
    is not a loopback one."""

    # fewer than ConnectionLimits' (they keep their place among its keys):
    max_connections: int = Field(default=64, ge=1)  # a scraper holds one connection, a health probe one per probe
    max_connections_per_caller: int = Field(default=16, ge=1)  # per uid on loopback, per remote address otherwise

    @model_validator(mode="after")
    def _check(self) -> MetricsListenerConfig:
        _address(self.address)
        return self


class ListenersConfig(_Strict):
    unix: UnixListenerConfig = Field(default_factory=UnixListenerConfig)
    metadata: MetadataListenerConfig | None = None
    mtls: MtlsListenerConfig | None = None
    workload_api: WorkloadApiListenerConfig | None = None
    metrics: MetricsListenerConfig | None = None
