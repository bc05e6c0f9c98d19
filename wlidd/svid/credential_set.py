"""One credential set's bytes (`CredentialFiles`) and the Identity they make (`build_identity`): pure, `now`
passed in; the files are read by the credentials edge (wlidd.svid.load).

A federated trust domain's bundle that cannot be read or parsed does not refuse the set: it is
reported (`Identity.bundle_problems`) and the last good copy of that domain's bundle is kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography import x509

from wlidd.errors import SvidError
from wlidd.svid.model import BundleProblem, BundleSet, Identity, TrustBundle
from wlidd.svid.parse import parse_bundle, parse_chain, parse_private_key, parse_trust_bundles_json
from wlidd.svid.spiffeid import TrustDomain, spiffe_id_from_cert
from wlidd.svid.validate import validate_svid


@dataclass(frozen=True)
class CredentialFiles:
    """The raw bytes of one credential set, read together from one place."""

    origin: str
    chain: bytes
    key: bytes = field(repr=False)
    own_bundle: bytes | None = None
    trust_bundles_json: bytes | None = None
    extra_bundles: tuple[tuple[str, bytes], ...] = ()
    bundle_errors: tuple[tuple[str, SvidError], ...] = ()  # federated bundles that could not be read
    notes: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Content fingerprint: decides "changed", since the GCE agent swaps the link even when nothing changed."""
        digest = hashlib.sha256()
        for part in (self.chain, self.key, self.own_bundle or b"", self.trust_bundles_json or b""):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        for trust_domain, data in self.extra_bundles:
            digest.update(trust_domain.encode() + b"\0" + data)
        for trust_domain, error in self.bundle_errors:
            digest.update(f"{trust_domain}\0{error.reason}".encode())
        return digest.hexdigest()


MAX_BUNDLE_PROBLEMS = 64  # federated domains reported per set; the rest are counted in the last entry's message


def _cap_problems(problems: list[BundleProblem]) -> None:
    """At most MAX_BUNDLE_PROBLEMS entries, in place: the last one kept says how many more domains there are."""
    if len(problems) > MAX_BUNDLE_PROBLEMS:
        rest = len(problems) - MAX_BUNDLE_PROBLEMS + 1
        last = problems[MAX_BUNDLE_PROBLEMS - 1]
        problems[MAX_BUNDLE_PROBLEMS - 1] = BundleProblem(
            last.trust_domain, last.reason, f"{last.message} (and {rest - 1} more domains)", last.kept
        )
        del problems[MAX_BUNDLE_PROBLEMS:]


def build_identity(
    files: CredentialFiles,
    now: dt.datetime,
    *,
    trust_domain: str | None = None,
    previous: BundleSet | None = None,
) -> Identity:
    """Parse and validate one credential set (pure): an Identity, or SvidError with the reason.

    The own trust domain's bundle must be good (the chain is validated against it). A federated
    domain's bundle that is missing or damaged (a file under `bundles`, one entry of
    trust_bundles.json) is reported in `Identity.bundle_problems`, and the copy in `previous` (the
    bundles of the state served so far) is kept for that domain."""
    key = parse_private_key(files.key)
    chain = parse_chain(files.chain)
    own_td = TrustDomain(trust_domain) if trust_domain else spiffe_id_from_cert(chain[0]).trust_domain
    authorities: dict[TrustDomain, list[x509.Certificate]] = {}
    broken: dict[str, SvidError] = {}
    if files.trust_bundles_json is not None:
        parsed, errors = parse_trust_bundles_json(files.trust_bundles_json)
        for td, certs in parsed.items():
            authorities.setdefault(td, []).extend(certs)
        broken.update(errors)
    if files.own_bundle is not None:
        authorities.setdefault(own_td, []).extend(parse_bundle(files.own_bundle, own_td))
    for name, data in files.extra_bundles:
        try:
            certs = parse_bundle(data, name)
        except SvidError as exc:
            broken[name] = exc
            continue
        authorities.setdefault(TrustDomain(name), []).extend(certs)
    broken.update(files.bundle_errors)
    if own_td in broken:
        raise broken[own_td]
    problems: list[BundleProblem] = []
    for name, refusal in sorted(broken.items()):
        kept = previous.get(name) if previous is not None else None
        if kept is not None and name not in authorities:
            authorities[kept.trust_domain] = list(kept.authorities)
        problems.append(BundleProblem(name, refusal.reason, refusal.message, kept is not None))
    _cap_problems(problems)
    bundles = BundleSet({td: TrustBundle(td, tuple(dict.fromkeys(certs))) for td, certs in authorities.items()})
    try:
        svid = validate_svid(chain, key, bundles, now, trust_domain=trust_domain)
    except (ValueError, TypeError) as exc:  # a damaged field the parser only reads on use
        raise SvidError("chain_bad_certificate", f"chain cannot be validated: {exc}") from None
    return Identity(
        svid=svid,
        bundles=bundles,
        fingerprint=files.fingerprint(),
        origin=files.origin,
        notes=files.notes,
        bundle_problems=tuple(problems),
    )
