"""A small rotating CA for the demo, the tests and the benchmarks.

`CertificateAuthority` holds a root and (optionally) an intermediate for one trust domain and
issues X.509-SVIDs. Every knob a defect fixture needs is a keyword of `issue_svid`, so tests can
build "CA as leaf", "two URI SANs", "RSA 1024" and friends from the same code as the good path.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wlidd.emulator.produced import remember

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_UNSET: object = object()


def new_key(kind: str = "ec256") -> PrivateKey:
    """A fresh private key: ``ec256``, ``ec384``, ``rsa2048``, ``rsa1024``, ``ed25519``, ``ec521``."""
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ec521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def key_pem(key: PrivateKey, fmt: str = "pkcs8", password: bytes | None = None) -> bytes:
    """PEM of a private key as ``pkcs8``, ``sec1``/``pkcs1`` (traditional OpenSSL) or encrypted."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    pem_format = serialization.PrivateFormat.PKCS8 if fmt == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
    pem = key.private_bytes(serialization.Encoding.PEM, pem_format, encryption)
    remember("private key", pem)
    return pem


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca_cert(
    key: PrivateKey,
    common_name: str,
    *,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    spiffe_id: str | None = None,
    path_length: int | None = None,
) -> x509.Certificate:
    """A CA certificate: self-signed root when `issuer` is None, else an intermediate."""
    issuer_name = issuer[0].subject if issuer else _name(common_name)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(key), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
    return builder.sign(signing_key, _hash_for(signing_key))


@dataclass
class IssuedSvid:
    """One issued SVID: its chain (leaf first, intermediates, no root) and key, as PEM."""

    leaf: x509.Certificate
    chain: list[x509.Certificate]
    key: PrivateKey = field(repr=False)
    key_format: str = "pkcs8"

    @property
    def chain_pem(self) -> bytes:
        return cert_pem(*self.chain)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key, self.key_format)


class CertificateAuthority:
    """Root (+ intermediate) of one trust domain; issues X.509-SVIDs with every defect on request."""

    def __init__(
        self,
        trust_domain: str = "example.org",
        *,
        now: dt.datetime | None = None,
        lifetime: dt.timedelta = dt.timedelta(days=365),
        intermediate: bool = True,
        key_kind: str = "ec256",
    ) -> None:
        self.trust_domain = trust_domain
        start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)
        self.root_key = new_key(key_kind)
        self.root = make_ca_cert(
            self.root_key,
            f"{trust_domain} root",
            not_before=start,
            not_after=start + lifetime,
            spiffe_id=f"spiffe://{trust_domain}",
        )
        self.intermediate_key: PrivateKey | None = None
        self.intermediate: x509.Certificate | None = None
        if intermediate:
            self.intermediate_key = new_key(key_kind)
            self.intermediate = make_ca_cert(
                self.intermediate_key,
                f"{trust_domain} intermediate",
                issuer=(self.root, self.root_key),
                not_before=start,
                not_after=start + lifetime,
            )

    @property
    def bundle_pem(self) -> bytes:
        return cert_pem(self.root)

    @property
    def signer(self) -> tuple[x509.Certificate, PrivateKey]:
        if self.intermediate is not None and self.intermediate_key is not None:
            return self.intermediate, self.intermediate_key
        return self.root, self.root_key

    # long: one certificate builder whose every option is a defect fixture's knob
    def issue_svid(
        self,
        path: str = "/ns/default/sa/app",
        *,
        spiffe_id: str | None = None,
        uris: Sequence[str] | None = None,
        dns_names: Sequence[str] = (),
        now: dt.datetime | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
        key_kind: str = "ec256",
        key_format: str = "pkcs8",
        ca: bool = False,
        key_usage: object = _UNSET,
        key_usage_critical: bool = True,
        eku: Sequence[x509.ObjectIdentifier] | None = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        subject: str | None = "workload",
        san_critical: bool = False,
        signer: tuple[x509.Certificate, PrivateKey] | None = None,
        include_intermediate: bool = True,
    ) -> IssuedSvid:
        """Issue an SVID; every keyword is a way to make it wrong for a defect fixture."""
        start = now or dt.datetime.now(dt.UTC)
        leaf_key = key or new_key(key_kind)
        issuer_cert, issuer_key = signer or self.signer
        uri_list = list(uris) if uris is not None else [spiffe_id or f"spiffe://{self.trust_domain}{path}"]
        general_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_list]
        general_names += [x509.DNSName(d) for d in dns_names]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject) if subject else x509.Name([]))
            .issuer_name(issuer_cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or start - dt.timedelta(seconds=30))
            .not_valid_after(not_after or start + ttl)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .add_extension(_ski(leaf_key), critical=False)
        )
        if general_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(general_names), critical=san_critical or not subject
            )
        if key_usage is _UNSET:
            usage: x509.KeyUsage | None = x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            )
        else:
            assert key_usage is None or isinstance(key_usage, x509.KeyUsage)
            usage = key_usage
        if usage is not None:
            builder = builder.add_extension(usage, critical=key_usage_critical)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        leaf = builder.sign(issuer_key, _hash_for(issuer_key))
        chain = [leaf]
        if include_intermediate and issuer_cert is not self.root and issuer_cert.subject != issuer_cert.issuer:
            chain.append(issuer_cert)
        return IssuedSvid(leaf=leaf, chain=chain, key=leaf_key, key_format=key_format)


def key_usage(*, digital_signature: bool = True, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    """A KeyUsage value for defect fixtures."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def spiffe_bundle(*authorities: x509.Certificate, sequence: int | None = None) -> dict[str, object]:
    """A SPIFFE bundle (JWK Set) holding X.509 authorities (SPIFFE_Trust_Domain_and_Bundle.md)."""
    keys = [
        {"use": "x509-svid", "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()]}
        for c in authorities
    ]
    document: dict[str, object] = {"keys": keys}
    if sequence is not None:
        document["spiffe_sequence"] = sequence
    return document


def issue_server_cert(
    ca: CertificateAuthority,
    names: Sequence[str] = ("localhost", "127.0.0.1"),
    ttl: dt.timedelta = dt.timedelta(days=2),
) -> IssuedSvid:
    """A Web-PKI-style TLS server certificate (DNS/IP SANs, serverAuth) for the emulator's HTTPS."""
    import ipaddress

    key = new_key()
    now = dt.datetime.now(dt.UTC)
    issuer_cert, issuer_key = ca.signer
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(key_usage(), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .add_extension(_ski(key), critical=False)
        .sign(issuer_key, _hash_for(issuer_key))
    )
    chain = [cert] + ([issuer_cert] if issuer_cert is not ca.root else [])
    return IssuedSvid(leaf=cert, chain=chain, key=key)
