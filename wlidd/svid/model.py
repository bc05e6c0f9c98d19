"""Frozen values of identity material: TrustBundle, BundleSet, Svid, and the Identity built from them (the
SpiffeId and TrustDomain they carry live in wlidd.svid.spiffeid, beside their parser)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wlidd.svid.spiffeid import SpiffeId, TrustDomain

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _pem(certs: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class TrustBundle:
    """The X.509 authorities of one trust domain (a name that is not a trust domain is refused: SvidError)."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", TrustDomain(self.trust_domain))

    @property
    def pem(self) -> bytes:
        return _pem(self.authorities)

    def fingerprint(self) -> str:
        return hashlib.sha256(b"".join(sorted(c.fingerprint(hashes.SHA256()) for c in self.authorities))).hexdigest()


@dataclass(frozen=True)
class BundleSet:
    """One TrustBundle per trust domain; the SVID's own domain and any federated ones (sorted by name)."""

    bundles: Mapping[TrustDomain, TrustBundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_domain = {TrustDomain(td): bundle for td, bundle in sorted(self.bundles.items())}
        object.__setattr__(self, "bundles", MappingProxyType(by_domain))

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter(self.bundles.values())

    def __len__(self) -> int:
        return len(self.bundles)

    def get(self, trust_domain: str) -> TrustBundle | None:
        """The bundle of `trust_domain`; None for a domain without one (any name may be asked: a TrustDomain is
        its name as a str, so a name finds it)."""
        return cast("Mapping[str, TrustBundle]", self.bundles).get(trust_domain)

    @property
    def trust_domains(self) -> tuple[TrustDomain, ...]:
        return tuple(self.bundles)

    @property
    def all_authorities(self) -> tuple[x509.Certificate, ...]:
        return tuple(c for bundle in self.bundles.values() for c in bundle.authorities)

    @property
    def pem(self) -> bytes:
        return _pem(self.all_authorities)

    def fingerprint(self) -> str:
        parts = [f"{td}={b.fingerprint()}" for td, b in self.bundles.items()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Svid:
    """A validated X.509-SVID: chain (leaf first), its private key, and what the checks warned about.

    The key never appears in a repr; `key_pem()` is the one way to get it out.
    """

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False, compare=False)
    warnings: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        """The earliest expiry in the chain: the SVID is unusable once any member expires."""
        return min(c.not_valid_after_utc for c in self.chain)

    @property
    def chain_pem(self) -> bytes:
        return _pem(self.chain)

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def key_der(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def seconds_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds()

    def is_valid_at(self, now: dt.datetime) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(frozen=True)
class BundleProblem:
    """A federated trust domain whose bundle could not be read or parsed in this set.

    `kept` tells whether the last good copy of its bundle is still used (False: none was ever loaded,
    so the domain is left out until its bundle is readable)."""

    trust_domain: str
    reason: str
    message: str
    kept: bool


@dataclass(frozen=True)
class Identity:
    """A validated identity: the Svid, the bundles of every configured trust domain, and its origin."""

    svid: Svid
    bundles: BundleSet
    fingerprint: str
    origin: str
    notes: tuple[str, ...] = ()
    bundle_problems: tuple[BundleProblem, ...] = ()

    @property
    def own_bundle(self) -> TrustBundle:
        bundle = self.bundles.get(self.svid.spiffe_id.trust_domain)
        assert bundle is not None
        return bundle
