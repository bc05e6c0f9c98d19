"""Parsing of certificate chains, private keys and trust bundles from bytes.

Every function takes bytes and returns parsed objects or raises SvidError with a stable reason;
nothing else escapes (a property test pins that). Accepted forms:
  chain   PEM CERTIFICATE blocks (leaf first), or one DER certificate
  key     PEM PRIVATE KEY (PKCS#8), EC PRIVATE KEY (SEC1), RSA PRIVATE KEY (PKCS#1); never encrypted
  bundle  PEM CERTIFICATE blocks, a DER certificate, or a SPIFFE bundle (JWK Set with x5c)
Text outside PEM blocks is ignored, as OpenSSL does; a damaged block is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning

from wlidd.errors import SvidError
from wlidd.svid.model import PrivateKey
from wlidd.svid.spiffeid import TrustDomain

MAX_FILE_BYTES = 1 << 20
MIN_RSA_BITS = 2048
SUPPORTED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL)
_PEM_BEGIN = re.compile(rb"-----BEGIN ")
_KEY_LABELS = {b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY"}


def pem_blocks(data: bytes, what: str) -> list[tuple[str, bytes]]:
    """(label, DER) for every PEM block; refuses unterminated, mislabelled or non-base64 blocks."""
    blocks: list[tuple[str, bytes]] = []
    for index, match in enumerate(_PEM_BLOCK.finditer(data), start=1):
        begin, body, end = match.group(1), match.group(2), match.group(3)
        if begin != end:
            raise SvidError(f"{what}_bad_pem", f"{what} PEM block {index}: BEGIN {begin!r} closed by END {end!r}")
        lines = body.split(b"\n")
        if any(b":" in line for line in lines):
            if begin in _KEY_LABELS and b"ENCRYPTED" in body:
                raise SvidError("key_encrypted", "private key is encrypted; wlidd needs an unencrypted key")
            raise SvidError(f"{what}_bad_pem", f"{what} PEM block {index} has headers wlidd does not accept")
        try:
            der = base64.b64decode(b"".join(line.strip() for line in lines), validate=True)
        except (binascii.Error, ValueError):
            raise SvidError(f"{what}_bad_pem", f"{what} PEM block {index} is not valid base64") from None
        blocks.append((begin.decode("ascii"), der))
    begins = len(_PEM_BEGIN.findall(data))
    if begins != len(blocks):
        raise SvidError(f"{what}_bad_pem", f"{what} has {begins - len(blocks)} unterminated or damaged PEM block(s)")
    return blocks


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_FILE_BYTES:
        raise SvidError(f"{what}_too_large", f"{what} is {len(data)} bytes, more than {MAX_FILE_BYTES}")
    if not data.strip():
        raise SvidError(f"{what}_empty", f"{what} file is empty")


def _load_der_cert(der: bytes, what: str, index: int) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            # cryptography warns (and will refuse) on e.g. a non-positive serial: refuse it now.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
            # The parser is lazy: touch every field validation reads, so damage surfaces here.
            cert.serial_number  # noqa: B018
            cert.subject  # noqa: B018
            cert.issuer  # noqa: B018
            cert.not_valid_before_utc  # noqa: B018
            cert.not_valid_after_utc  # noqa: B018
            cert.signature_algorithm_oid  # noqa: B018
            cert.extensions  # noqa: B018
            cert.public_key()
    except CryptographyDeprecationWarning as exc:
        raise SvidError(f"{what}_bad_certificate", f"{what} certificate {index} is malformed: {exc}") from None
    except Exception as exc:  # untrusted bytes: any parser complaint (InvalidVersion, ValueError …) is a refusal
        raise SvidError(f"{what}_bad_certificate", f"{what} certificate {index} cannot be parsed: {exc}") from None
    return cert


def parse_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Certificates from PEM (CERTIFICATE blocks only) or a single DER certificate."""
    _check_size(data, what)
    if not _PEM_BEGIN.search(data):
        if data[:1] == b"\x30":
            return [_load_der_cert(data, what, 1)]
        raise SvidError(f"{what}_not_pem", f"{what} holds neither PEM certificates nor a DER certificate")
    certs = []
    for index, (label, der) in enumerate(pem_blocks(data, what), start=1):
        if label in {"PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"}:
            raise SvidError(f"{what}_contains_private_key", f"{what} PEM block {index} is a private key")
        if label != "CERTIFICATE":
            raise SvidError(f"{what}_unexpected_block", f"{what} PEM block {index} is {label!r}, not CERTIFICATE")
        certs.append(_load_der_cert(der, what, index))
    if not certs:
        raise SvidError(f"{what}_empty", f"{what} has no certificate")
    return certs


def parse_chain(data: bytes) -> list[x509.Certificate]:
    """The SVID chain: leaf first, then intermediates towards the root."""
    return parse_certificates(data, "chain")


def check_key_type(key: object, what: str = "key") -> None:
    """EC P-256/P-384 or RSA of at least 2048 bits; anything else is refused with its own reason."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SvidError(f"{what}_rsa_too_small", f"{what} is RSA {key.key_size}; at least {MIN_RSA_BITS} bits")
        return
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in SUPPORTED_CURVES:
            raise SvidError(f"{what}_curve_unsupported", f"{what} uses curve {key.curve.name}; P-256 or P-384 only")
        return
    raise SvidError(f"{what}_type_unsupported", f"{what} is {type(key).__name__}; EC P-256/P-384 or RSA only")


def parse_private_key(data: bytes) -> PrivateKey:
    """One unencrypted PEM private key: PKCS#8, SEC1 or PKCS#1. Never prompts for a pass phrase."""
    _check_size(data, "key")
    if not _PEM_BEGIN.search(data):
        raise SvidError("key_not_pem", "key file holds no PEM block")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise SvidError("key_encrypted", "private key is encrypted; wlidd needs an unencrypted key")
    blocks = [(label, der) for label, der in pem_blocks(data, "key") if label != "EC PARAMETERS"]
    keys = [(label, der) for label, der in blocks if label.encode() in _KEY_LABELS]
    if not keys:
        labels = ", ".join(label for label, _ in blocks) or "none"
        raise SvidError("key_not_found", f"key file has no private key block (found: {labels})")
    if len(keys) > 1:
        raise SvidError("key_multiple", f"key file has {len(keys)} private keys; exactly one expected")
    label, der = keys[0]
    try:
        # DER of PKCS#8, SEC1 and PKCS#1 alike; password=None means a pass phrase is never asked for.
        key: object = serialization.load_der_private_key(der, password=None)
    except TypeError:
        raise SvidError("key_encrypted", "private key is encrypted; wlidd needs an unencrypted key") from None
    except UnsupportedAlgorithm as exc:
        raise SvidError("key_type_unsupported", f"private key algorithm not supported: {exc}") from None
    except Exception:  # untrusted bytes: any other parser complaint is a refusal
        raise SvidError("key_bad", f"{label} block does not hold a valid private key") from None
    check_key_type(key)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def _check_authorities(certs: list[x509.Certificate], what: str) -> list[x509.Certificate]:
    for index, cert in enumerate(certs, start=1):
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise SvidError(
                f"{what}_not_ca",
                f"{what} certificate {index} ({cert.subject.rfc4514_string()!r}) is not a CA",
            )
    return certs


def _spiffe_bundle_certs(document: Any, trust_domain: str, what: str) -> list[x509.Certificate]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise SvidError(f"{what}_bad_json", f"{what} for {trust_domain!r} is not a SPIFFE bundle (no 'keys' list)")
    certs: list[x509.Certificate] = []
    for index, jwk in enumerate(document["keys"], start=1):
        if not isinstance(jwk, dict):
            raise SvidError(f"{what}_bad_json", f"{what} key {index} for {trust_domain!r} is not an object")
        if jwk.get("use") != "x509-svid":
            continue  # jwt-svid keys and unknown uses are not X.509 authorities
        x5c = jwk.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise SvidError(
                f"{what}_bad_json", f"{what} key {index} for {trust_domain!r}: x5c must hold one certificate"
            )
        try:
            der = base64.b64decode(x5c[0], validate=True)
        except (binascii.Error, ValueError):
            raise SvidError(f"{what}_bad_json", f"{what} key {index} for {trust_domain!r}: x5c is not base64") from None
        certs.append(_load_der_cert(der, what, index))
    if not certs:
        raise SvidError(f"{what}_empty", f"{what} for {trust_domain!r} has no x509-svid authority")
    return certs


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SvidError(f"{what}_bad_json", f"{what} is not valid JSON: {exc}") from None


def parse_bundle(data: bytes, trust_domain: str | None = None) -> list[x509.Certificate]:
    """Authorities of one trust domain: PEM/DER certificates, or a SPIFFE bundle JSON document."""
    _check_size(data, "bundle")
    if data.lstrip()[:1] == b"{":
        return _check_authorities(
            _spiffe_bundle_certs(_load_json(data, "bundle"), trust_domain or "?", "bundle"), "bundle"
        )
    return _check_authorities(parse_certificates(data, "bundle"), "bundle")


def parse_trust_bundles_json(data: bytes) -> tuple[dict[TrustDomain, list[x509.Certificate]], dict[str, SvidError]]:
    """GCE ``trust_bundles.json``: SPIFFE bundles keyed by trust domain (bare, or under 'trust_domains').

    Returns (authorities by trust domain, refusal by trust domain): one damaged entry refuses only
    its own domain (an entry whose name is not a trust domain is keyed by that name, at most 255
    characters). Raises SvidError for a document that is not such a map at all."""
    _check_size(data, "trust_bundles")
    document = _load_json(data, "trust_bundles")
    if isinstance(document, dict) and isinstance(document.get("trust_domains"), dict):
        document = document["trust_domains"]
    if not isinstance(document, dict) or not document:
        raise SvidError("trust_bundles_bad_json", "trust_bundles.json is not a map of trust domain to bundle")
    result: dict[TrustDomain, list[x509.Certificate]] = {}
    errors: dict[str, SvidError] = {}
    for name, bundle in document.items():
        try:
            trust_domain = TrustDomain(name.removeprefix("spiffe://"))
        except SvidError as exc:
            errors[name[:255]] = SvidError("trust_bundles_bad_trust_domain", f"trust_bundles.json: {exc.message}")
            continue
        try:
            result[trust_domain] = _check_authorities(
                _spiffe_bundle_certs(bundle, trust_domain, "trust_bundles"), "trust_bundles"
            )
        except SvidError as exc:
            errors[trust_domain] = exc
    return result, errors
