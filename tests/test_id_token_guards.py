"""ID tokens get every guard access tokens have (issue 15 item 9), over real sockets against the emulator,
counting upstream calls exactly: single-flight, backoff with Retry-After, answers from the last error
without calling upstream, the STS exchange taken from the source's own (backing-off) refresh, and
per-audience state that is bounded and freed. Time is the source's injected wall clock."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from tests.conftest import FileSet
from tests.test_tokens import metadata_token_config, x509_token_config
from wlidd.config import parse_identity_config, parse_token_config
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.errors import UpstreamError, WlidError
from wlidd.svid.load.source import CredentialSource
from wlidd.tokens.flows import Flow
from wlidd.tokens.limits import IdTokenLimits
from wlidd.tokens.manager import TokenSource
from wlidd.watch import CredentialWatcher

AUD = "https://service.example.com"


class Wall:
    """The wall clock the source reads; tests move it."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
async def build(files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Callable[..., Any]]:
    """build(config, wall, **kwargs) → a TokenSource over a loaded SVID, closed after the test."""
    made: list[TokenSource] = []
    files.put(ca.issue_svid(), ca.bundle_pem)

    async def make(config: dict[str, Any], wall: Wall, **kwargs: Any) -> TokenSource:
        identity = parse_identity_config(files.config().model_dump())
        watcher = CredentialWatcher("default", CredentialSource("default", identity))
        await watcher.reload("start")
        token_config = parse_token_config(config)
        flow = Flow("gcp", token_config, lambda: watcher.current)
        source = TokenSource("gcp", token_config, flow, watcher=watcher, clock=wall, rng=random.Random(3), **kwargs)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.flow.aclose()


async def _ask(source: TokenSource, audience: str, errors: list[WlidError], caller: int | None = None) -> None:
    try:
        await source.id_token(audience, caller=caller)
    except WlidError as exc:
        errors.append(exc)


# (config maker, the emulator's name for ID-token calls, the reason of its default 429 body)
FLOWS = {
    "iam-generateIdToken": (x509_token_config, "iam_id_token", "iam_resource_exhausted"),
    "metadata-identity": (metadata_token_config, "metadata_identity", "metadata_resource_exhausted"),
}


@pytest.mark.parametrize("flow", FLOWS)
async def test_an_audience_answered_429_retry_after_30_is_answered_from_its_last_error_for_30s(
    flow: str, upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    """20 parallel then 20 serial requests while the upstream answers 429 + Retry-After: 30 make one call."""
    make_config, endpoint, reason = FLOWS[flow]
    wall = Wall()
    source: TokenSource = await build(make_config(upstreams), wall)
    await source.refresh("test")  # the access token (and, for IAM, the federated token mints use)
    base = source.upstream_calls
    upstreams.inject(endpoint, Fault(status=429, retry_after="30"))
    errors: list[WlidError] = []
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(_ask, source, AUD, errors)
    for uid in range(20):
        await _ask(source, AUD, errors, caller=1000 + uid % 2)  # answers from the last error cost no bucket
    assert upstreams.calls[endpoint] == 1 and source.upstream_calls == base + 1
    assert len(errors) == 40 and all(isinstance(e, UpstreamError) and e.reason == reason for e in errors)
    assert "next attempt" in errors[-1].message
    wall.advance(29.5)
    await _ask(source, AUD, errors)
    assert upstreams.calls[endpoint] == 1 and len(errors) == 41
    upstreams.clear(endpoint)
    wall.advance(1)
    assert await source.id_token(AUD)
    assert upstreams.calls[endpoint] == 2 and source.upstream_calls == base + 2


async def test_a_transient_failure_holds_every_new_audience_and_one_probe_retries_after_it(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    """Other audiences are not minted while the upstream backs off (cached ones are still served); when
    the backoff passes, one mint probes the upstream and concurrent mints wait for its outcome."""
    wall = Wall()
    source: TokenSource = await build(x509_token_config(upstreams, backoff_min=10, backoff_max=10), wall)
    await source.refresh("test")
    cached = await source.id_token("https://cached.example.com")
    upstreams.inject("iam_id_token", Fault(status=503))
    errors: list[WlidError] = []
    await _ask(source, "https://a.example.com", errors)
    await _ask(source, "https://b.example.com", errors)
    assert upstreams.calls["iam_id_token"] == 2  # the cached one and the failure; b was not asked for
    assert [e.reason for e in errors] == ["iam_unavailable", "iam_unavailable"]
    assert await source.id_token("https://cached.example.com") == cached
    wall.advance(11)
    upstreams.inject("iam_id_token", Fault(status=503, latency=0.3))  # the probe is slow: the others pile up
    errors.clear()
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(_ask, source, f"https://{n}.example.com", errors)
    assert upstreams.calls["iam_id_token"] == 3 and len(errors) == 10  # one probe, ten answers from it
    wall.advance(11)
    upstreams.clear("iam_id_token")
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(_ask, source, f"https://{n}.example.com", errors)
    assert len(errors) == 10 and upstreams.calls["iam_id_token"] == 13  # recovered: each audience minted once


async def test_an_audience_refused_permanently_is_not_asked_again_before_backoff_max_and_others_are_minted(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    wall = Wall()
    source: TokenSource = await build(x509_token_config(upstreams, backoff_min=1, backoff_max=300), wall)
    await source.refresh("test")
    refusal = {"error": {"code": 400, "message": "audience rejected", "status": "INVALID_ARGUMENT"}}
    upstreams.inject("iam_id_token", Fault(status=400, body=refusal, count=1))
    errors: list[WlidError] = []
    for _ in range(5):
        await _ask(source, "https://bad.example.com", errors)
    assert upstreams.calls["iam_id_token"] == 1 and len(errors) == 5
    assert all(isinstance(e, UpstreamError) and e.reason == "iam_invalid_argument" and e.permanent for e in errors)
    assert "refused for this audience" in errors[-1].message
    assert await source.id_token("https://good.example.com")  # one audience's refusal holds no other
    assert upstreams.calls["iam_id_token"] == 2
    wall.advance(299)
    await _ask(source, "https://bad.example.com", errors)
    assert upstreams.calls["iam_id_token"] == 2 and len(errors) == 6
    wall.advance(2)
    assert await source.id_token("https://bad.example.com")  # backoff_max passed: asked again (and granted)
    assert upstreams.calls["iam_id_token"] == 3 and not source._id_backoff.refused  # freed on success


async def test_refused_audiences_are_remembered_within_a_bound_and_forgotten_oldest_first(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    wall = Wall()
    limits = IdTokenLimits(refused_audiences=4)
    source: TokenSource = await build(x509_token_config(upstreams, backoff_max=300), wall, id_limits=limits)
    await source.refresh("test")
    upstreams.inject("iam_id_token", Fault(status=403))  # PERMISSION_DENIED: permanent
    errors: list[WlidError] = []
    audiences = [f"https://{n}.example.com" for n in range(6)]
    for audience in audiences:
        await _ask(source, audience, errors)
    assert upstreams.calls["iam_id_token"] == 6 and len(source._id_backoff.refused) == 4
    for audience in audiences[2:]:  # the four most recent: answered from their errors
        await _ask(source, audience, errors)
    assert upstreams.calls["iam_id_token"] == 6
    await _ask(source, audiences[0], errors)  # forgotten: asked again
    assert upstreams.calls["iam_id_token"] == 7 and len(source._id_backoff.refused) == 4
    assert {e.reason for e in errors} == {"iam_permission_denied"} and len(errors) == 11
    wall.advance(301)
    upstreams.clear("iam_id_token")
    for audience in audiences:
        assert await source.id_token(audience)
    assert not source._id_backoff.refused and not source._id_flights and source._id_probe is None


async def test_a_stale_federated_token_is_renewed_once_through_the_backing_off_refresh(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    """An on-demand source whose federated token is within the skew, with STS answering 429 + Retry-After:
    parallel ID-token requests for ten audiences make one exchange (single-flight, counted), and no
    request retries it before Retry-After passes; then one exchange renews it and its access token is
    the source's (not thrown away)."""
    wall = Wall()
    upstreams.sts_lifetime = 120  # the federated token lasts 2 min; the impersonated access token 1 h
    source: TokenSource = await build(x509_token_config(upstreams, on_demand=True), wall)
    first = await source.refresh("test")
    assert upstreams.calls["sts_mtls"] == 1
    wall.advance(70)  # the federated token is within the 60 s skew; the access token is not
    upstreams.inject("sts_mtls", Fault(status=429, retry_after="30"))
    errors: list[WlidError] = []
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(_ask, source, f"https://{n}.example.com", errors)
    assert upstreams.calls["sts_mtls"] == 2 and len(errors) == 10
    for n in range(10):
        await _ask(source, f"https://{n}.example.com", errors)
    assert upstreams.calls["sts_mtls"] == 2 and upstreams.calls["iam_id_token"] == 0
    assert {getattr(e, "reason", None) for e in errors} == {"sts_temporarily_unavailable"}
    wall.advance(31)
    upstreams.clear("sts_mtls")
    base = source.upstream_calls
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(_ask, source, f"https://{n}.example.com", errors)
    assert len(errors) == 20 and upstreams.calls["sts_mtls"] == 3 and upstreams.calls["iam_id_token"] == 10
    assert source.upstream_calls == base + 11  # one exchange chain and ten mints, all counted
    assert source.current is not None and source.current.value != first.value  # the chain's token is kept


async def test_an_on_demand_source_answers_from_its_last_error_until_retry_after_passes(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    """The access-token path the ID-token path shares: requests to an on-demand source backing off after
    429 + Retry-After: 30 do not call upstream again before then."""
    wall = Wall()
    source: TokenSource = await build(metadata_token_config(upstreams, on_demand=True), wall)
    upstreams.inject("metadata", Fault(status=429, retry_after="30"))
    failures = 0
    for _ in range(10):
        try:
            await source.get()
        except WlidError:
            failures += 1
    assert failures == 10 and upstreams.calls["metadata"] == 1
    upstreams.clear("metadata")
    wall.advance(31)
    assert await source.get()
    assert upstreams.calls["metadata"] == 2
