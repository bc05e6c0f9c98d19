"""Configuration: a TOML file plus ``WLIDD_*`` environment overrides, validated once.

The names are a contract (../shared/CONFIG.md): add options, never rename them. Every error
names the key and where its value came from (the file, or the environment variable).

One module per part of the schema (docs/CONFIG.md follows it); the rest of wlidd imports every public
name from here (`from wlidd.config import Config`):

- `values`: durations, file modes, paths, host:port addresses, upstream URLs, user and group names,
  SPIFFE ID matchers, and the strict model every table is;
- `sinks`: the credential and token files and their readers;
- `identities`: one model per identity `source`, and certificate_config.json;
- `tokens`: one model per token `flow`, and the tables of their upstreams;
- `listeners`: the Unix socket, metadata, mTLS, Workload API and metrics listeners;
- `policy`: who may have what;
- `root`: the whole `Config`, the checks across its tables, and where the file is;
- `load`: reading the file and the environment, one line per error; whether the service user can read it;
- `environment`: the ``WLIDD_*`` variables, read by pydantic-settings; imported only when one is set.
"""

from __future__ import annotations

from wlidd.config.identities import (
    DEFAULT_CERTIFICATE_CONFIG,
    DEFAULT_GCE_DIR,
    CertificateConfigIdentityConfig,
    FilesIdentityConfig,
    GceIdentityConfig,
    IdentityConfig,
    parse_identity_config,
)
from wlidd.config.listeners import (
    ConnectionLimits,
    ListenersConfig,
    MetadataListenerConfig,
    MetricsListenerConfig,
    MtlsListenerConfig,
    UnixListenerConfig,
    WorkloadApiListenerConfig,
)
from wlidd.config.load import SERVICE_USER, load_config, unreadable_by_service
from wlidd.config.policy import AccessRule, PolicyConfig
from wlidd.config.root import DEFAULT_CONFIG_PATH, ENV_PREFIX, Config, DaemonConfig, config_path_from
from wlidd.config.sinks import CredentialSinkConfig, SinkConfig, SinkReaders
from wlidd.config.tokens import (
    DEFAULT_SCOPE,
    EntraConfig,
    EntraStsTokenConfig,
    GceMetadataTokenConfig,
    ImpersonateConfig,
    MetadataConfig,
    StsConfig,
    StsTokenConfig,
    TokenConfig,
    X509StsTokenConfig,
    parse_token_config,
)
from wlidd.config.values import (
    SECRET_WORDS,
    Duration,
    ExpandedPath,
    FileMode,
    parse_duration,
    redact_url,
    split_address,
)

__all__ = [
    "DEFAULT_CERTIFICATE_CONFIG",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_GCE_DIR",
    "DEFAULT_SCOPE",
    "ENV_PREFIX",
    "SECRET_WORDS",
    "SERVICE_USER",
    "AccessRule",
    "CertificateConfigIdentityConfig",
    "Config",
    "ConnectionLimits",
    "CredentialSinkConfig",
    "DaemonConfig",
    "Duration",
    "EntraConfig",
    "EntraStsTokenConfig",
    "ExpandedPath",
    "FileMode",
    "FilesIdentityConfig",
    "GceIdentityConfig",
    "GceMetadataTokenConfig",
    "IdentityConfig",
    "ImpersonateConfig",
    "ListenersConfig",
    "MetadataConfig",
    "MetadataListenerConfig",
    "MetricsListenerConfig",
    "MtlsListenerConfig",
    "PolicyConfig",
    "SinkConfig",
    "SinkReaders",
    "StsConfig",
    "StsTokenConfig",
    "TokenConfig",
    "UnixListenerConfig",
    "WorkloadApiListenerConfig",
    "X509StsTokenConfig",
    "config_path_from",
    "load_config",
    "parse_duration",
    "parse_identity_config",
    "parse_token_config",
    "redact_url",
    "split_address",
    "unreadable_by_service",
]
