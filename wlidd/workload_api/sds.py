"""Envoy's Secret Discovery Service (SDS v3), the pure part: which secrets a request names and what each holds.
SDS resource names, the secrets built for them, their versions; no I/O, no clock, no event loop.

The names are the SPIRE agent's (spiffe/spire pkg/agent/endpoints/sdsv3/handler.go at ef8527e, `buildResponse`
lines 295-389), so Envoy configurations written for SPIRE work unchanged; the three special names are
configurable as in SPIRE's agent `sds` block (wlidd.workload_api.sds_settings.SdsSettings):

    requested name                  answered with                                           handler.go
    default (default_svid_name)     tls_certificate: the caller's first identity, chain     374-380, 591-621
                                    and PKCS#8 key as inline PEM
    a SPIFFE ID the caller holds    tls_certificate of that identity                        367-373
    ROOTCA (default_bundle_name)    validation_context: the first identity's trust domain   334-341
    spiffe://<trust domain>         validation_context: that domain's bundle, for every      325-332, 354-362
                                    bundle the caller's identities carry (federation)
    ALL (default_all_bundles_name)  validation_context: the SPIFFE validator with every      343-350, 516-556
                                    trust domain, one entry each (federation)
    no name at all                  every bundle by its trust domain ID and every identity  315
                                    by its SPIFFE ID
    anything else                   left out of the answer (see below)

A validation_context is the SPIFFE certificate validator, `custom_validator_config` named
`envoy.tls.cert_validator.spiffe` with a `SPIFFECertValidatorConfig` of one trust domain (`name` without
the scheme, `trust_bundle` inline PEM), lines 476-514, unless SPIFFE validation is off for the request:
then `trusted_ca` inline PEM (432-450). It is off when `disable_spiffe_cert_validation` is set, which the
node's metadata key of that name overrides (a bool, or a string Go's strconv.ParseBool reads; anything
else is ignored, 567-589), or when the node's `user_agent_build_version` is below 1.18 (558-565). `ALL` has
no `trusted_ca` form: SPIRE answers INTERNAL (452-454); here it is left out like an unknown name.

Where wlidd differs from SPIRE, on purpose:
  - A name the caller has nothing for is left out of the answer and logged, and the stream goes on. SPIRE
    ends the call with INVALID_ARGUMENT (384-386), and Envoy then retries the stream in a loop. Envoy's
    SDS subscription takes exactly one resource per update and NACKs an empty one ("Missing SDS
    resources", envoy source/common/secret/sds_api.cc validateUpdateSize), so when nothing requested
    exists no response is sent at all: Envoy waits, as the xDS protocol has it for a state-of-the-world
    resource that does not exist (its initial_fetch_timeout). DeltaSecrets says so in removed_resources.
  - Every requested name is resolved on its own: SPIRE's `switch` (324-351, 366-381) serves at most one
    of own-domain/ROOTCA/ALL per answer and the first identity under its ID or `default`, not both.
  - A version names the content (`Selection.version`: a digest of names, forms and certificate
    fingerprints, never of a key), not a per-stream counter bumped on every cache update (134-135,
    200-202): an update that changes nothing a stream asked for sends it nothing, so a version the client
    NACKed is not resent until its content changes.
  - wlidd's identities come from the [policy] credentials rules (the caller's identities, in config order;
    only those with a valid SVID now), SPIRE's from workload attestation; the first plays SPIRE's
    `upd.Identities[0]`, its trust domain SPIRE's `upd.Bundle`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from envoy.config.core.v3 import base_pb2, extension_pb2  # type: ignore[import-untyped]
from envoy.extensions.transport_sockets.tls.v3 import (  # type: ignore[import-untyped]
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from google.protobuf import any_pb2  # type: ignore[import-untyped]

from wlidd.errors import SdsRequestError
from wlidd.svid.model import Svid, TrustBundle
from wlidd.watch import IdentityState
from wlidd.workload_api.sds_settings import MAX_NAME_LENGTH, SdsSettings

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"  # handler.go:508
DISABLE_KEY = "disable_spiffe_cert_validation"  # the node metadata key, handler.go:34
MAX_NAMES = 1024  # resource names one request may carry (Envoy asks for one per stream)
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go strconv.ParseBool
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True)
class NodeFacts:
    """What wlidd uses of a request's `node` (kept across requests: Envoy may send it only once, handler.go
    178-181). The node itself is not kept: Envoy's lists every extension it was built with (tens of KB)."""

    id: str = ""
    cluster: str = ""
    spiffe_validator: bool = True  # no user_agent_build_version, or one at 1.18 or later (handler.go 558-565)
    disable_override: bool | None = None  # the node metadata's disable_spiffe_cert_validation, if readable


def go_parse_bool(text: str) -> bool | None:
    """Go's strconv.ParseBool (which SPIRE uses, handler.go:585): None for anything it refuses."""
    return True if text in _GO_TRUE else False if text in _GO_FALSE else None


def node_facts(node: Any, previous: NodeFacts) -> NodeFacts:
    """The facts of an envoy.config.core.v3.Node; `previous` when the request carries none."""
    if node is None or not node.ByteSize():
        return previous
    supported = True
    if node.WhichOneof("user_agent_version_type") == "user_agent_build_version":
        version = node.user_agent_build_version.version
        supported = (version.major_number == 1 and version.minor_number > 17) or version.major_number > 1
    override: bool | None = None
    value = node.metadata.fields.get(DISABLE_KEY)
    if value is not None:
        kind = value.WhichOneof("kind")
        if kind == "bool_value":
            override = bool(value.bool_value)
        elif kind == "string_value":
            override = go_parse_bool(value.string_value)
    return NodeFacts(str(node.id)[:256], str(node.cluster)[:256], supported, override)


def spiffe_validation(settings: SdsSettings, node: NodeFacts) -> bool:
    """Whether validation contexts use the SPIFFE validator (else trusted_ca): handler.go 402-410, 567-578."""
    disabled = settings.disable_spiffe_cert_validation if node.disable_override is None else node.disable_override
    return not disabled and node.spiffe_validator


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """Request resource names, checked (SdsRequestError when too many or one too long)."""
    if len(names) > MAX_NAMES:
        raise SdsRequestError(f"{len(names)} resource names in one request (at most {MAX_NAMES})")
    for name in names:
        if len(name) > MAX_NAME_LENGTH:
            raise SdsRequestError(f"a resource name of {len(name)} characters (at most {MAX_NAME_LENGTH})")
    return tuple(names)


def check_type_url(type_url: str) -> None:
    """SdsRequestError unless `type_url` is empty or the Secret's (the SDS service serves only Secrets)."""
    if type_url and type_url != SECRET_TYPE_URL:
        raise SdsRequestError(f"type_url {type_url[:200]!r} is not served here (only {SECRET_TYPE_URL})")


# ---- the caller's credentials ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """One identity the caller may have: its name in the config, its SVID, and the SVID chain's fingerprint
    (the content of its tls_certificate; no key goes into it: the key is bound to the leaf)."""

    name: str
    svid: Svid
    fingerprint: str


@dataclass(frozen=True)
class Credentials:
    """What one caller may have now, the input of `select`: its identities with a valid SVID, in config
    order (the first is `default`), and every trust domain's bundle they carry (for a domain carried by
    several identities, the first identity's copy), with its fingerprint."""

    identities: tuple[Held, ...]
    bundles: Mapping[str, tuple[TrustBundle, str]]  # trust domain -> (bundle, fingerprint)

    @property
    def own_trust_domain(self) -> str:
        return str(self.identities[0].svid.spiffe_id.trust_domain)


def chain_fingerprint(svid: Svid) -> str:
    return hashlib.sha256(b"".join(c.fingerprint(hashes.SHA256()) for c in svid.chain)).hexdigest()


def credentials_of(states: Sequence[IdentityState]) -> Credentials | None:
    """The Credentials of these identity states (already the caller's and valid), None for none."""
    if not states:
        return None
    held = tuple(Held(s.name, s.identity.svid, chain_fingerprint(s.identity.svid)) for s in states)
    bundles: dict[str, tuple[TrustBundle, str]] = {}
    own = states[0].identity.own_bundle
    bundles[str(own.trust_domain)] = (own, own.fingerprint())
    for state in states:
        for bundle in state.identity.bundles:
            bundles.setdefault(str(bundle.trust_domain), (bundle, bundle.fingerprint()))
    return Credentials(held, bundles)


# ---- choosing the resources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One secret to send: its `name` and `content`, the tuple that identifies its bytes (kind, form,
    fingerprints; no key material), and what it is built from (left out of comparisons and the repr)."""

    name: str
    content: tuple[Any, ...]
    identity: str = ""  # the identity whose private key it holds ("" for a validation context)
    svid: Svid | None = field(default=None, compare=False, repr=False)
    bundles: tuple[TrustBundle, ...] = field(default=(), compare=False, repr=False)

    @property
    def version(self) -> str:
        return digest(self.content)

    @property
    def fingerprint(self) -> str:
        """The SVID chain's fingerprint for a tls_certificate (the certificate handed out), else ""."""
        return str(self.content[2]) if self.identity else ""


def digest(value: object) -> str:
    """A short stable digest of a value made of strings, bools and tuples (a version string)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Selection:
    """The resources for one request, and the requested names left out (`missing`, with why)."""

    resources: tuple[Resource, ...]
    missing: tuple[tuple[str, str], ...] = ()  # (name, reason)

    @property
    def version(self) -> str:
        """The version of a state-of-the-world answer: changes exactly when a resource's content does."""
        return digest(tuple(r.content for r in self.resources))

    @property
    def identities(self) -> tuple[str, ...]:
        """The identities whose private keys the answer holds."""
        return tuple(dict.fromkeys(r.identity for r in self.resources if r.identity))

    @property
    def handed_out(self) -> tuple[Resource, ...]:
        """One tls_certificate per identity whose private key the answer holds (the first), for the audit."""
        first: dict[str, Resource] = {}
        for resource in self.resources:
            if resource.identity:
                first.setdefault(resource.identity, resource)
        return tuple(first.values())


def _tls(name: str, held: Held) -> Resource:
    return Resource(name, ("tls_certificate", name, held.fingerprint), held.name, svid=held.svid)


def _one(name: str, trust_domain: str, creds: Credentials, spiffe: bool) -> Resource:
    bundle, fingerprint = creds.bundles[trust_domain]
    return Resource(name, ("validation_context", name, spiffe, trust_domain, fingerprint), bundles=(bundle,))


def _all(name: str, creds: Credentials) -> Resource:
    domains = tuple(sorted(creds.bundles))  # sorted by name, handler.go:533-536
    content = ("validation_context", name, True, tuple((td, creds.bundles[td][1]) for td in domains))
    return Resource(name, content, bundles=tuple(creds.bundles[td][0] for td in domains))


def select(settings: SdsSettings, names: Sequence[str], spiffe: bool, creds: Credentials) -> Selection:
    """The resources answering `names` for a caller holding `creds` (the table in the module docstring);
    `spiffe`: validation contexts as the SPIFFE validator (`spiffe_validation`). Empty names are ignored;
    none at all asks for everything (handler.go 309-315)."""
    own = creds.own_trust_domain
    by_id: dict[str, Held] = {}
    for held in creds.identities:
        by_id.setdefault(str(held.svid.spiffe_id), held)
    wanted = list(dict.fromkeys(n for n in names if n))
    if not wanted:
        domains = [own, *sorted(td for td in creds.bundles if td != own)]
        everything = [_one(f"spiffe://{td}", td, creds, spiffe) for td in domains]
        everything += [_tls(spiffe_id, held) for spiffe_id, held in by_id.items()]
        return Selection(tuple(everything))
    resources: list[Resource] = []
    missing: list[tuple[str, str]] = []
    for name in wanted:  # SPIRE's precedence where names collide: own domain, ROOTCA, ALL, a domain, an ID, default
        domain = name.removeprefix("spiffe://") if name.startswith("spiffe://") and "/" not in name[9:] else None
        if name == f"spiffe://{own}" or name == settings.default_bundle_name:
            resources.append(_one(name, own, creds, spiffe))
        elif name == settings.default_all_bundles_name:
            if spiffe:
                resources.append(_all(name, creds))
            else:
                missing.append((name, "all bundles need the SPIFFE validator (Envoy >= 1.18, validation not disabled)"))
        elif domain is not None and domain in creds.bundles:
            resources.append(_one(name, domain, creds, spiffe))
        elif name in by_id:
            resources.append(_tls(name, by_id[name]))
        elif name == settings.default_svid_name:
            resources.append(_tls(name, creds.identities[0]))
        else:
            missing.append((name, "no such secret for this caller"))
    return Selection(tuple(resources), tuple(missing))


# ---- building the Secret messages -----------------------------------------------------------------------


def _inline(data: bytes) -> Any:
    return base_pb2.DataSource(inline_bytes=data)


def build_secret(resource: Resource) -> Any:
    """The envoy.extensions.transport_sockets.tls.v3.Secret of a resource (handler.go 432-450, 476-556,
    591-621). It holds a private key when `resource.identity` is set: never log or print it."""
    kind = resource.content[0]
    if kind == "tls_certificate":
        assert resource.svid is not None
        certificate = common_pb2.TlsCertificate(
            certificate_chain=_inline(resource.svid.chain_pem), private_key=_inline(resource.svid.key_pem())
        )
        return secret_pb2.Secret(name=resource.name, tls_certificate=certificate)
    if not resource.content[2]:  # trusted_ca: one bundle
        context = common_pb2.CertificateValidationContext(trusted_ca=_inline(resource.bundles[0].pem))
        return secret_pb2.Secret(name=resource.name, validation_context=context)
    spiffe = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
        trust_domains=[
            tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                name=str(bundle.trust_domain), trust_bundle=_inline(bundle.pem)
            )
            for bundle in resource.bundles
        ]
    )
    typed = any_pb2.Any()
    typed.Pack(spiffe)
    validator = extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR, typed_config=typed)
    context = common_pb2.CertificateValidationContext(custom_validator_config=validator)
    return secret_pb2.Secret(name=resource.name, validation_context=context)


class SecretCache:
    """Secrets packed in `Any`, built once per content and shared by every stream that sends it (a rotation
    pushed to a thousand streams builds each secret once). Bounded: the oldest entries go first."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._packed: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def __repr__(self) -> str:
        return f"SecretCache({len(self._packed)} secrets)"

    def packed(self, resource: Resource) -> Any:
        found = self._packed.get(resource.content)
        if found is None:
            found = any_pb2.Any()
            found.Pack(build_secret(resource))
            self._packed[resource.content] = found
            while len(self._packed) > self.max_entries:
                self._packed.popitem(last=False)
        return found

    def clear(self) -> None:
        self._packed.clear()
