"""X509-SVID validation (spiffe/spiffe X509-SVID.md, SPECS.md §1.3): pure, `now` passed in.

Order of checks (the first failure is the reason reported):
  parse key → parse chain → leaf SVID rules → expected trust domain → key type → key matches leaf
  → validity window of every chain member → bundle of the leaf's trust domain → path validation.
"""

from __future__ import annotations

import datetime as dt
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from wlidd.errors import RetryableSvidError, SvidError
from wlidd.svid.model import BundleSet, PrivateKey, Svid
from wlidd.svid.parse import check_key_type
from wlidd.svid.spiffeid import SpiffeId, spiffe_id_from_cert

MAX_CHAIN_DEPTH = 8
_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def check_leaf(leaf: x509.Certificate) -> tuple[SpiffeId, tuple[str, ...]]:
    """The leaf's SPIFFE ID and warnings, or SvidError naming the X509-SVID rule it breaks."""
    spiffe_id = spiffe_id_from_cert(leaf)
    warnings: list[str] = []
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.value.ca:
        raise SvidError("leaf_is_ca", "leaf has basicConstraints cA=true; an X509-SVID leaf must not be a CA")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None:
        raise SvidError("leaf_no_key_usage", "leaf has no keyUsage extension; an X509-SVID needs digitalSignature")
    if usage.value.key_cert_sign:
        raise SvidError("leaf_key_cert_sign", "leaf keyUsage has keyCertSign; only CAs may sign certificates")
    if usage.value.crl_sign:
        raise SvidError("leaf_crl_sign", "leaf keyUsage has cRLSign; an X509-SVID leaf must not sign CRLs")
    if not usage.value.digital_signature:
        raise SvidError("leaf_no_digital_signature", "leaf keyUsage lacks digitalSignature")
    if not usage.critical:
        warnings.append("leaf keyUsage is not marked critical (X509-SVID §4.3 says it must be); accepted")
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if eku is not None:
        purposes = set(eku.value)
        missing = [
            name
            for name, oid in (
                ("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
                ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH),
            )
            if oid not in purposes
        ]
        if missing:
            raise SvidError("leaf_eku_missing", f"leaf extendedKeyUsage lacks {' and '.join(missing)}")
    return spiffe_id, tuple(warnings)


def _spki(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def check_key_matches(leaf: x509.Certificate, key: PrivateKey) -> None:
    """The key must be the leaf's; a mismatch may be a rotation in progress, so it is retryable."""
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise RetryableSvidError("key_mismatch", "private key does not match the leaf certificate")


def _describe(cert: x509.Certificate, index: int) -> str:
    return "leaf" if index == 0 else f"chain certificate {index + 1} ({cert.subject.rfc4514_string()!r})"


def check_validity(chain: list[x509.Certificate], now: dt.datetime) -> None:
    """Every chain member inside its validity window at `now`."""
    for index, cert in enumerate(chain):
        who = "leaf" if index == 0 else "intermediate"
        if now < cert.not_valid_before_utc:
            raise SvidError(
                f"{who}_not_yet_valid",
                f"{_describe(cert, index)} is not valid before {cert.not_valid_before_utc.isoformat()}",
            )
        if now >= cert.not_valid_after_utc:
            raise SvidError(
                f"{who}_expired",
                f"{_describe(cert, index)} expired at {cert.not_valid_after_utc.isoformat()}",
            )


def verify_chain(chain: list[x509.Certificate], bundles: BundleSet, spiffe_id: SpiffeId, now: dt.datetime) -> None:
    """RFC 5280 path validation to an anchor in the bundle of the leaf's own trust domain.

    Every certificate of that bundle is an anchor, self-signed or not (RFC 5280 §6.1.1(d)): a bundle
    holding only the issuing intermediate validates, exactly as the TLS contexts accept it
    (`wlidd.tlsctx.trust_every_anchor`); an anchor outside its validity window does not.

    Our X509-SVID checks replace the Web PKI leaf rules (which reject, e.g., a critical SAN beside a
    subject), so the leaf policy is permit_all; CA certificates keep the Web PKI CA rules.
    """
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        known = ", ".join(bundles.trust_domains) or "none"
        raise SvidError(
            "no_bundle_for_trust_domain",
            f"no trust bundle for trust domain {spiffe_id.trust_domain!r} (bundles for: {known})",
        )
    if len(chain) > MAX_CHAIN_DEPTH:
        raise SvidError("chain_too_long", f"chain has {len(chain)} certificates; at most {MAX_CHAIN_DEPTH}")
    verifier = (
        PolicyBuilder()
        .store(Store(list(bundle.authorities)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    top_issuer = chain[-1].issuer
    if top_issuer not in {c.subject for c in bundle.authorities}:
        for other in bundles:
            if other.trust_domain != spiffe_id.trust_domain and top_issuer in {c.subject for c in other.authorities}:
                raise SvidError(
                    "chain_other_trust_domain",
                    f"chain of {str(spiffe_id)!r} leads to the {other.trust_domain!r} bundle, not to its own "
                    f"{spiffe_id.trust_domain!r} bundle: one trust domain's CA cannot issue another's IDs",
                )
    known_subjects = {c.subject for c in chain[1:]} | {c.subject for c in bundle.authorities}
    for index, cert in enumerate(chain):
        if cert.issuer not in known_subjects and cert.issuer != cert.subject:
            raise SvidError(
                "chain_incomplete",
                f"issuer {cert.issuer.rfc4514_string()!r} of {_describe(cert, index)} is neither in the chain "
                f"nor in the {spiffe_id.trust_domain!r} bundle (missing intermediate?)",
            )
        if cert.issuer in {c.subject for c in bundle.authorities}:
            break
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        raise SvidError(
            "chain_untrusted",
            f"chain does not verify to the {spiffe_id.trust_domain!r} trust bundle: {exc}",
        ) from None


def validate_svid(
    chain: list[x509.Certificate],
    key: PrivateKey,
    bundles: BundleSet,
    now: dt.datetime,
    *,
    trust_domain: str | None = None,
) -> Svid:
    """A valid Svid, or SvidError with the reason of the first rule broken."""
    if not chain:
        raise SvidError("chain_empty", "chain has no certificate")
    leaf = chain[0]
    spiffe_id, warnings = check_leaf(leaf)
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise SvidError(
            "wrong_trust_domain",
            f"leaf SPIFFE ID {str(spiffe_id)!r} is not in the configured trust domain {trust_domain!r}",
        )
    check_key_type(leaf.public_key(), "leaf_key")
    check_key_matches(leaf, key)
    check_validity(chain, now)
    verify_chain(chain, bundles, spiffe_id, now)
    return Svid(spiffe_id=spiffe_id, chain=tuple(chain), private_key=key, warnings=warnings)
