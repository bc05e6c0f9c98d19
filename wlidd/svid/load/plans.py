"""Where one source's files are: one plan per identity `source` (SPECS.md §1), chosen by the config's type.

gce                 a directory of certificates.pem, private_key.pem, ca_certificates.pem or trust_bundles.json
certificate_config  the chain and key a certificate_config.json names, read again with every set
files               the cert, key and bundle paths as configured
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, assert_never

from wlidd.config import (
    CertificateConfigIdentityConfig,
    FilesIdentityConfig,
    GceIdentityConfig,
    IdentityConfig,
)
from wlidd.errors import ConfigError, RetryableSvidError, SvidError
from wlidd.svid.load.files import read_regular_file, real_path

GCE_CHAIN = "certificates.pem"
GCE_KEY = "private_key.pem"
GCE_CA = "ca_certificates.pem"
GCE_TRUST_BUNDLES = "trust_bundles.json"
MAX_CERTIFICATE_CONFIG_BYTES = 64 * 1024  # a few paths in JSON; gcloud writes under 1 KiB


class SourcePlan(Protocol):
    """Where one source's files are: one class per identity `source` (GcePlan, CertificateConfigPlan,
    FilesPlan), chosen by the config's type when its CredentialSource is made (`plan_for`)."""

    def roles(self) -> dict[str, Path]:
        """The files to read as one set, by role: "chain", "key", "bundle", "trust_bundles" (GCE, read
        when present), "bundle:<trust domain>" per federated bundle, "certificate_config" (resolved
        with the set, never read as part of it). Raises SvidError when the set cannot be located now
        (RetryableSvidError when that may be a rotation in progress)."""
        ...

    def watched(self) -> list[Path]:
        """The paths whose directories (and the links on the way to them) are watched for a new set;
        never raises (a set that cannot be located now is watched where it will appear)."""
        ...

    def describe(self) -> str:
        """The one path that names this source in the status (`/v1/status` "path")."""
        ...


def _bundle_roles(bundle: Path | None, bundles: Mapping[str, Path]) -> dict[str, Path]:
    roles = {"bundle": bundle} if bundle is not None else {}
    return roles | {f"bundle:{trust_domain}": path for trust_domain, path in sorted(bundles.items())}


@dataclass(frozen=True)
class GcePlan:
    """source = "gce": a directory holding certificates.pem, private_key.pem (or `key`) and
    ca_certificates.pem or trust_bundles.json (or `bundle`): the GCE guest agent's symlink swap, a GKE/CSI
    plain directory written by the Kubernetes atomic writer, or files renamed into it (SPECS.md §1.2)."""

    config: GceIdentityConfig

    def _paths(self) -> dict[str, Path]:
        base, cfg = self.config.gce_dir(), self.config
        roles = {"chain": base / GCE_CHAIN, "key": cfg.key or base / GCE_KEY}
        if cfg.bundle is None:
            roles |= {"trust_bundles": base / GCE_TRUST_BUNDLES, "bundle": base / GCE_CA}
        return roles | _bundle_roles(cfg.bundle, cfg.bundles)

    def roles(self) -> dict[str, Path]:
        directory = self.config.gce_dir()
        if not real_path(directory).is_dir():
            raise RetryableSvidError("file_missing", f"{directory} does not lead to a directory (yet)")
        return self._paths()

    def watched(self) -> list[Path]:
        return [*self._paths().values(), self.config.gce_dir()]  # the directory link's swap, its creation

    def describe(self) -> str:
        return str(self.config.gce_dir())


@dataclass(frozen=True)
class CertificateConfigPlan:
    """source = "certificate_config": the chain and key named by the "workload" entry of a
    certificate_config.json (SPECS.md §1.1, as Google's client libraries read it), read again with every set."""

    config: CertificateConfigIdentityConfig
    environ: Mapping[str, str] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.config.certificate_config_path(self.environ)

    def roles(self) -> dict[str, Path]:
        path = self.path
        try:
            chain, key = read_certificate_config(path)
        except ConfigError as exc:
            if not path.exists():
                raise RetryableSvidError("file_missing", exc.message) from None
            raise SvidError("certificate_config_invalid", exc.message) from None
        roles = {"certificate_config": path, "chain": chain, "key": key}
        return roles | _bundle_roles(self.config.bundle, self.config.bundles)

    def watched(self) -> list[Path]:
        try:
            return list(self.roles().values())
        except SvidError:  # certificate_config.json missing or unreadable: watch it and the bundles
            return [self.path, *_bundle_roles(self.config.bundle, self.config.bundles).values()]

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class FilesPlan:
    """source = "files": the cert (chain), key and bundle paths as configured."""

    config: FilesIdentityConfig

    def roles(self) -> dict[str, Path]:
        roles = {"chain": self.config.cert, "key": self.config.key}
        return roles | _bundle_roles(self.config.bundle, self.config.bundles)

    def watched(self) -> list[Path]:
        return list(self.roles().values())

    def describe(self) -> str:
        return os.fspath(self.config.cert)


def plan_for(config: IdentityConfig, environ: Mapping[str, str]) -> SourcePlan:
    """The plan of `config`'s source, chosen by its type."""
    match config:
        case GceIdentityConfig():
            return GcePlan(config)
        case CertificateConfigIdentityConfig():
            return CertificateConfigPlan(config, environ)
        case FilesIdentityConfig():
            return FilesPlan(config)
    assert_never(config)


def read_certificate_config(path: Path) -> tuple[Path, Path]:
    """The workload cert and key paths from a certificate_config.json (SPECS.md §1.1); ConfigError naming
    the file and the key when it cannot be read or has none. Read as the credential files are: a regular
    file only (a FIFO would block the reading thread), at most MAX_CERTIFICATE_CONFIG_BYTES."""
    try:
        data = read_regular_file(path, MAX_CERTIFICATE_CONFIG_BYTES)
        if len(data) > MAX_CERTIFICATE_CONFIG_BYTES:
            raise ConfigError(f"{path}: certificate config larger than {MAX_CERTIFICATE_CONFIG_BYTES} bytes")
        document = json.loads(data)
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
