"""Credential sink layouts, one naming scheme each, matching their consumers (pure: no I/O). "files"
(cert.pem, key.pem, bundle.pem, certificate_config.json), "spiffe-helper" (svid.pem, svid_key.pem,
svid_bundle.pem) and "spiffe-fs" (the SPIFFE Filesystem Delivery draft: credential-bundle.private-key.pem,
<trust domain>.spiffe-trust-bundle.pem).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from wlidd.config import CredentialSinkConfig
from wlidd.errors import InvalidValue
from wlidd.watch import IdentityState

# What every layout holds (see CredentialSinkConfig and the README's table): file name → content.
LAYOUTS: dict[str, str] = {
    "files": "cert.pem (chain), key.pem, bundle.pem (own trust domain), certificate_config.json",
    "spiffe-helper": "svid.pem (chain), svid_key.pem, svid_bundle.pem (own trust domain; + federated roots)",
    "spiffe-fs": "credential-bundle.private-key.pem (key, then chain), <trust domain>.spiffe-trust-bundle.pem",
}


CERTIFICATE_CONFIG = "certificate_config.json"


SPIFFE_FS_BUNDLE = "credential-bundle.private-key.pem"  # SPIFFE Filesystem Delivery draft, section 2.1


SPIFFE_FS_TRUST_BUNDLE = "{}.spiffe-trust-bundle.pem"  # ... section 2.2, one per trust domain


@dataclass(frozen=True)
class SinkFile:
    """One file of a credential sink: its name in the sink directory, its content and mode, and whether it
    holds the private key (`secret`: listed first, never logged). The content never shows in a repr.

    `name` is a plain file name: no '/', not '.' or '..', and not starting with '..' (reserved for the
    generations, as in Kubernetes' atomic writer); InvalidValue ("sink_file_name") otherwise.
    """

    name: str
    data: bytes = field(repr=False)
    mode: int
    secret: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\0" in self.name or self.name.startswith("..") or self.name == ".":
            raise InvalidValue(
                "sink_file_name", f"{self.name!r} is not a sink file name (no '/', not starting with '..')"
            )


@dataclass(frozen=True)
class Material:
    """What every layout is made of, as PEM: the private key (PKCS#8), the chain (leaf first), the own trust
    domain's bundle and the federated ones ((trust domain, PEM), sorted). The key never shows in a repr."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    trust_domain: str
    bundle_pem: bytes
    federated: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, state: IdentityState) -> Material:
        identity = state.identity
        own = identity.svid.spiffe_id.trust_domain
        return cls(
            key_pem=identity.svid.key_pem(),
            chain_pem=identity.svid.chain_pem,
            trust_domain=own,
            bundle_pem=identity.own_bundle.pem,
            federated=tuple((b.trust_domain, b.pem) for b in identity.bundles if b.trust_domain != own),
        )


def certificate_config_document(directory: Path) -> bytes:
    """certificate_config.json naming the stable paths of a "files" sink in `directory` (google-auth's
    "workload" entry: cert_path, key_path)."""
    entry = {"cert_path": str(directory / "cert.pem"), "key_path": str(directory / "key.pem")}
    return json.dumps({"version": 1, "cert_configs": {"workload": entry}}, indent=2).encode() + b"\n"


def layout_files(
    layout: str,
    material: Material,
    directory: Path,
    *,
    mode: int = 0o644,
    key_mode: int = 0o600,
    include_federated_domains: bool = False,
    certificate_config: str | None = CERTIFICATE_CONFIG,
) -> list[SinkFile]:
    """Every file `layout` has for `material`, the one holding the key first (pure). `certificate_config`:
    the name of the "files" layout's certificate_config.json in `directory` (None: written elsewhere).

    - "files": key.pem, cert.pem (chain), bundle.pem (own trust domain), certificate_config.json;
    - "spiffe-helper": svid_key.pem, svid.pem (chain), svid_bundle.pem (own trust domain's roots, then the
      federated ones with `include_federated_domains`), as spiffe-helper writes them (pkg/disk/x509.go);
    - "spiffe-fs": credential-bundle.private-key.pem (the PRIVATE KEY block, then the chain without any
      trust anchor of the own bundle) and <trust domain>.spiffe-trust-bundle.pem for every trust domain
      (SPIFFE Filesystem Delivery draft, sections 2.1 and 2.2).

    InvalidValue ("sink_layout") for an unknown layout.
    """
    if layout == "files":
        files = [
            SinkFile("key.pem", material.key_pem, key_mode, secret=True),
            SinkFile("cert.pem", material.chain_pem, mode),
            SinkFile("bundle.pem", material.bundle_pem, mode),
        ]
        if certificate_config is not None:
            files.append(SinkFile(certificate_config, certificate_config_document(directory), mode))
        return files
    if layout == "spiffe-helper":
        bundle = material.bundle_pem
        if include_federated_domains:
            bundle += b"".join(pem for _, pem in sorted(material.federated))
        return [
            SinkFile("svid_key.pem", material.key_pem, key_mode, secret=True),
            SinkFile("svid.pem", material.chain_pem, mode),
            SinkFile("svid_bundle.pem", bundle, mode),
        ]
    if layout == "spiffe-fs":
        bundles = sorted([(material.trust_domain, material.bundle_pem), *material.federated])
        return [
            SinkFile(
                SPIFFE_FS_BUNDLE,
                material.key_pem + _without_anchors(material.chain_pem, material.bundle_pem),
                key_mode,
                secret=True,
            ),
            *(SinkFile(SPIFFE_FS_TRUST_BUNDLE.format(td), pem, mode) for td, pem in bundles),
        ]
    raise InvalidValue("sink_layout", f"unknown sink layout {layout!r} (known: {', '.join(LAYOUTS)})")


def _without_anchors(chain_pem: bytes, bundle_pem: bytes) -> bytes:
    """The chain as PEM without the certificates the bundle holds (its trust anchors): the draft's credential
    bundle "MUST NOT contain the trust anchor". The leaf always stays."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        anchors = {c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(bundle_pem)}
    except ValueError:
        return chain_pem  # not ours to judge here: wlidd validated the set, the API handed it out
    kept = [chain[0], *(c for c in chain[1:] if c.public_bytes(Encoding.DER) not in anchors)]
    if len(kept) == len(chain):
        return chain_pem
    return b"".join(c.public_bytes(Encoding.PEM) for c in kept)


def credential_files(sink: CredentialSinkConfig, material: Material) -> list[SinkFile]:
    """The files of `sink`'s generation (layout_files with the sink's options; pure). A certificate_config
    outside the sink's directory is not among them (write_credentials writes it on its own)."""
    return layout_files(
        sink.layout,
        material,
        sink.dir,
        mode=sink.mode,
        key_mode=sink.key_mode,
        include_federated_domains=sink.include_federated_domains,
        certificate_config=config_name_inside(sink),
    )


def config_name_inside(sink: CredentialSinkConfig) -> str | None:
    """The name of the files layout's certificate_config.json when it lives in the sink's directory (part
    of each generation), None when it lives elsewhere (or the layout has none)."""
    if sink.layout != "files":
        return None
    path = sink.certificate_config
    if path is None:
        return CERTIFICATE_CONFIG
    if os.path.abspath(path.parent) == os.path.abspath(sink.dir):
        return path.name
    return None
