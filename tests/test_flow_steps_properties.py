"""What a Flow tells its source about its flow (read from its steps, not from the config's flow string), and
the records it keeps (no secret in their reprs)."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from tests.test_tokens import entra_token_config, x509_token_config
from wlidd.config import parse_token_config
from wlidd.emulator.upstreams import Upstreams
from wlidd.tokens.flows import Flow, _Federated


@pytest.mark.parametrize(
    ("flow", "bound", "minter"),
    [("x509-sts", True, "iam"), ("entra-sts", False, "iam"), ("gce-metadata", False, "metadata")],
)
def test_each_flow_says_whether_its_token_is_bound_to_the_svid_and_who_mints_its_id_tokens(
    upstreams: Upstreams, flow: str, bound: bool, minter: str
) -> None:
    data = {
        "x509-sts": lambda: x509_token_config(upstreams),
        "entra-sts": lambda: entra_token_config(upstreams),
        "gce-metadata": lambda: {"flow": "gce-metadata"},
    }[flow]()
    made = Flow("t", parse_token_config(data))
    assert (made.bound_to_svid, made.id_token_minter) == (bound, minter)
    assert (made.steps.bound_to_svid, made.steps.id_token_minter) == (bound, minter)


async def test_the_kept_federated_token_is_not_in_its_repr() -> None:
    async with httpx.AsyncClient() as client:
        kept = _Federated("federated-secret-value", dt.datetime(2030, 1, 1, tzinfo=dt.UTC), client)
        assert "federated-secret-value" not in repr(kept)
        assert kept.client is client
