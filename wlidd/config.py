"""Configuration: a TOML file plus ``WLIDD_*`` environment overrides, validated once.
Long: the whole config schema, models and validators, in one place (docs/CONFIG.md follows it).

The names are a contract (../shared/CONFIG.md): add options, never rename them. Every error
names the key and where its value came from (the file, or the environment variable).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from wlidd.accounts import account_by_name, member_of, owner_names
from wlidd.errors import ConfigError, InvalidValue
from wlidd.svid.spiffeid import parse_matcher

DEFAULT_CONFIG_PATH = Path("/etc/wlidd/wlidd.toml")
DEFAULT_GCE_DIR = Path("/var/run/secrets/workload-spiffe-credentials")
DEFAULT_CERTIFICATE_CONFIG = Path("~/.config/gcloud/certificate_config.json")
ENV_PREFIX = "WLIDD_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"10m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '90s', '10m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration; use seconds or a string like '90s', '10m', '1h'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _expand_path(value: object) -> object:
    if isinstance(value, str | Path):
        return Path(os.path.expanduser(str(value)))
    return value


def _parse_mode(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value.strip()):
        mode = int(value.strip().replace("o", ""), 8)
    else:
        raise ValueError(f"{value!r} is not a file mode; use an octal string like '0660'")
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{value!r} is out of range for a file mode")
    return mode


Duration = Annotated[float, BeforeValidator(parse_duration)]
ExpandedPath = Annotated[Path, BeforeValidator(_expand_path)]
FileMode = Annotated[int, BeforeValidator(_parse_mode)]

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Strict):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    runtime_dir: ExpandedPath = Path("/run/wlidd")


_MAX_READERS = 32  # POSIX ACL entries per kind; the xattr stays far below a file system's limit


def _check_id(value: str | int) -> str | int:
    """A user or group as a sink reader: a name, or a number below the kernel's "no id" (2**32 - 1)."""
    number = value if isinstance(value, int) else int(value) if value.isascii() and value.isdigit() else None
    if number is not None and not 0 <= number < 0xFFFFFFFF:
        raise ValueError(f"{value} is not a uid or gid (0 to 4294967294)")
    if isinstance(value, str) and (not value or len(value) > 256 or any(c in value for c in ":/\n\0")):
        raise ValueError(f"{value!r} is not a user or group name")
    return value


class SinkReaders(_Strict):
    """Users and groups (by name or number) granted read access to a sink's files through POSIX ACLs,
    and read/traverse on its directory: no capability needed, the daemon owns the files."""

    users: tuple[Annotated[str | int, AfterValidator(_check_id)], ...] = Field(default=(), max_length=_MAX_READERS)
    groups: tuple[Annotated[str | int, AfterValidator(_check_id)], ...] = Field(default=(), max_length=_MAX_READERS)

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)


class CredentialSinkConfig(_Strict):
    """Files for consumers that read credentials from disk, rewritten after every rotation and whenever they
    went stale (start, SIGHUP, a config change, the periodic re-read; wlidd.sinks.credentials.ensure_credentials).

    Each generation is published in one atomic step (Kubernetes' atomic writer: `<dir>/..data` re-pointed
    by rename, stable names `<dir>/<file> -> ..data/<file>`). One naming scheme per layout:

    - "files": cert.pem (chain), key.pem, bundle.pem, certificate_config.json ("workload" entry, read by
      Google's client libraries);
    - "spiffe-helper": svid.pem (chain), svid_key.pem, svid_bundle.pem (own trust domain's roots; the
      federated ones appended with include_federated_domains), spiffe-helper's documented names;
    - "spiffe-fs": credential-bundle.private-key.pem (key, then the chain without its trust anchor) and
      <trust domain>.spiffe-trust-bundle.pem per trust domain (the SPIFFE Filesystem Delivery draft).

    The removed layout "spiffe" is refused with what to use instead (its svid.pem held key and chain, a
    name spiffe-helper and `wlidd creds` use for the chain alone).
    """

    dir: ExpandedPath
    layout: Literal["files", "spiffe-helper", "spiffe-fs"] = "files"
    certificate_config: ExpandedPath | None = None  # files layout: default <dir>/certificate_config.json
    include_federated_domains: bool = False  # spiffe-helper layout: federated roots appended to svid_bundle.pem
    mode: FileMode = 0o644
    key_mode: FileMode = 0o600
    owner: str | int | None = None  # needs root or CAP_CHOWN; readers works without
    group: str | int | None = None
    readers: SinkReaders = Field(default_factory=SinkReaders)
    on_change: tuple[str, ...] = ()
    on_change_timeout: Duration = 30.0
    signal: str | None = None  # e.g. "SIGHUP", sent to the pid in pid_file after each rotation
    pid_file: ExpandedPath | None = None  # root's or wlidd's file in a directory only they can write

    @model_validator(mode="before")
    @classmethod
    def _removed_layout(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("layout") == "spiffe":
            raise ValueError(
                'layout "spiffe" was removed: its svid.pem held the key and the chain, while spiffe-helper (and'
                ' `wlidd creds`) use svid.pem for the chain alone. Use layout = "spiffe-fs" for key and chain in'
                " one file (credential-bundle.private-key.pem, <trust domain>.spiffe-trust-bundle.pem: the SPIFFE"
                ' Filesystem Delivery draft), or layout = "spiffe-helper" (svid.pem, svid_key.pem,'
                " svid_bundle.pem), and point the consumer at the new names"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> CredentialSinkConfig:
        import signal as signals

        if (self.signal is None) != (self.pid_file is None):
            raise ValueError("signal and pid_file go together")
        if self.signal is not None and not hasattr(signals, self.signal.upper()):
            raise ValueError(f"signal {self.signal!r} is not a signal name (e.g. SIGHUP, SIGUSR1)")
        if self.key_mode & 0o077:
            raise ValueError(
                f"key_mode {self.key_mode:04o} lets other users read the private key: 0600 or 0400;"
                " to hand the key to another user, name it in readers (or set owner)"
            )
        if self.certificate_config is not None and self.layout != "files":
            raise ValueError('certificate_config is only for layout "files"')
        if self.include_federated_domains and self.layout != "spiffe-helper":
            raise ValueError(
                'include_federated_domains is only for layout "spiffe-helper" ("spiffe-fs" writes every trust'
                " domain's bundle to its own file; \"files\" writes the own trust domain's only)"
            )
        config = self.certificate_config
        if config is not None and (config.name.startswith("..") or config.name in ("", ".")):
            raise ValueError(
                "certificate_config: a file name starting with '..' is reserved for the sink's generations"
            )
        return self


class _IdentityBase(_Strict):
    """What every identity has, whatever its source (the variants below add their own files)."""

    source: str  # each variant narrows it to its tag (kept first here: `wlidd check --print` prints it first)
    bundles: dict[str, ExpandedPath] = Field(default_factory=dict)
    trust_domain: str | None = None
    reload_interval: Duration = 600.0
    mismatch_retries: int = Field(default=4, ge=1, le=100)
    mismatch_retry_delay: Duration = 5.0
    debounce: Duration = 0.05
    required: bool = True
    sinks: tuple[CredentialSinkConfig, ...] = ()

    @model_validator(mode="after")
    def _check_common(self) -> Self:
        for domain in [self.trust_domain, *self.bundles]:
            if domain is not None and not _TRUST_DOMAIN.match(domain):
                raise ValueError(f"{domain!r} is not a trust domain (lowercase letters, digits, '.', '-', '_')")
        if self.reload_interval < 1:
            raise ValueError("reload_interval must be at least 1s")
        return self


class GceIdentityConfig(_IdentityBase):
    """source = "gce": the directory the GCE guest agent (or a CSI driver) keeps current (SPECS.md §1.2):
    certificates.pem, private_key.pem (or `key`), and ca_certificates.pem or trust_bundles.json (or `bundle`)."""

    source: Literal["gce"]
    dir: ExpandedPath | None = None  # default DEFAULT_GCE_DIR (gce_dir())
    key: ExpandedPath | None = None  # a key kept elsewhere (when the platform withholds private_key.pem)
    bundle: ExpandedPath | None = None

    def gce_dir(self) -> Path:
        return self.dir if self.dir is not None else DEFAULT_GCE_DIR


class CertificateConfigIdentityConfig(_IdentityBase):
    """source = "certificate_config": the "workload" entry of a certificate_config.json names the chain
    and the key (SPECS.md §1.1, as Google's client libraries read it); the trust bundle is configured."""

    source: Literal["certificate_config"]
    certificate_config: ExpandedPath | None = None  # default: $GOOGLE_API_CERTIFICATE_CONFIG, else gcloud's path
    bundle: ExpandedPath = Field(description="the trust bundle path")

    def certificate_config_path(self, environ: Mapping[str, str]) -> Path:
        if self.certificate_config is not None:
            return self.certificate_config
        from_env = environ.get("GOOGLE_API_CERTIFICATE_CONFIG")
        if from_env:
            return Path(os.path.expanduser(from_env))
        return Path(os.path.expanduser(str(DEFAULT_CERTIFICATE_CONFIG)))


class FilesIdentityConfig(_IdentityBase):
    """source = "files": explicit paths."""

    source: Literal["files"]
    cert: ExpandedPath = Field(description="the chain, leaf first")
    key: ExpandedPath
    bundle: ExpandedPath


IdentityConfig = Annotated[
    GceIdentityConfig | CertificateConfigIdentityConfig | FilesIdentityConfig, Field(discriminator="source")
]
"""Where one identity's X.509-SVID comes from: one model per `source`, each with exactly its keys."""


class EntraConfig(_Strict):
    authority: str = "https://login.microsoftonline.com"
    tenant_id: str
    client_id: str
    scope: str
    alg: Literal["PS256", "RS256"] = "PS256"
    cert: ExpandedPath | None = None
    key: ExpandedPath | None = None
    assertion_lifetime: Duration = 300.0

    @model_validator(mode="after")
    def _check(self) -> EntraConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("entra.cert and entra.key go together")
        if not 0 < self.assertion_lifetime <= 600:
            raise ValueError("entra.assertion_lifetime must be at most 10m (Entra refuses longer assertions)")
        return self

    def token_url(self) -> str:
        return f"{self.authority.rstrip('/')}/{self.tenant_id}/oauth2/v2.0/token"


DEFAULT_SCOPE = ("https://www.googleapis.com/auth/cloud-platform",)


class StsConfig(_Strict):
    url: str | None = None
    audience: str
    scope: tuple[str, ...] = DEFAULT_SCOPE


class ImpersonateConfig(_Strict):
    service_account: str
    url: str | None = None
    scope: tuple[str, ...] = DEFAULT_SCOPE
    lifetime: Duration = 3600.0
    delegates: tuple[str, ...] = ()


class MetadataConfig(_Strict):
    url: str = "http://metadata.google.internal"
    account: str = "default"
    scopes: tuple[str, ...] = ()


class SinkConfig(_Strict):
    path: ExpandedPath
    format: Literal["text", "json"] = "text"
    mode: FileMode = 0o600
    owner: str | int | None = None  # hand the file to the app's user instead of widening its mode (root only)
    group: str | int | None = None
    readers: SinkReaders = Field(default_factory=SinkReaders)  # POSIX ACL read access, no capability needed
    on_change: tuple[str, ...] = ()
    on_change_timeout: Duration = 30.0


SECRET_WORDS = ("token", "secret", "password", "passwd", "pass", "key", "auth", "credential", "signature", "sig")


def redact_url(url: str, mark: str = "<redacted>") -> str:
    """`url` with its userinfo (user and password: a token is often put as the user) and every query
    value replaced by `mark` (query names kept), for messages and `wlidd check --print`; text that is not
    a URL is returned as is."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{mark}@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{item.partition('=')[0]}={mark}" if "=" in item else item for item in parts.query.split("&") if item
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _check_url(key: str, url: str | None) -> None:
    """An upstream URL must be absolute http(s) with a host (RFC 3986): ValueError naming `key` otherwise
    (a relative or schemeless URL would fail at every refresh, far from its cause). None: not configured."""
    from urllib.parse import urlsplit

    if url is None:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"{key} {redact_url(url)!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} {redact_url(url)!r} must be an absolute http:// or https:// URL with a host")


class _TokenBase(_Strict):
    """What every token source has, whatever its flow: how it is refreshed, its upstreams' CA, its sinks."""

    flow: str  # each variant narrows it to its tag (kept first here: `wlidd check --print` prints it first)
    refresh_at: float = Field(default=0.8, gt=0.0, lt=1.0)
    jitter: float = Field(default=0.1, ge=0.0, lt=0.5)
    skew: Duration = 60.0
    require_at_start: bool = False
    require_timeout: Duration = 30.0
    ca_file: ExpandedPath | None = None
    min_interval: Duration = 1.0
    start_delay: Duration = 30.0
    on_demand: bool = False
    idle: Duration = 3600.0
    backoff_min: Duration = 1.0
    backoff_max: Duration = 300.0
    timeout: Duration = 30.0
    sinks: tuple[SinkConfig, ...] = ()

    @model_validator(mode="after")
    def _check_common(self) -> Self:
        if self.backoff_min <= 0 or self.backoff_max < self.backoff_min:
            raise ValueError("backoff_min must be > 0 and at most backoff_max")
        return self


class StsTokenConfig(_TokenBase):
    """The two flows that end in a Google STS token exchange, optionally followed by IAM impersonation.
    Each names its upstreams' default URLs (SPECS.md §7: x509-sts uses the mTLS endpoints)."""

    identity: str | None = None
    sts: StsConfig
    impersonate: ImpersonateConfig | None = None

    DEFAULT_STS_URL: ClassVar[str] = "https://sts.googleapis.com/v1/token"
    DEFAULT_IAM_URL: ClassVar[str] = "https://iamcredentials.googleapis.com"

    @model_validator(mode="after")
    def _check_urls(self) -> Self:
        _check_url("sts.url", self.sts.url)
        _check_url("impersonate.url", self.impersonate.url if self.impersonate else None)
        return self

    def sts_url(self) -> str:
        return self.sts.url or self.DEFAULT_STS_URL

    def impersonate_base(self) -> str:
        return ((self.impersonate.url if self.impersonate else None) or self.DEFAULT_IAM_URL).rstrip("/")

    def scopes(self) -> tuple[str, ...]:
        """The OAuth scopes the served token carries."""
        return self.impersonate.scope if self.impersonate is not None else self.sts.scope


class EntraStsTokenConfig(StsTokenConfig):
    """flow = "entra-sts": a client assertion signed with the identity's key (or entra.cert's) → Entra ID
    token → STS exchange → [IAM generateAccessToken]."""

    flow: Literal["entra-sts"]
    entra: EntraConfig

    @model_validator(mode="after")
    def _check_signer(self) -> Self:
        if self.identity is None and self.entra.cert is None:
            raise ValueError("flow 'entra-sts' needs identity, or entra.cert and entra.key")
        _check_url("entra.authority", self.entra.authority)
        return self


class X509StsTokenConfig(StsTokenConfig):
    """flow = "x509-sts": STS exchange over mTLS with the identity's SVID → [IAM over the same mTLS]."""

    flow: Literal["x509-sts"]
    identity: str = Field(description="its SVID is the client certificate")

    DEFAULT_STS_URL: ClassVar[str] = "https://sts.mtls.googleapis.com/v1/token"
    DEFAULT_IAM_URL: ClassVar[str] = "https://iamcredentials.mtls.googleapis.com"


class GceMetadataTokenConfig(_TokenBase):
    """flow = "gce-metadata": the metadata server's service account token, cached and re-served. It uses
    no identity and impersonates nobody (both read None, as consumers ask every token)."""

    flow: Literal["gce-metadata"]
    metadata: MetadataConfig | None = None  # default MetadataConfig() (metadata_config())

    identity: ClassVar[None] = None
    impersonate: ClassVar[None] = None

    @model_validator(mode="after")
    def _check_urls(self) -> Self:
        _check_url("metadata.url", self.metadata.url if self.metadata else None)
        return self

    def metadata_config(self) -> MetadataConfig:
        return self.metadata or MetadataConfig()

    def scopes(self) -> tuple[str, ...]:
        """The OAuth scopes the served token carries."""
        return self.metadata_config().scopes or DEFAULT_SCOPE


TokenConfig = Annotated[EntraStsTokenConfig | X509StsTokenConfig | GceMetadataTokenConfig, Field(discriminator="flow")]
"""One token source: one model per `flow`, each with exactly its keys."""

_VARIANTS: dict[str, tuple[str, dict[str, type[BaseModel]]]] = {
    "identities": (
        "source",
        {"gce": GceIdentityConfig, "certificate_config": CertificateConfigIdentityConfig, "files": FilesIdentityConfig},
    ),
    "tokens": (
        "flow",
        {"entra-sts": EntraStsTokenConfig, "x509-sts": X509StsTokenConfig, "gce-metadata": GceMetadataTokenConfig},
    ),
}
"""Config's tagged unions: top-level key → (discriminator key, tag → model). A validation error inside a
variant has the tag in its location (identities.<name>.<tag>.<key>): `_describe` takes it out again."""

_IDENTITY_ADAPTER: TypeAdapter[IdentityConfig] = TypeAdapter(IdentityConfig)
_TOKEN_ADAPTER: TypeAdapter[TokenConfig] = TypeAdapter(TokenConfig)


def parse_identity_config(data: object) -> IdentityConfig:
    """One identity's table (a mapping, as in the file) as its source's model; pydantic's ValidationError
    when it does not fit (load_config turns those into ConfigError). For tools and tests: the daemon reads
    whole files (load_config)."""
    return _IDENTITY_ADAPTER.validate_python(data)


def parse_token_config(data: object) -> TokenConfig:
    """One token source's table (a mapping, as in the file) as its flow's model; ValidationError as above."""
    return _TOKEN_ADAPTER.validate_python(data)


class UnixListenerConfig(_Strict):
    path: ExpandedPath = Path("/run/wlidd/wlidd.sock")
    mode: FileMode = 0o660
    owner: str | None = None
    group: str | None = None
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_caller: int = Field(default=64, ge=1)  # per uid (per remote address off loopback)
    first_byte_timeout: Duration = 5.0  # from accept to the first request byte, TLS handshake included
    request_timeout: Duration = 10.0
    idle_timeout: Duration = 60.0


class MetadataListenerConfig(_Strict):
    """A GCE-metadata-compatible API on loopback, serving one token source to unmodified Google libraries."""

    address: str = "127.0.0.1:8980"
    token: str
    email: str | None = None
    project_id: str = "wlidd-project"
    numeric_project_id: str = "0"
    universe_domain: str = "googleapis.com"
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_caller: int = Field(default=64, ge=1)  # per uid (per remote address off loopback)
    first_byte_timeout: Duration = 5.0  # from accept to the first request byte, TLS handshake included
    request_timeout: Duration = 10.0
    idle_timeout: Duration = 60.0

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


def split_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8980' or '[::1]:8980' -> (host, port). InvalidValue ("address") for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise InvalidValue("address", f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def _address(address: str) -> tuple[str, int]:
    """`split_address` in a validator: its InvalidValue as the ValueError pydantic reports against the key
    (pydantic turns only a ValueError or an AssertionError raised in a validator into a validation error)."""
    try:
        return split_address(address)
    except InvalidValue as exc:
        raise ValueError(exc.message) from None


def _matcher(pattern: str) -> None:
    """`parse_matcher` in a validator: its InvalidValue as the ValueError pydantic reports (see `_address`)."""
    try:
        parse_matcher(pattern)
    except InvalidValue as exc:
        raise ValueError(exc.message) from None


class MtlsListenerConfig(_Strict):
    """An mTLS TCP listener presenting an identity's SVID; callers are told apart by their SPIFFE ID."""

    address: str = "127.0.0.1:8443"
    identity: str
    allow: tuple[str, ...]
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_caller: int = Field(default=64, ge=1)  # per uid (per remote address off loopback)
    first_byte_timeout: Duration = 5.0  # from accept to the first request byte, TLS handshake included
    request_timeout: Duration = 10.0
    idle_timeout: Duration = 60.0

    @model_validator(mode="after")
    def _check(self) -> MtlsListenerConfig:
        _address(self.address)
        if not self.allow:
            raise ValueError("allow: name at least one SPIFFE ID matcher (exact, spiffe://td, '*' or '**' patterns)")
        for pattern in self.allow:
            _matcher(pattern)
        return self


class WorkloadApiListenerConfig(_Strict):
    """The SPIFFE Workload API (gRPC) on a Unix socket; callers are told apart by SO_PEERCRED."""

    path: ExpandedPath = Path("/run/wlidd/workload.sock")
    mode: FileMode = 0o666
    owner: str | None = None
    group: str | None = None
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_caller: int = Field(default=16, ge=1)  # per uid: a client holds one (HTTP/2 multiplexes)
    first_byte_timeout: Duration = 5.0  # from accept to the HTTP/2 preface


class MetricsListenerConfig(_Strict):
    """A plain-HTTP listener for Prometheus: GET /metrics, /v1/health and /v1/live only, nothing secret, no caller
    authorization. Any address may be given (a pod's scraper is not on loopback); the daemon warns when it
    is not a loopback one."""

    address: str = "127.0.0.1:9464"
    max_connections: int = Field(default=64, ge=1)  # a scraper holds one connection, a health probe one per probe
    max_connections_per_caller: int = Field(default=16, ge=1)  # per uid on loopback, per remote address otherwise
    first_byte_timeout: Duration = 5.0  # from accept to the first request byte
    request_timeout: Duration = 10.0
    idle_timeout: Duration = 60.0

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


class AccessRule(_Strict):
    """Who may have something: Unix users and groups (by name or number) on the Unix socket and the
    metadata listener; SPIFFE ID matchers on the mTLS listener."""

    users: tuple[str | int, ...] = ()
    groups: tuple[str | int, ...] = ()
    spiffe_ids: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_matchers(self) -> AccessRule:
        for pattern in self.spiffe_ids:
            _matcher(pattern)
        return self


class PolicyConfig(_Strict):
    """Who may call what over the Unix socket. Per-name rules replace the defaults for that name."""

    tokens: AccessRule = Field(default_factory=lambda: AccessRule(users=("root",), groups=("wlidd-clients",)))
    credentials: AccessRule = Field(default_factory=lambda: AccessRule(users=("root",)))
    token: dict[str, AccessRule] = Field(default_factory=dict)
    identity: dict[str, AccessRule] = Field(default_factory=dict)


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of the process environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


class Config(BaseSettings):
    """The whole configuration. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    identities: dict[str, IdentityConfig] = Field(default_factory=dict)
    tokens: dict[str, TokenConfig] = Field(default_factory=dict)
    listeners: ListenersConfig = Field(default_factory=ListenersConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    _toml_file: ClassVar[Path | None] = None
    _environ: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _MappingEnvSource(settings_cls, cls._environ),
        ]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _check_names(self) -> Config:
        for kind, names in (("identity", self.identities), ("token", self.tokens)):
            for name in names:
                if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                    raise ValueError(f"{kind} name {name!r} may only hold letters, digits, '_', '.', '-'")
        for kind, rules, known_names in (
            ("token", self.policy.token, self.tokens),
            ("identity", self.policy.identity, self.identities),
        ):
            for name in rules:
                if name not in known_names:
                    raise ValueError(f"policy.{kind}.{name}: no {kind} named {name!r}")
        mtls = self.listeners.mtls
        if mtls is not None and mtls.identity not in self.identities:
            raise ValueError(f"listeners.mtls.identity: no identity named {mtls.identity!r}")
        metadata = self.listeners.metadata
        if metadata is not None:
            if metadata.token not in self.tokens:
                raise ValueError(f"listeners.metadata.token: no token named {metadata.token!r}")
            source = self.tokens[metadata.token]
            if metadata.email is None and (source.impersonate is None):
                raise ValueError("listeners.metadata.email: needed when the token impersonates no service account")
        for name, token in self.tokens.items():
            if token.identity is not None and token.identity not in self.identities:
                known = ", ".join(sorted(self.identities)) or "none"
                raise ValueError(f"tokens.{name}.identity: no identity named {token.identity!r} (configured: {known})")
        # Two sinks in one place would replace each other's generations (or files) on every write; places
        # are compared as real paths, so an alias (/var/run -> /run) is the same place.
        seen: dict[str, str] = {}
        places = [
            (os.path.realpath(sink.dir), f"identities.{name}.sinks[{index}].dir")
            for name, identity in self.identities.items()
            for index, sink in enumerate(identity.sinks)
        ]
        places += [
            (os.path.realpath(sink.path), f"tokens.{name}.sinks[{index}].path")
            for name, token in self.tokens.items()
            for index, sink in enumerate(token.sinks)
        ]
        for place, where in places:
            if place in seen:
                raise ValueError(f"{where}: {place} is also {seen[place]}; each sink needs a place of its own")
            seen[place] = where
        return self


def config_path_from(cli_path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """``--config`` wins, then ``WLIDD_CONFIG``, then the default path."""
    if cli_path is not None:
        return Path(os.path.expanduser(str(cli_path)))
    if environ.get("WLIDD_CONFIG"):
        return Path(os.path.expanduser(environ["WLIDD_CONFIG"]))
    return DEFAULT_CONFIG_PATH


def _env_key_for(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def _check_env_names(environ: Mapping[str, str]) -> None:
    top = set(Config.model_fields)
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name == "WLIDD_CONFIG":
            continue
        first = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if first not in top:
            raise ConfigError(f"environment {name}: unknown key {first!r} (known: {', '.join(sorted(top))})")


def _variant_of(loc: tuple[int | str, ...]) -> tuple[str, str, dict[str, type[BaseModel]]] | None:
    """(discriminator key, tag, variants) when `loc` runs through a variant of one of Config's tagged
    unions (identities.<name>.<tag>…, tokens.<name>.<tag>…: pydantic puts the tag in the location)."""
    if len(loc) >= 3 and isinstance(loc[0], str) and loc[0] in _VARIANTS:
        discriminator, variants = _VARIANTS[loc[0]]
        if isinstance(loc[2], str) and loc[2] in variants:
            return discriminator, loc[2], variants
    return None


def _one_of(tags: Iterable[str]) -> str:
    quoted = [repr(tag) for tag in tags]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


def _needed(model: type[BaseModel], name: str) -> str:
    """A required key of `model` as a "needs" line names it: a table with its own required keys
    ("sts (sts.audience)"), or the key with its description."""
    info = model.model_fields[name]
    table = info.annotation
    if isinstance(table, type) and issubclass(table, BaseModel):
        keys = [f"{name}.{key}" for key, field in table.model_fields.items() if field.is_required()]
        return f"{name} ({', '.join(keys)})" if keys else name
    return f"{name} ({info.description})" if info.description else name


def _describe(error: Mapping[str, Any], path: Path | None, environ: Mapping[str, str]) -> str:
    """One line: where the value came from, the key as written (a union's tag taken out of the location)
    and what is wrong; a key that belongs to another `source` or `flow` says to which."""
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    variant = _variant_of(loc)
    if variant is not None:
        loc = loc[:2] + loc[3:]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found") and loc and loc[0] in _VARIANTS:
        discriminator, variants = _VARIANTS[str(loc[0])]
        loc = (*loc, discriminator)
        if error["type"] == "union_tag_invalid":
            message = f"{error['ctx']['tag']!r} is not a {discriminator}: use {_one_of(variants)}"
        else:
            message = f"Field required: {_one_of(variants)}"
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
        if variant is not None and len(loc) == 3:
            discriminator, tag, variants = variant
            owners = [other for other, model in variants.items() if loc[2] in model.model_fields]
            if owners:
                message = f"only for {discriminator} {_one_of(owners)}, not for {discriminator} {tag!r}"
    key = ".".join(str(part) for part in loc) or "(top level)"
    env_name = _env_key_for(loc)
    where = f"environment {env_name}" if env_name in environ else (str(path) if path else "defaults")
    return f"{where}: {key}: {message}"


def _problems(errors: Iterable[Mapping[str, Any]], path: Path | None, environ: Mapping[str, str]) -> list[str]:
    """One line per validation error, except that the keys a variant misses are named on one line, on
    its table ("identities.web: source 'files' needs key, bundle"), where the first of them was."""
    lines: list[str] = []
    needs: dict[tuple[int | str, ...], tuple[int, list[str]]] = {}  # a variant's table → its line, keys
    for error in errors:
        loc = tuple(error["loc"])
        variant = _variant_of(loc)
        if error["type"] == "missing" and variant is not None and len(loc) == 4:
            discriminator, tag, variants = variant
            if loc[:3] not in needs:
                needs[loc[:3]] = (len(lines), [])
                lines.append(f"{path or 'defaults'}: {loc[0]}.{loc[1]}: {discriminator} {tag!r} needs ")
            needs[loc[:3]][1].append(_needed(variants[tag], str(loc[3])))
        else:
            lines.append(_describe(error, path, environ))
    for index, keys in needs.values():
        lines[index] += ", ".join(keys)
    return lines


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError naming the key and the file."""
    env = dict(os.environ if environ is None else environ)
    if path is not None:
        try:
            with path.open("rb") as handle:
                tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except PermissionError:
            raise ConfigError(f"{path}: config file not readable (permission denied)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _check_env_names(env)
    try:
        Config._toml_file, Config._environ = path, env
        return Config()
    except ValidationError as exc:
        problems = _problems(exc.errors(), path, env)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    finally:
        Config._toml_file, Config._environ = None, {}


def read_certificate_config(path: Path) -> tuple[Path, Path]:
    """The workload cert and key paths from a certificate_config.json (SPECS.md §1.1)."""
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: certificate config not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: certificate config unreadable or not JSON: {exc}") from None
    workload = document.get("cert_configs", {}).get("workload") if isinstance(document, dict) else None
    if not isinstance(workload, dict):
        raise ConfigError(f"{path}: cert_configs.workload: missing")
    paths = []
    for key in ("cert_path", "key_path"):
        value = workload.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: cert_configs.workload.{key}: missing or not a string")
        paths.append(Path(os.path.expanduser(value)))
    return paths[0], paths[1]


SERVICE_USER = "wlidd"  # the shipped unit's User=


def unreadable_by_service(path: Path, user: str = SERVICE_USER) -> str | None:
    """Why the service user could not read the config file at `path` (the shipped unit runs as
    `User=wlidd`), or None when it could, or when that user does not exist on this host. Judged from
    the mode bits and ownership of the file and of every directory on the way (execute to traverse),
    with the user's groups from the group database; POSIX ACLs are not consulted (a warning may then
    be too cautious, never silent about the mode)."""
    import stat as stat_module

    account = account_by_name(user)
    if account is None:
        return None
    groups = member_of(user, account.pw_gid)
    if account.pw_uid == 0:
        return None

    def allowed(st: os.stat_result, bits: int) -> bool:
        if st.st_uid == account.pw_uid:
            shift = 6
        elif st.st_gid in groups:
            shift = 3
        else:
            shift = 0
        return (stat_module.S_IMODE(st.st_mode) >> shift) & bits == bits

    absolute = Path(os.path.abspath(path))
    for directory in reversed(absolute.parents):
        try:
            st = os.stat(directory)
        except OSError:
            return None
        if not allowed(st, 0o1):
            mode = stat_module.S_IMODE(st.st_mode)
            return f"directory {directory} ({owner_names(st)}, mode {mode:04o}) cannot be traversed by user {user}"
    try:
        st = os.stat(absolute)
    except OSError:
        return None
    if not allowed(st, 0o4):
        mode = stat_module.S_IMODE(st.st_mode)
        return (
            f"{absolute} ({owner_names(st)}, mode {mode:04o}) is not readable by user {user}, whom the shipped unit"
            f" runs as (User={user}): the daemon would exit 2 at every start; it holds no secrets:"
            f" chmod 0644 {absolute}"
        )
    return None
