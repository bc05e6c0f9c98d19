"""Where an identity's X.509-SVID comes from: one model per `source` (`identities.<name>`), each with
exactly its keys, and the certificate_config.json that names a workload's files (SPECS.md §1.1)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, TypeAdapter, model_validator

from wlidd.config.sinks import CredentialSinkConfig
from wlidd.config.values import Duration, ExpandedPath, _Strict
from wlidd.errors import SvidError
from wlidd.svid.spiffeid import TrustDomain

DEFAULT_GCE_DIR = Path("/var/run/secrets/workload-spiffe-credentials")
DEFAULT_CERTIFICATE_CONFIG = Path("~/.config/gcloud/certificate_config.json")


def _is_trust_domain(name: str) -> bool:
    try:
        TrustDomain(name)
    except SvidError:
        return False
    return True


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
            if domain is not None and not _is_trust_domain(domain):
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

_IDENTITY_ADAPTER: TypeAdapter[IdentityConfig] = TypeAdapter(IdentityConfig)


def parse_identity_config(data: object) -> IdentityConfig:
    """One identity's table (a mapping, as in the file) as its source's model; pydantic's ValidationError
    when it does not fit (load_config turns those into ConfigError). For tools and tests: the daemon reads
    whole files (load_config)."""
    return _IDENTITY_ADAPTER.validate_python(data)
