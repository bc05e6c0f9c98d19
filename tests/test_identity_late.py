"""A token that needs an identity is fetched as soon as that identity first loads (a node provisioned after
wlidd started), not when the backoff of its failed attempts ("no valid SVID loaded") runs out: that lagged
by up to backoff_max (5 min by default)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import FileSet, in_background, wait_until
from tests.test_tokens import x509_token_config
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams


async def test_a_token_is_fetched_once_its_identity_first_loads_not_after_its_backoff(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    config = Config.model_validate(
        {
            "identities": {"default": files.config(mismatch_retries=1, mismatch_retry_delay="0.1s")},
            # an hour's backoff after the first failure: only the identity's load can bring the fetch forward
            "tokens": {"x509": x509_token_config(upstreams, backoff_min="1h", backoff_max="1h")},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop):
        source = d.tokens["x509"]
        await wait_until(
            lambda: source.last_error is not None and source.last_error.reason == "identity_unavailable",
            what="a fetch refused for want of the identity",
        )
        files.put(ca.issue_svid("/ns/prod/sa/x509"), ca.bundle_pem)  # the agent provisions the node
        await wait_until(lambda: source.servable() is not None, what="the token, fetched on the identity's load")
    assert len(upstreams.mtls_leaves) == 1
