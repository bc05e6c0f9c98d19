"""Malformed credential sets: each is refused with its own reason and the last good set stays.

Two tables: VALIDATION_CASES, one per reason of the pure core (`validate_svid` over certificates and a key
in memory, `now` passed in: no files, no loop); CASES, credential files a watcher reloads, for the
refusals that come from reading and parsing files or from the configuration, and a few of the core's to
show they travel the same way, each keeping the last good set.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import TD, FileSet
from wlidd.emulator.ca import CertificateAuthority, cert_pem, key_pem, key_usage, make_ca_cert, new_key
from wlidd.errors import SvidError
from wlidd.svid.credential_set import build_identity
from wlidd.svid.model import BundleSet, PrivateKey, TrustBundle
from wlidd.svid.validate import MAX_CHAIN_DEPTH, validate_svid
from wlidd.watch import CredentialWatcher

HOUR = dt.timedelta(hours=1)


@dataclass
class Cas:
    ca: CertificateAuthority
    other: CertificateAuthority
    foreign: CertificateAuthority
    now: dt.datetime


@pytest.fixture
def cas(
    ca: CertificateAuthority, other_ca: CertificateAuthority, foreign_ca: CertificateAuthority, now: dt.datetime
) -> Cas:
    return Cas(ca, other_ca, foreign_ca, now)


# ---- the pure core: validate_svid, one case per reason ---------------------------------------------------


@dataclass
class Inputs:
    """validate_svid's arguments: the chain (leaf first), the key, the bundles, the trust domain expected."""

    chain: list[x509.Certificate]
    key: PrivateKey = field(repr=False)
    bundles: BundleSet
    trust_domain: str | None = None


def anchors(*authorities: CertificateAuthority) -> BundleSet:
    """One bundle per authority's trust domain, holding its root."""
    return BundleSet({a.trust_domain: TrustBundle(a.trust_domain, (a.root,)) for a in authorities})


def issued(c: Cas, authority: CertificateAuthority | None = None, **defects: Any) -> Inputs:
    """An SVID of `authority` (default: the trusted CA) with `defects` (issue_svid's keywords), to be
    validated against the trusted CA's bundle."""
    svid = (authority or c.ca).issue_svid(**defects)
    return Inputs(svid.chain, svid.key, anchors(c.ca))


def spiffe_id(value: str) -> Callable[[Cas], Inputs]:
    return lambda c: issued(c, spiffe_id=value)


def stale_intermediate(c: Cas, *, expired: bool) -> Inputs:
    """An SVID signed by an intermediate of the trusted root that expired an hour ago (or starts in one)."""
    key = new_key()
    start, end = (c.now - 3 * HOUR, c.now - HOUR) if expired else (c.now + HOUR, c.now + 3 * HOUR)
    intermediate = make_ca_cert(
        key, "stale intermediate", issuer=(c.ca.root, c.ca.root_key), not_before=start, not_after=end
    )
    return issued(c, signer=(intermediate, key), now=c.now)


def too_long_a_chain(c: Cas) -> Inputs:
    inputs = issued(c)
    assert c.ca.intermediate is not None
    return replace(inputs, chain=inputs.chain + [c.ca.intermediate] * MAX_CHAIN_DEPTH)


VALIDATION_CASES: dict[str, Callable[[Cas], Inputs]] = {
    "chain_empty": lambda c: replace(issued(c), chain=[]),
    "leaf_no_uri_san": lambda c: issued(c, uris=[], dns_names=["app.example.org"]),
    "leaf_multiple_uri_sans": lambda c: issued(c, uris=[f"spiffe://{TD}/a", f"spiffe://{TD}/b"]),
    "spiffe_id_too_long": spiffe_id(f"spiffe://{TD}/" + "a" * 2048),
    "spiffe_id_bad_scheme": spiffe_id("https://example.org/ns/a"),
    "spiffe_id_query": spiffe_id("spiffe://example.org/ns/a?x=1"),
    "spiffe_id_fragment": spiffe_id("spiffe://example.org/ns/a#frag"),
    "spiffe_id_empty_trust_domain": spiffe_id("spiffe:///ns/a"),
    "spiffe_id_uppercase_trust_domain": spiffe_id("spiffe://Example.org/ns/a"),
    "spiffe_id_port": spiffe_id("spiffe://example.org:8443/ns/a"),
    "spiffe_id_userinfo": spiffe_id("spiffe://user@example.org/ns/a"),
    "spiffe_id_percent_encoded": spiffe_id("spiffe://example.org/ns/a%20b"),
    "spiffe_id_bad_trust_domain_char": spiffe_id("spiffe://exa*mple.org/ns/a"),
    "spiffe_id_trailing_slash": spiffe_id("spiffe://example.org/ns/a/"),
    "spiffe_id_empty_segment": spiffe_id("spiffe://example.org/ns//a"),
    "spiffe_id_dot_segment": spiffe_id("spiffe://example.org/ns/../a"),
    "spiffe_id_bad_path_char": spiffe_id("spiffe://example.org/ns/a*b"),
    "spiffe_id_no_path": spiffe_id("spiffe://example.org"),
    "leaf_is_ca": lambda c: issued(c, ca=True),
    "leaf_no_key_usage": lambda c: issued(c, key_usage=None),
    "leaf_key_cert_sign": lambda c: issued(c, key_usage=key_usage(key_cert_sign=True)),
    "leaf_crl_sign": lambda c: issued(c, key_usage=key_usage(crl_sign=True)),
    "leaf_no_digital_signature": lambda c: issued(c, key_usage=key_usage(digital_signature=False)),
    "leaf_eku_missing": lambda c: issued(c, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
    "wrong_trust_domain": lambda c: replace(issued(c, c.foreign), bundles=anchors(c.foreign), trust_domain=TD),
    "leaf_key_rsa_too_small": lambda c: issued(c, key_kind="rsa1024"),
    "leaf_key_curve_unsupported": lambda c: issued(c, key_kind="ec521"),
    "leaf_key_type_unsupported": lambda c: issued(c, key_kind="ed25519"),
    "key_mismatch": lambda c: replace(issued(c), key=new_key()),
    "leaf_not_yet_valid": lambda c: issued(c, not_before=c.now + HOUR, not_after=c.now + 2 * HOUR),
    "leaf_expired": lambda c: issued(c, not_before=c.now - 2 * HOUR, not_after=c.now - HOUR),
    "intermediate_not_yet_valid": lambda c: stale_intermediate(c, expired=False),
    "intermediate_expired": lambda c: stale_intermediate(c, expired=True),
    "no_bundle_for_trust_domain": lambda c: replace(issued(c), bundles=anchors(c.foreign)),
    "chain_too_long": too_long_a_chain,
    "chain_other_trust_domain": lambda c: replace(
        issued(c, c.foreign, spiffe_id=f"spiffe://{TD}/ns/x/sa/y"), bundles=anchors(c.ca, c.foreign)
    ),
    "chain_incomplete": lambda c: issued(c, include_intermediate=False),
    "chain_untrusted": lambda c: issued(c, c.other),
}


@pytest.mark.parametrize("reason", list(VALIDATION_CASES))
def test_validate_svid_refuses_each_defect_with_its_reason(reason: str, cas: Cas) -> None:
    inputs = VALIDATION_CASES[reason](cas)
    with pytest.raises(SvidError) as info:
        validate_svid(inputs.chain, inputs.key, inputs.bundles, cas.now, trust_domain=inputs.trust_domain)
    assert info.value.reason == reason, info.value.message


def test_validate_svid_accepts_the_sound_svid_every_case_starts_from(cas: Cas) -> None:
    """The cases above differ from this one in their defect only."""
    inputs = issued(cas)
    svid = validate_svid(inputs.chain, inputs.key, inputs.bundles, cas.now, trust_domain=TD)
    assert (str(svid.spiffe_id), svid.warnings) == (f"spiffe://{TD}/ns/default/sa/app", ())


# ---- the files a watcher reloads ---------------------------------------------------------------------------


@dataclass
class Defect:
    chain: bytes
    key: bytes
    bundle: bytes | None = None
    config: dict[str, object] = field(default_factory=dict)
    extra_files: dict[str, bytes] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


def svid_files(authority: CertificateAuthority, /, **kwargs: object) -> Defect:
    svid = authority.issue_svid(**kwargs)  # type: ignore[arg-type]
    return Defect(svid.chain_pem, svid.key_pem)


def with_id(spiffe_id: str) -> Callable[[Cas], Defect]:
    return lambda c: svid_files(c.ca, spiffe_id=spiffe_id)


def leaf_from_foreign_ca(c: Cas) -> Defect:
    svid = c.foreign.issue_svid(spiffe_id=f"spiffe://{TD}/ns/x/sa/y")
    return Defect(svid.chain_pem, svid.key_pem, config={"bundles": {"other.org": "FOREIGN"}})


def key_of_another_cert(c: Cas) -> Defect:
    return Defect(c.ca.issue_svid().chain_pem, c.ca.issue_svid().key_pem)


def encrypted_key(c: Cas, fmt: str) -> Defect:
    svid = c.ca.issue_svid()
    return Defect(svid.chain_pem, key_pem(svid.key, fmt, password=b"secret-pass"))


def two_keys(c: Cas) -> Defect:
    svid = c.ca.issue_svid()
    return Defect(svid.chain_pem, svid.key_pem + key_pem(new_key()))


def key_in_chain_file(c: Cas) -> Defect:
    svid = c.ca.issue_svid()
    return Defect(svid.chain_pem + svid.key_pem, svid.key_pem)


def garbage_pem(c: Cas) -> Defect:
    svid = c.ca.issue_svid()
    damaged = svid.chain_pem.replace(b"\n", b"\n!!", 1)
    return Defect(damaged, svid.key_pem)


def truncated_chain(c: Cas) -> Defect:
    svid = c.ca.issue_svid()
    return Defect(svid.chain_pem[: len(svid.chain_pem) // 3], svid.key_pem)


def bundle(defect: Defect, data: bytes) -> Defect:
    defect.bundle = data
    return defect


CASES: dict[str, tuple[Callable[[Cas], Defect], str]] = {
    "wrong-trust-domain": (
        lambda c: Defect(*(lambda s: (s.chain_pem, s.key_pem))(c.foreign.issue_svid()), config={"trust_domain": TD}),
        "wrong_trust_domain",
    ),
    "leaf-issued-by-another-trust-domains-ca": (leaf_from_foreign_ca, "chain_other_trust_domain"),
    "expired-leaf": (lambda c: svid_files(c.ca, not_before=c.now - 2 * HOUR, not_after=c.now - HOUR), "leaf_expired"),
    "uppercase-scheme": (with_id("SPIFFE://example.org/ns/a"), "spiffe_id_bad_scheme"),
    "bundle-without-the-issuer": (lambda c: bundle(svid_files(c.ca), c.foreign.bundle_pem), "chain_incomplete"),
    "rsa-1024-key": (lambda c: svid_files(c.ca, key_kind="rsa1024"), "key_rsa_too_small"),
    "ed25519-key": (lambda c: svid_files(c.ca, key_kind="ed25519"), "key_type_unsupported"),
    "p521-key": (lambda c: svid_files(c.ca, key_kind="ec521"), "key_curve_unsupported"),
    "key-of-another-cert": (key_of_another_cert, "key_mismatch"),
    "encrypted-pkcs8-key": (lambda c: encrypted_key(c, "pkcs8"), "key_encrypted"),
    "encrypted-traditional-key": (lambda c: encrypted_key(c, "sec1"), "key_encrypted"),
    "two-keys-in-key-file": (two_keys, "key_multiple"),
    "private-key-in-chain-file": (key_in_chain_file, "chain_contains_private_key"),
    "garbage-pem": (garbage_pem, "chain_bad_pem"),
    "truncated-chain": (truncated_chain, "chain_bad_pem"),
    "der-garbage": (lambda c: Defect(b"\x30\x03\x02\x01\x00", c.ca.issue_svid().key_pem), "chain_bad_certificate"),
    "text-not-pem": (lambda c: Defect(b"hello world\n", c.ca.issue_svid().key_pem), "chain_not_pem"),
    "empty-chain-file": (lambda c: Defect(b"", c.ca.issue_svid().key_pem), "chain_empty"),
    "empty-key-file": (lambda c: Defect(c.ca.issue_svid().chain_pem, b"\n"), "key_empty"),
    "missing-key-file": (lambda c: Defect(c.ca.issue_svid().chain_pem, b"", remove=("key.pem",)), "file_missing"),
    "certificate-as-key": (lambda c: Defect(c.ca.issue_svid().chain_pem, c.ca.bundle_pem), "key_not_found"),
    "leaf-as-bundle": (
        lambda c: bundle(svid_files(c.ca), cert_pem(c.ca.issue_svid().leaf)),
        "bundle_not_ca",
    ),
    "garbage-bundle": (lambda c: bundle(svid_files(c.ca), b"not a bundle"), "bundle_not_pem"),
    "bad-json-bundle": (lambda c: bundle(svid_files(c.ca), b"{not json"), "bundle_bad_json"),
}


def _apply(files: FileSet, defect: Defect, cas: Cas) -> CredentialWatcher:
    overrides = dict(defect.config)
    if "bundles" in overrides:
        foreign = files.dir / "foreign.pem"
        foreign.write_bytes(cas.foreign.bundle_pem)
        overrides["bundles"] = {"other.org": foreign}
    return CredentialWatcher("default", files.source(**overrides))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.asyncio
async def test_malformed_set_is_rejected_with_its_reason_and_old_set_stays(case: str, files: FileSet, cas: Cas) -> None:
    make, reason = CASES[case]
    defect = make(cas)
    good = cas.ca.issue_svid("/ns/good/sa/app")
    files.put(good, cas.ca.bundle_pem)
    watcher = _apply(files, defect, cas)
    assert await watcher.reload("test") is True
    assert watcher.current is not None
    good_serial = watcher.current.identity.svid.serial

    files.write("chain.pem", defect.chain)
    files.write("key.pem", defect.key)
    if defect.bundle is not None:
        files.write("bundle.pem", defect.bundle)
    for name in defect.remove:
        (files.dir / name).unlink()

    assert await watcher.reload("test") is False
    assert watcher.stats.last_error_reason == reason, watcher.stats.last_error
    assert watcher.stats.rejections == 1
    assert watcher.current.identity.svid.serial == good_serial
    assert watcher.current.version == 1


def test_rejection_message_names_no_key_material(files: FileSet, cas: Cas) -> None:
    defect = key_of_another_cert(cas)
    files.write("chain.pem", defect.chain)
    files.write("key.pem", defect.key)
    files.write("bundle.pem", cas.ca.bundle_pem)
    with pytest.raises(SvidError) as info:
        build_identity(files.source().read(), cas.now)
    assert "PRIVATE KEY" not in str(info.value) and "PRIVATE KEY" not in repr(info.value)
    assert info.value.reason == "key_mismatch"


def test_key_usage_not_critical_is_accepted_with_a_warning(files: FileSet, cas: Cas) -> None:
    files.put(cas.ca.issue_svid(key_usage_critical=False), cas.ca.bundle_pem)
    identity = build_identity(files.source().read(), cas.now)
    assert any("not marked critical" in w for w in identity.svid.warnings)


@pytest.mark.parametrize(
    "fmt,kind", [("pkcs8", "ec256"), ("sec1", "ec384"), ("pkcs1", "rsa2048"), ("pkcs8", "rsa3072")]
)
def test_supported_key_formats_and_types_are_accepted(files: FileSet, cas: Cas, fmt: str, kind: str) -> None:
    svid = cas.ca.issue_svid(key_kind=kind, key_format=fmt)
    files.put(svid, cas.ca.bundle_pem)
    expected_label = {"pkcs8": b"BEGIN PRIVATE KEY", "sec1": b"BEGIN EC PRIVATE KEY", "pkcs1": b"BEGIN RSA PRIVATE KEY"}
    assert expected_label[fmt] in files.key.read_bytes()
    identity = build_identity(files.source().read(), cas.now)
    assert identity.svid.serial == format(svid.leaf.serial_number, "x")


def test_critical_san_beside_a_subject_is_accepted(files: FileSet, cas: Cas) -> None:
    files.put(cas.ca.issue_svid(san_critical=True, subject="workload"), cas.ca.bundle_pem)
    assert build_identity(files.source().read(), cas.now).svid.spiffe_id.path == "/ns/default/sa/app"


def test_empty_subject_with_critical_san_is_accepted(files: FileSet, cas: Cas) -> None:
    files.put(cas.ca.issue_svid(subject=None), cas.ca.bundle_pem)
    assert build_identity(files.source().read(), cas.now).svid.spiffe_id.trust_domain == TD


def test_der_encoded_chain_of_one_certificate_is_accepted(files: FileSet, cas: Cas) -> None:
    noint = CertificateAuthority(TD, intermediate=False)
    svid = noint.issue_svid()
    files.write("chain.pem", svid.leaf.public_bytes(serialization.Encoding.DER))
    files.write("key.pem", svid.key_pem)
    files.write("bundle.pem", noint.bundle_pem)
    assert build_identity(files.source().read(), cas.now).svid.serial == format(svid.leaf.serial_number, "x")


def test_spiffe_id_of_2048_bytes_is_accepted(files: FileSet, cas: Cas) -> None:
    prefix = f"spiffe://{TD}/"
    long_id = prefix + "/".join(["a" * 99] * 20)
    long_id = long_id[:2048].rstrip("/")
    files.put(cas.ca.issue_svid(spiffe_id=long_id), cas.ca.bundle_pem)
    assert str(build_identity(files.source().read(), cas.now).svid.spiffe_id) == long_id
