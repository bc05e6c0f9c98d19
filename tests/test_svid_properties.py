"""Properties of the pure SVID core: any bytes give an Identity or a typed SvidError, nothing else."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_SCALE
from wlidd.emulator.ca import CertificateAuthority
from wlidd.errors import SvidError
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.svid.spiffeid import parse_spiffe_id

CA = CertificateAuthority("example.org")
GOOD = CA.issue_svid()
NOW = dt.datetime.now(dt.UTC)


def pem_like() -> st.SearchStrategy[bytes]:
    """Random bytes, mutated real PEM, and PEM framing around random base64."""
    real = st.sampled_from([GOOD.chain_pem, GOOD.key_pem, CA.bundle_pem])
    mutated = st.tuples(real, st.integers(0, 4000), st.binary(max_size=8)).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) + len(t[2]) :]
    )
    framed = st.tuples(
        st.sampled_from([b"CERTIFICATE", b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY", b"X"]),
        st.binary(max_size=300).map(lambda b: __import__("base64").b64encode(b)),
    ).map(lambda t: b"-----BEGIN " + t[0] + b"-----\n" + t[1] + b"\n-----END " + t[0] + b"-----\n")
    der_mutated = st.tuples(
        real, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)
    ).map(lambda t: _mutate_der(t[0], t[1]))
    return st.one_of(st.binary(max_size=2000), mutated, framed, real, der_mutated)


def _mutate_der(pem: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Flip bytes inside the DER of every PEM block, keeping the PEM framing valid (reaches the ASN.1 parser)."""
    import base64
    import re

    def one(match: re.Match[bytes]) -> bytes:
        der = bytearray(base64.b64decode(b"".join(match.group(2).split())))
        for position, value in edits:
            der[position % len(der)] = value
        return (
            b"-----BEGIN "
            + match.group(1)
            + b"-----\n"
            + base64.encodebytes(bytes(der))
            + b"-----END "
            + match.group(1)
            + b"-----"
        )

    return re.sub(rb"-----BEGIN ([A-Z ]+)-----\n(.*?)-----END [A-Z ]+-----", one, pem, flags=re.S)


def outcome(chain: bytes, key: bytes, bundle: bytes) -> str:
    try:
        build_identity(CredentialFiles("fuzz", chain, key, own_bundle=bundle), NOW)
    except SvidError as exc:
        assert exc.reason and exc.message
        assert "PRIVATE KEY-----" not in exc.message
        return exc.reason
    return "ok"


@settings(max_examples=300 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=pem_like(), key=pem_like(), bundle=pem_like())
def test_any_bytes_in_any_of_the_three_files_give_an_svid_or_a_typed_rejection(
    chain: bytes, key: bytes, bundle: bytes
) -> None:
    outcome(chain, key, bundle)


@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(which=st.sampled_from(["chain", "key", "bundle"]), data=pem_like())
def test_one_damaged_file_beside_two_good_ones_never_crashes(which: str, data: bytes) -> None:
    files = {"chain": GOOD.chain_pem, "key": GOOD.key_pem, "bundle": CA.bundle_pem}
    files[which] = data
    outcome(files["chain"], files["key"], files["bundle"])


def test_the_good_set_passes() -> None:
    assert outcome(GOOD.chain_pem, GOOD.key_pem, CA.bundle_pem) == "ok"


def test_huge_input_is_refused_by_size_not_parsed() -> None:
    assert outcome(b"A" * (2 << 20), GOOD.key_pem, CA.bundle_pem) == "chain_too_large"


@settings(max_examples=500 * FUZZ_SCALE, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_as_spiffe_id_or_is_refused_with_a_reason(text: str) -> None:
    try:
        spiffe_id = parse_spiffe_id(text)
    except SvidError as exc:
        assert exc.reason.startswith("spiffe_id_")
        return
    assert str(spiffe_id) == text


@pytest.mark.parametrize(
    "good",
    [
        "spiffe://example.org/ns/a",
        "spiffe://example.org",
        "spiffe://a.b-c_d.1/x/.y/..z/...",
        "spiffe://td.global.123.workload.id.goog/ns/default/sa/app",
    ],
)
def test_valid_spiffe_ids_round_trip(good: str) -> None:
    assert str(parse_spiffe_id(good)) == good


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("spiffe:///path", "spiffe_id_empty_trust_domain"),
        ("spiffe://exa mple.org/x", "spiffe_id_bad_trust_domain_char"),
        ("spiffe://example.org/./x", "spiffe_id_dot_segment"),
        ("spiffe://example.org/x/", "spiffe_id_trailing_slash"),
        ("example.org/x", "spiffe_id_bad_scheme"),
        ("spiffe://[::1]/x", "spiffe_id_port"),
    ],
)
def test_invalid_spiffe_ids_name_the_rule(bad: str, reason: str) -> None:
    with pytest.raises(SvidError) as info:
        parse_spiffe_id(bad)
    assert info.value.reason == reason


def test_reprs_never_show_key_material() -> None:
    files = CredentialFiles("x", GOOD.chain_pem, GOOD.key_pem, own_bundle=CA.bundle_pem)
    identity = build_identity(files, NOW)
    secret_line = GOOD.key_pem.splitlines()[1].decode()
    for text in (repr(files), repr(identity), repr(identity.svid), str(identity)):
        assert "PRIVATE KEY" not in text and secret_line not in text


def test_atheris_finds_no_crash_in_what_wlidd_parses(tmp_path: Path) -> None:
    """A bounded coverage-guided run (libFuzzer via atheris, where it installs); `make fuzz` runs it long."""
    pytest.importorskip("atheris")
    script = Path(__file__).resolve().parent.parent / "fuzz" / "atheris_credentials.py"
    result = subprocess.run(
        [sys.executable, str(script), "-runs=8000", "-max_len=4096", "-seed=7"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 8000 runs" in result.stderr
