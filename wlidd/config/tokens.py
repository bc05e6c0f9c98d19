"""Token sources: one model per `flow` (`tokens.<name>`), each with exactly its keys, and the tables of
their upstreams (Entra ID, STS, IAM impersonation, the metadata server)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, TypeAdapter, model_validator

from wlidd.config.sinks import SinkConfig
from wlidd.config.values import Duration, ExpandedPath, _check_url, _Strict


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

_TOKEN_ADAPTER: TypeAdapter[TokenConfig] = TypeAdapter(TokenConfig)


def parse_token_config(data: object) -> TokenConfig:
    """One token source's table (a mapping, as in the file) as its flow's model; ValidationError as above."""
    return _TOKEN_ADAPTER.validate_python(data)
