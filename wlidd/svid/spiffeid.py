"""SPIFFE IDs and trust domains (spiffe/spiffe SPIFFE-ID.md), strict like go-spiffe: every refusal names its rule.

`TrustDomain` and `SpiffeId` check themselves when made (as go-spiffe's spiffeid.TrustDomain and ID, which
only its parsers can make), so a value of either type is well-formed wherever it travels; `parse_spiffe_id`
is the entry point for text. Beside the ID, as go-spiffe keeps spiffeid/match.go: the matchers config rules
and listeners admit SPIFFE IDs with (an exact ID, a whole trust domain, or a path pattern with '*' and a
final '**').
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from wlidd.errors import InvalidValue, SvidError

MAX_SPIFFE_ID_BYTES = 2048
_TD_CHARS = re.compile(r"[a-z0-9._-]+")  # fullmatch: `$` would also pass a final newline
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")  # fullmatch, as _TD_CHARS
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9._-]+)+")  # fullmatch: well-formed unless a segment starts with '.'


def _bad(reason: str, message: str, value: str) -> SvidError:
    shown = value if len(value) <= 120 else value[:117] + "..."
    return SvidError(reason, f"{message}: {shown!r}")


class TrustDomain(str):
    """A trust domain name, refused when made unless it is one (SPIFFE-ID.md §2.1): non-empty, lowercase
    letters, digits, '.', '-', '_' (no port, no userinfo, no percent-encoding); SvidError with a
    `spiffe_id_*` reason otherwise. A str, so it is a dict key, JSON and text exactly as its name is."""

    __slots__ = ()

    def __new__(cls, name: str) -> TrustDomain:
        if isinstance(name, TrustDomain):  # checked when it was made
            return name
        if not name:
            raise _bad("spiffe_id_empty_trust_domain", "trust domain is empty", name)
        if not _TD_CHARS.fullmatch(name):
            if name.lower() != name and _TD_CHARS.fullmatch(name.lower()):
                raise _bad("spiffe_id_uppercase_trust_domain", "trust domain must be lowercase", name)
            if ":" in name:
                raise _bad("spiffe_id_port", "trust domain must not carry a port", name)
            if "@" in name:
                raise _bad("spiffe_id_userinfo", "trust domain must not carry userinfo", name)
            if "%" in name:
                raise _bad("spiffe_id_percent_encoded", "SPIFFE ID must not be percent-encoded", name)
            raise _bad("spiffe_id_bad_trust_domain_char", "trust domain has a character outside [a-z0-9._-]", name)
        return super().__new__(cls, name)


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """A well-formed SPIFFE ID: its trust domain and its path ("" or "/segment/..."), refused when made
    unless well-formed (SPIFFE-ID.md §2: at most 2048 bytes; segments of [A-Za-z0-9._-], none empty, "."
    or "..", no trailing '/', no percent-encoding); SvidError with a `spiffe_id_*` reason otherwise. Text
    goes through `parse_spiffe_id`."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            object.__setattr__(self, "trust_domain", TrustDomain(self.trust_domain))
        path = self.path
        # A trust domain is ASCII, so an ASCII ID has as many bytes as characters: encoded only when needed.
        may_be_long = len(path) + len(self.trust_domain) > MAX_SPIFFE_ID_BYTES - len("spiffe://") or not path.isascii()
        if may_be_long and len(str(self).encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise SvidError("spiffe_id_too_long", f"SPIFFE ID longer than {MAX_SPIFFE_ID_BYTES} bytes")
        if path and (not _PLAIN_PATH.fullmatch(path) or "/." in path):  # one regex passes the common path
            _check_path(path, str(self))

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def _check_path(path: str, value: str) -> None:
    """SvidError naming the first rule the path of the SPIFFE ID `value` breaks (none: it is well-formed)."""
    if "%" in path:
        raise _bad("spiffe_id_percent_encoded", "SPIFFE ID must not be percent-encoded", value)
    if path[0] != "/":
        raise _bad("spiffe_id_no_leading_slash", "SPIFFE ID path must start with '/'", value)
    if path[-1] == "/":
        raise _bad("spiffe_id_trailing_slash", "SPIFFE ID path must not end with '/'", value)
    for segment in path[1:].split("/"):
        if segment == "":
            raise _bad("spiffe_id_empty_segment", "SPIFFE ID path has an empty segment", value)
        if segment in (".", ".."):
            raise _bad("spiffe_id_dot_segment", "SPIFFE ID path has a '.' or '..' segment", value)
        if not _SEGMENT_CHARS.fullmatch(segment):
            raise _bad("spiffe_id_bad_path_char", "SPIFFE ID path has a character outside [A-Za-z0-9._-]", value)


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse a SPIFFE ID or raise SvidError with a `spiffe_id_*` reason."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        raise SvidError("spiffe_id_too_long", f"SPIFFE ID longer than {MAX_SPIFFE_ID_BYTES} bytes")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme != "spiffe":
        if scheme.lower() == "spiffe" and sep:
            raise _bad("spiffe_id_bad_scheme", "scheme must be exactly 'spiffe' (lowercase)", value)
        raise _bad("spiffe_id_bad_scheme", "not a spiffe:// URI", value)
    if "?" in rest:
        raise _bad("spiffe_id_query", "SPIFFE ID must not have a query", value)
    if "#" in rest:
        raise _bad("spiffe_id_fragment", "SPIFFE ID must not have a fragment", value)
    trust_domain, slash, path = rest.partition("/")
    return SpiffeId(TrustDomain(trust_domain), slash + path)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of a certificate (empty when it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def spiffe_id_from_cert(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID of an X.509-SVID leaf; used by validation and by authorization alike."""
    try:
        uris = uri_sans(cert)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise SvidError("leaf_bad_san", f"leaf subjectAltName cannot be parsed: {exc}") from None
    if not uris:
        raise SvidError("leaf_no_uri_san", "leaf has no URI SAN, so it carries no SPIFFE ID")
    if len(uris) > 1:
        raise SvidError("leaf_multiple_uri_sans", f"leaf has {len(uris)} URI SANs; an X509-SVID has exactly one")
    spiffe_id = parse_spiffe_id(uris[0])
    if not spiffe_id.path:
        raise SvidError("spiffe_id_no_path", f"leaf SPIFFE ID {uris[0]!r} has no path (that names a trust domain)")
    return spiffe_id


# ---- matchers: which SPIFFE IDs a rule admits (go-spiffe spiffeid/match.go, beside the ID) ----


@dataclass(frozen=True)
class Matcher:
    """A SPIFFE ID matcher: an exact ID, a trust domain (spiffe://td: any member), or a path pattern
    in which '*' is exactly one segment and a final '**' is one or more segments."""

    trust_domain: TrustDomain
    segments: tuple[str, ...] | None  # None: any member of the trust domain
    text: str

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        if self.segments is None:
            return True
        parts = spiffe_id.path[1:].split("/") if spiffe_id.path else []
        pattern = self.segments
        if pattern and pattern[-1] == "**":
            head = pattern[:-1]
            return len(parts) > len(head) and all(p == "*" or p == s for p, s in zip(head, parts, strict=False))
        return len(parts) == len(pattern) and all(p == "*" or p == s for p, s in zip(pattern, parts, strict=True))


def parse_matcher(pattern: str) -> Matcher:
    """Parse a matcher, or InvalidValue ("spiffe_id_matcher") saying what is wrong with it (a config
    model's validator turns it into the ValueError pydantic reports against the key holding the pattern)."""
    if not pattern.startswith("spiffe://"):
        raise _bad_matcher(f"{pattern!r} is not a SPIFFE ID matcher (must start with spiffe://)")
    name, slash, path = pattern.removeprefix("spiffe://").partition("/")
    try:
        trust_domain = TrustDomain(name)
    except SvidError as exc:
        raise _bad_matcher(f"{pattern!r}: {exc.message}") from None
    if not slash:
        return Matcher(trust_domain, None, pattern)
    segments = tuple(path.split("/"))
    for index, segment in enumerate(segments):
        if segment == "**" and index != len(segments) - 1:
            raise _bad_matcher(f"{pattern!r}: '**' may only be the last segment")
        if segment not in ("*", "**"):
            try:
                parse_spiffe_id(f"spiffe://{trust_domain}/{segment}")
            except SvidError as exc:
                raise _bad_matcher(f"{pattern!r}: {exc.message}") from None
    return Matcher(trust_domain, segments, pattern)


def _bad_matcher(message: str) -> InvalidValue:
    return InvalidValue("spiffe_id_matcher", message)


def match_any(spiffe_id: SpiffeId, matchers: tuple[Matcher, ...]) -> bool:
    """True when any of `matchers` admits `spiffe_id` (a listener's `allow`, a rule's `spiffe_ids`: OR'd)."""
    return any(m.matches(spiffe_id) for m in matchers)
