"""Coverage-guided fuzzing (atheris, libFuzzer) of what wlidd parses from disk and from callers:
credential files (chain, key, bundle), SPIFFE IDs, and the config file.

Every input must give a result or wlidd's own typed error; anything else is a crash that libFuzzer
saves as crash-<hash> and reports. Seeds: a real SVID set, so mutations reach the ASN.1 and PEM
parsers instead of stopping at the first byte.

    python fuzz/atheris_credentials.py -runs=200000          (make fuzz)
    python fuzz/atheris_credentials.py -max_total_time=60
"""

from __future__ import annotations

import datetime as dt
import sys

import atheris

with atheris.instrument_imports():
    from wlidd.config import Config
    from wlidd.errors import ConfigError, SvidError
    from wlidd.svid.credential_set import CredentialFiles, build_identity
    from wlidd.svid.spiffeid import parse_spiffe_id

import contextlib
import tomllib

from pydantic import ValidationError

from wlidd.emulator.ca import CertificateAuthority

CA = CertificateAuthority("example.org")
GOOD = CA.issue_svid()
NOW = dt.datetime.now(dt.UTC)
SEEDS = (GOOD.chain_pem, GOOD.key_pem, CA.bundle_pem)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 3)
    if target == 0:  # one file damaged, the other two real: reaches the deep checks
        which = fdp.ConsumeIntInRange(0, 2)
        files = list(SEEDS)
        files[which] = fdp.ConsumeBytes(fdp.remaining_bytes())
        _identity(*files)
    elif target == 1:  # all three from the input
        size = max(1, fdp.remaining_bytes() // 3)
        _identity(fdp.ConsumeBytes(size), fdp.ConsumeBytes(size), fdp.ConsumeBytes(fdp.remaining_bytes()))
    elif target == 2:
        try:
            parse_spiffe_id(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
        except SvidError as exc:
            assert exc.reason
    else:
        with contextlib.suppress(tomllib.TOMLDecodeError, ValidationError, ConfigError):
            Config.model_validate(tomllib.loads(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())))


def _identity(chain: bytes, key: bytes, bundle: bytes) -> None:
    try:
        build_identity(CredentialFiles("fuzz", chain, key, own_bundle=bundle), NOW)
    except SvidError as exc:
        assert exc.reason and exc.message
        assert "PRIVATE KEY-----" not in exc.message, "an error message carries key material"


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
