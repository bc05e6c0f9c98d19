"""TrustDomain and SpiffeId refuse bad values when made, with the same `spiffe_id_*` reasons and messages
as parse_spiffe_id; the bundles and matchers carry TrustDomain values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_SCALE
from wlidd.emulator.ca import CertificateAuthority
from wlidd.errors import SvidError
from wlidd.svid.model import BundleSet, TrustBundle
from wlidd.svid.spiffeid import SpiffeId, TrustDomain, parse_matcher, parse_spiffe_id

CA = CertificateAuthority("example.org")


@pytest.mark.parametrize(
    ("trust_domain", "path", "reason"),
    [
        ("", "/x", "spiffe_id_empty_trust_domain"),
        ("Example.org", "/x", "spiffe_id_uppercase_trust_domain"),
        ("example.org:443", "/x", "spiffe_id_port"),
        ("user@example.org", "/x", "spiffe_id_userinfo"),
        ("exa mple.org", "/x", "spiffe_id_bad_trust_domain_char"),
        ("example.org", "/a%20b", "spiffe_id_percent_encoded"),
        ("example.org", "x", "spiffe_id_no_leading_slash"),
        ("example.org", "/x/", "spiffe_id_trailing_slash"),
        ("example.org", "/a//b", "spiffe_id_empty_segment"),
        ("example.org", "/ns/../x", "spiffe_id_dot_segment"),
        ("example.org", "/a b", "spiffe_id_bad_path_char"),
        ("example.org", "/" + "a" * 2040, "spiffe_id_too_long"),
        ("example.org", "/" + "é" * 1100, "spiffe_id_too_long"),
    ],
)
def test_a_spiffe_id_made_directly_is_refused_with_the_rule_it_breaks(
    trust_domain: str, path: str, reason: str
) -> None:
    with pytest.raises(SvidError) as refused:
        SpiffeId(trust_domain, path)  # a str: the constructor checks it
    assert refused.value.reason == reason


def test_a_refusal_when_made_says_what_parse_spiffe_id_says_of_the_same_text() -> None:
    for trust_domain, path in [("example.org", "/ns/./x"), ("Example.org", "/x"), ("example.org", "/a b")]:
        with pytest.raises(SvidError) as made:
            SpiffeId(trust_domain, path)
        with pytest.raises(SvidError) as parsed:
            parse_spiffe_id(f"spiffe://{trust_domain}{path}")
        assert (made.value.reason, made.value.message) == (parsed.value.reason, parsed.value.message)


@settings(max_examples=300 * FUZZ_SCALE, deadline=None)
@given(st.text(max_size=40), st.text(max_size=80))
def test_a_spiffe_id_made_from_any_two_strings_is_refused_or_is_what_its_text_parses_to(
    trust_domain: str, path: str
) -> None:
    try:
        made = SpiffeId(trust_domain, path)
    except SvidError as exc:
        assert exc.reason.startswith("spiffe_id_")
        return
    assert parse_spiffe_id(str(made)) == made


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "spiffe_id_empty_trust_domain"),
        ("EXAMPLE.org", "spiffe_id_uppercase_trust_domain"),
        ("example.org:8443", "spiffe_id_port"),
        ("a%2eb", "spiffe_id_percent_encoded"),
        ("example.org/x", "spiffe_id_bad_trust_domain_char"),
    ],
)
def test_a_trust_domain_is_refused_when_made_unless_well_formed(name: str, reason: str) -> None:
    with pytest.raises(SvidError) as refused:
        TrustDomain(name)
    assert refused.value.reason == reason
    with pytest.raises(SvidError) as in_a_bundle:
        TrustBundle(name, (CA.root,))
    assert in_a_bundle.value.reason == reason


def test_a_trust_domain_is_its_name_as_a_str_so_lookups_by_name_find_it() -> None:
    domain = TrustDomain("example.org")
    assert domain == "example.org" and hash(domain) == hash("example.org") and repr(domain) == "'example.org'"
    bundles = BundleSet({"example.org": TrustBundle("example.org", (CA.root,))})
    assert bundles.get("example.org") is not None and bundles.get("Not a domain") is None
    assert all(type(td) is TrustDomain for td in bundles.bundles)
    assert type(bundles.get("example.org").trust_domain) is TrustDomain


def test_ids_and_matchers_carry_trust_domains() -> None:
    assert type(parse_spiffe_id("spiffe://example.org/ns/a").trust_domain) is TrustDomain
    assert type(parse_matcher("spiffe://example.org/ns/*").trust_domain) is TrustDomain
    assert type(SpiffeId("example.org", "/x").trust_domain) is TrustDomain


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("spiffe://example.org/a\n", "spiffe_id_bad_path_char"),
        ("spiffe://example.org\n", "spiffe_id_bad_trust_domain_char"),
        ("spiffe://example.org/a\n/b", "spiffe_id_bad_path_char"),
    ],
)
def test_a_final_newline_is_refused_like_any_character_outside_the_alphabet(text: str, reason: str) -> None:
    """A regex's `$` also matches before a final newline: an ID ending in one parsed, and compared
    unequal to the same ID without it."""
    with pytest.raises(SvidError) as refused:
        parse_spiffe_id(text)
    assert refused.value.reason == reason
    with pytest.raises(SvidError):
        TrustDomain("example.org\n")
