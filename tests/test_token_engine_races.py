"""The token engine's races and guards (issue 15, found with real clients against a real daemon):

1. Mints waiting for their `min_interval` turn re-check the backoff when it starts: after a 429 or 5xx
   no further mint goes upstream until the backoff passes; the waiting ones answer from the last error
   (with the seconds until the next attempt, for Retry-After), give their turn back and are not charged.
2. No call ever uses a closed HTTP client: the federated token's mTLS client outlives a rotation whose
   exchange failed, a client in use outlives its replacement and `Flow.aclose`, and a stopped flow says
   so instead of "unexpected RuntimeError".
3. Cached scoped and ID tokens follow the rule of the source's own token: re-minted (single-flight) once
   under min(300 s, half their lifetime) left; the cached one is served only when no new one can be had.
4. Scoped mints are budgeted per caller (uid) plus a per-source cap; a refused caller whose request the
   source's own token covers gets that token.
6. A `ca_file` (or Entra signer file) that is not a regular file is refused at once by the daemon and by
   `wlidd check`, never opened in a way that blocks; a failure before anything was sent is not counted
   as an upstream call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import random
import shutil
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.clients.harness import metadata_daemon
from tests.conftest import FileSet, in_background
from tests.test_tokens import entra_token_config, metadata_token_config, x509_token_config
from wlidd.config import Config, parse_identity_config, parse_token_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.errors import UpstreamError, WlidError
from wlidd.status_report import token_status
from wlidd.svid.load.source import CredentialSource
from wlidd.tokens.flows import Flow
from wlidd.tokens.flows.transports import upstream_ssl_context
from wlidd.tokens.limits import IdTokenLimits, ScopedLimits
from wlidd.tokens.manager import RateLimited, TokenSource, TokenUnavailable
from wlidd.tokens.model import Token
from wlidd.tokens.preflight import token_problems
from wlidd.tokens.schedule import RefreshPolicy
from wlidd.watch import CredentialWatcher

AUD = "https://service.example.com"
AUTH = "https://www.googleapis.com/auth/"
READ_ONLY = AUTH + "devstorage.read_only"
GMAIL = AUTH + "gmail."  # a family cloud-platform does not cover: these scope sets are always minted
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
FLAVOR = {"Metadata-Flavor": "Google"}


def sha(text: str) -> str:
    """Tokens are compared by digest: a failing assertion must not print one."""
    return hashlib.sha256(text.encode()).hexdigest()


class Wall:
    """The wall clock the source reads; tests move it."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


Build = Callable[..., Awaitable[tuple[TokenSource, CredentialWatcher]]]


@pytest.fixture
async def build(files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Build]:
    """build(config, wall, **TokenSource kwargs) → (TokenSource over a loaded SVID, its watcher), its flow
    closed after the test."""
    made: list[TokenSource] = []
    files.put(ca.issue_svid(), ca.bundle_pem)

    async def make(config: dict[str, Any], wall: Wall, **kwargs: Any) -> tuple[TokenSource, CredentialWatcher]:
        identity = parse_identity_config(files.config().model_dump())
        watcher = CredentialWatcher("default", CredentialSource("default", identity))
        await watcher.reload("start")
        token_config = parse_token_config(config)
        flow = Flow("gcp", token_config, lambda: watcher.current)
        source = TokenSource("gcp", token_config, flow, watcher=watcher, clock=wall, rng=random.Random(3), **kwargs)
        made.append(source)
        return source, watcher

    yield make
    for source in made:
        await source.flow.aclose()


async def gather(*asks: Callable[[], Awaitable[object]]) -> list[object]:
    """Run `asks` concurrently: each one's result or the WlidError it raised, in order."""
    results: list[object] = [None] * len(asks)

    async def run(i: int) -> None:
        try:
            results[i] = await asks[i]()
        except WlidError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(asks)):
            tg.start_soon(run, i)
    return results


async def rotate(files: FileSet, ca: CertificateAuthority, watcher: CredentialWatcher) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    await watcher.reload("rotated")


# ---- 1: mints waiting for their turn re-check the backoff ------------------------------------------------
async def test_id_token_mints_waiting_for_their_turn_do_not_call_an_upstream_that_answered_429(
    upstreams: Upstreams, build: Build
) -> None:
    """Five new audiences at once, min_interval 0.2 s, the upstream answering 429 + Retry-After: 30: the first
    mint's 429 comes before the second one's turn, so one upstream call in all (seen live, min_interval 1 s,
    50 audiences: 10 calls in 9 s, each after a 429)."""
    source, _ = await build(x509_token_config(upstreams, min_interval=0.2), Wall())
    await source.refresh("test")
    calls = source.upstream_calls
    upstreams.inject("iam_id_token", Fault(status=429, retry_after="30"))
    errors = await gather(*[lambda i=i: source.id_token(f"{AUD}/{i}", caller=1000) for i in range(5)])
    assert all(isinstance(e, UpstreamError) for e in errors)
    assert upstreams.calls["iam_id_token"] == 1, "mints waiting for their turn called the upstream after its 429"
    assert source.upstream_calls == calls + 1


async def test_scoped_mints_waiting_for_their_turn_do_not_call_an_upstream_that_answered_429(
    upstreams: Upstreams, build: Build
) -> None:
    source, _ = await build(x509_token_config(upstreams, min_interval=0.2), Wall())
    await source.refresh("test")
    before = upstreams.calls["iam"]
    upstreams.inject("iam", Fault(status=429, retry_after="30"))
    errors = await gather(*[lambda i=i: source.scoped_token((f"{GMAIL}set{i}",), caller=1000) for i in range(5)])
    assert all(isinstance(e, UpstreamError) for e in errors)
    assert upstreams.calls["iam"] - before == 1, "scoped mints waiting for their turn called IAM after its 429"


async def test_mints_held_by_a_backoff_answer_with_the_seconds_until_the_next_attempt(
    upstreams: Upstreams, build: Build
) -> None:
    """The answer from a backoff carries `retry_after` (the HTTP layer's Retry-After): the seconds until the
    next attempt, not the upstream's original Retry-After."""
    wall = Wall()
    source, _ = await build(x509_token_config(upstreams, min_interval=0.2), wall)
    await source.refresh("test")
    upstreams.inject("iam", Fault(status=503, retry_after="30"))
    id_errors = await gather(*[lambda i=i: source.id_token(f"{AUD}/{i}") for i in range(3)])
    scoped_errors = await gather(*[lambda i=i: source.scoped_token((f"{GMAIL}s{i}",)) for i in range(3)])
    wall.advance(20)
    later = await gather(lambda: source.id_token(f"{AUD}/late"), lambda: source.scoped_token((f"{GMAIL}late",)))
    for error in [*id_errors[1:], *scoped_errors[1:]]:
        assert isinstance(error, UpstreamError) and "backing off" in error.message
        assert error.retry_after is not None and 1 <= error.retry_after <= 30
    for error in later:
        assert isinstance(error, UpstreamError) and error.retry_after is not None and 1 <= error.retry_after <= 10


async def test_mints_held_by_a_backoff_are_not_charged_to_the_caller(upstreams: Upstreams, build: Build) -> None:
    """uid 1000 may mint 5 ID tokens (no refill): five audiences at once, the first answered 503: the four
    answered from the backoff cost nothing, so once it passes four more mints go and the fifth is 429."""
    wall = Wall()
    limits = IdTokenLimits(caller_burst=5, caller_per_minute=0.001)
    source, _ = await build(x509_token_config(upstreams, min_interval=0.2), wall, id_limits=limits)
    await source.refresh("test")
    upstreams.inject("iam_id_token", Fault(status=503, retry_after="10"))
    await gather(*[lambda i=i: source.id_token(f"{AUD}/{i}", caller=1000) for i in range(5)])
    upstreams.clear("iam_id_token")
    wall.advance(11)
    for i in range(4):
        await source.id_token(f"{AUD}/again{i}", caller=1000)
    with pytest.raises(RateLimited):
        await source.id_token(f"{AUD}/one-too-many", caller=1000)


async def test_a_turn_given_up_by_a_held_mint_does_not_delay_the_calls_after_it(
    upstreams: Upstreams, build: Build
) -> None:
    """Four mints queued 0.5 s apart are held by the first one's 503: their turns are handed back, so the next
    call waits at most min_interval after the last call that went, not behind four empty turns."""
    wall = Wall()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await anyio.sleep(seconds)

    source, _ = await build(x509_token_config(upstreams, min_interval=0.5), wall, sleep=sleep)
    await source.refresh("test")
    upstreams.inject("iam_id_token", Fault(status=503, count=1))
    await gather(*[lambda i=i: source.id_token(f"{AUD}/{i}") for i in range(5)])
    assert upstreams.calls["iam_id_token"] == 1
    wall.advance(60)  # past the backoff
    slept.clear()
    await source.id_token(f"{AUD}/next")
    assert all(s <= 0.5 for s in slept), slept


async def test_metadata_answers_from_a_backoff_carry_retry_after(tmp_path: Path, ca: CertificateAuthority) -> None:
    """Through the metadata API: the upstream answers an ID-token mint 429 + Retry-After: 30, and the next
    audience's 503 (from the backoff) says when to come back."""
    async with metadata_daemon(tmp_path, ca) as (daemon, upstreams):
        upstreams.inject("metadata_identity", Fault(status=429, retry_after="30"))
        base = f"http://127.0.0.1:{daemon.metadata_port}/computeMetadata/v1/instance/service-accounts/default"
        async with httpx.AsyncClient(base_url=base, headers=FLAVOR) as c:
            first = await c.get("/identity", params={"audience": f"{AUD}/1"})
            held = await c.get("/identity", params={"audience": f"{AUD}/2"})
    assert first.status_code == 503 and held.status_code == 503 and "backing off" in held.text
    assert upstreams.calls["metadata_identity"] == 1
    assert 1 <= int(held.headers.get("retry-after", "0")) <= 30, held.headers


# ---- 2: no call uses a closed client ----------------------------------------------------------------------
async def test_mints_after_a_rotation_whose_refresh_failed_use_the_federated_tokens_live_client(
    upstreams: Upstreams, build: Build, files: FileSet, ca: CertificateAuthority
) -> None:
    """The SVID rotates while STS is down: the refresh fails and the federated token of the last exchange
    (valid, and its certificate too) is what mints use, over the client it was obtained over. That client
    was closed by the rotation: every mint failed with "unexpected RuntimeError while minting"."""
    source, watcher = await build(x509_token_config(upstreams), Wall())
    await source.refresh("test")
    upstreams.inject("sts_mtls", Fault(status=503))
    await rotate(files, ca, watcher)
    with pytest.raises(UpstreamError):
        await source.refresh("svid-rotated")
    outcomes = await gather(lambda: source.id_token(AUD), lambda: source.scoped_token((READ_ONLY,)))
    assert [type(o).__name__ for o in outcomes] == ["str", "Token"], [getattr(o, "reason", "ok") for o in outcomes]


async def test_a_mint_in_flight_survives_a_rotation_that_replaces_its_client(
    upstreams: Upstreams, build: Build, files: FileSet, ca: CertificateAuthority
) -> None:
    """An ID-token mint is in flight over the old SVID's client when the rotation's refresh succeeds: the
    old client stays open until the mint has its answer, then it is closed (nothing refers to it)."""
    source, watcher = await build(x509_token_config(upstreams), Wall())
    await source.refresh("test")
    assert source.flow._federated is not None
    old_client = source.flow._federated.client
    upstreams.inject("iam_id_token", Fault(error_rate=0, latency=2.5))
    outcome: list[object] = []
    async with anyio.create_task_group() as tg:

        async def mint() -> None:
            outcome.extend(await gather(lambda: source.id_token(AUD)))

        tg.start_soon(mint)
        with anyio.fail_after(10):
            while upstreams.calls["iam_id_token"] < 1:
                await anyio.sleep(0.01)
        await rotate(files, ca, watcher)
        await source.refresh("svid-rotated")
        assert not outcome, "the mint was no longer in flight during the rotation: the test proves nothing"
    assert isinstance(outcome[0], str), getattr(outcome[0], "message", "")
    assert old_client.is_closed


async def test_a_call_in_flight_when_the_flow_is_closed_completes_and_later_calls_say_the_source_stopped(
    upstreams: Upstreams, build: Build
) -> None:
    """A config reload closes the old source's flow while requests may still be using it: the call in
    flight gets its answer (its client closed after it), later calls a clear error, never wlidd_internal."""
    source, _ = await build(x509_token_config(upstreams), Wall())
    await source.refresh("test")
    assert source.flow._federated is not None
    client = source.flow._federated.client
    upstreams.inject("iam_id_token", Fault(error_rate=0, latency=1.0))
    outcome: list[object] = []
    async with anyio.create_task_group() as tg:

        async def mint() -> None:
            outcome.extend(await gather(lambda: source.id_token(AUD)))

        tg.start_soon(mint)
        with anyio.fail_after(10):
            while upstreams.calls["iam_id_token"] < 1:
                await anyio.sleep(0.01)
        await source.flow.aclose()
    assert isinstance(outcome[0], str), getattr(outcome[0], "message", "")
    assert client.is_closed
    with pytest.raises(UpstreamError) as stopped:
        await source.refresh("after-close")
    assert stopped.value.reason == "wlidd_other" and "was stopped" in stopped.value.message


@pytest.mark.parametrize("config", [metadata_token_config, x509_token_config], ids=["plain", "mtls"])
async def test_a_refresh_after_the_flow_was_closed_is_no_internal_error(
    upstreams: Upstreams, build: Build, config: Callable[..., dict[str, Any]]
) -> None:
    source, _ = await build(config(upstreams), Wall())
    await source.refresh("test")
    await source.flow.aclose()
    with pytest.raises(UpstreamError) as stopped:
        await source.refresh("after-close")
    assert stopped.value.reason == "wlidd_other", stopped.value.message


# ---- 3: the 300 s rule for cached scoped and ID tokens -------------------------------------------------
def test_a_cached_token_is_kept_while_min_300s_or_half_its_lifetime_is_left_never_below_its_margin() -> None:
    policy, now = RefreshPolicy(skew=60), dt.datetime.now(dt.UTC)

    def token(lifetime: float) -> Token:
        return Token("x", now + dt.timedelta(seconds=lifetime), now, "t")

    assert policy.keep(token(3600)) == 300 and policy.keep(token(400)) == 200
    assert policy.keep(token(100)) == 50 and policy.keep(token(30)) == 15  # half the lifetime
    assert RefreshPolicy(skew=400).keep(token(3600)) == 400  # never below the serving margin
    assert policy.fresh(token(3600), now + dt.timedelta(seconds=3299))
    assert not policy.fresh(token(3600), now + dt.timedelta(seconds=3301))


async def test_a_scoped_token_is_never_served_with_less_than_300s_left_when_its_lifetime_allows(
    upstreams: Upstreams, build: Build
) -> None:
    """Node's google-auth-library treats < 300 s as expired and asks again on every API call (seen live:
    one metadata request per call once the scoped token had 297 s left)."""
    wall = Wall()
    source, _ = await build(x509_token_config(upstreams), wall)
    await source.refresh("test")
    first = await source.scoped_token((READ_ONLY,))
    wall.advance(first.seconds_left(wall()) - 200)
    served = await source.scoped_token((READ_ONLY,))
    assert served.seconds_left(wall()) >= 300, f"served with {served.seconds_left(wall()):.0f}s left"


async def test_an_id_token_is_never_served_with_less_than_300s_left_when_its_lifetime_allows(
    upstreams: Upstreams, build: Build
) -> None:
    wall = Wall()
    source, _ = await build(x509_token_config(upstreams), wall)
    await source.refresh("test")
    await source.id_token(AUD)
    wall.advance(source._id_cache[AUD].seconds_left(wall()) - 200)
    await source.id_token(AUD)
    left = source._id_cache[AUD].seconds_left(wall())
    assert left >= 300, f"the ID token served has {left:.0f}s left"


async def test_a_due_scoped_token_is_reminted_once_for_concurrent_callers(upstreams: Upstreams, build: Build) -> None:
    wall = Wall()
    source, _ = await build(x509_token_config(upstreams), wall)
    await source.refresh("test")
    first = await source.scoped_token((READ_ONLY,))
    wall.advance(first.seconds_left(wall()) - 200)
    before = upstreams.calls["iam"]
    served = await gather(*[lambda: source.scoped_token((READ_ONLY,), caller=1000) for _ in range(6)])
    assert upstreams.calls["iam"] - before == 1
    assert len({sha(t.value) for t in served if isinstance(t, Token)}) == 1 and served[0] is not first


async def test_a_due_id_token_is_reminted_once_for_concurrent_callers(upstreams: Upstreams, build: Build) -> None:
    wall = Wall()
    source, _ = await build(x509_token_config(upstreams), wall)
    await source.refresh("test")
    await source.id_token(AUD)
    wall.advance(source._id_cache[AUD].seconds_left(wall()) - 200)
    before = upstreams.calls["iam_id_token"]
    served = await gather(*[lambda: source.id_token(AUD, caller=1000) for _ in range(6)])
    assert upstreams.calls["iam_id_token"] - before == 1
    assert len({sha(v) for v in served if isinstance(v, str)}) == 1


async def test_a_due_scoped_token_whose_remint_fails_is_served_until_its_margin(
    upstreams: Upstreams, build: Build
) -> None:
    """IAM fails the re-mint: the cached token (200 s left) is served rather than an error, and once it is
    within skew of its expiry the error is the answer."""
    wall = Wall()
    source, _ = await build(x509_token_config(upstreams), wall)
    await source.refresh("test")
    first = await source.scoped_token((READ_ONLY,))
    wall.advance(first.seconds_left(wall()) - 200)
    upstreams.inject("iam", Fault(status=503))
    before = upstreams.calls["iam"]
    served = await source.scoped_token((READ_ONLY,))
    assert upstreams.calls["iam"] - before == 1, "no re-mint was tried"
    assert served is first
    wall.advance(150)  # 50 s left: within skew
    with pytest.raises(UpstreamError):
        await source.scoped_token((READ_ONLY,))


async def test_a_due_id_token_whose_remint_is_held_or_rate_limited_is_served_until_its_margin(
    upstreams: Upstreams, build: Build
) -> None:
    wall = Wall()
    limits = IdTokenLimits(caller_burst=2, caller_per_minute=0.001)
    source, _ = await build(x509_token_config(upstreams), wall, id_limits=limits)
    await source.refresh("test")
    first = sha(await source.id_token(AUD, caller=1000))
    wall.advance(source._id_cache[AUD].seconds_left(wall()) - 200)
    upstreams.inject("iam_id_token", Fault(status=503, retry_after="30"))
    before = upstreams.calls["iam_id_token"]
    assert sha(await source.id_token(AUD, caller=1000)) == first  # the re-mint failed: the cached one
    assert sha(await source.id_token(AUD, caller=1001)) == first  # held: the cached one, IAM not asked
    assert upstreams.calls["iam_id_token"] - before == 1
    upstreams.clear("iam_id_token")
    wall.advance(31)
    assert sha(await source.id_token(AUD, caller=1000)) == first  # uid 1000's budget is spent: the cached one
    assert upstreams.calls["iam_id_token"] - before == 1


# ---- 4: scoped-mint budgets per caller, and the source's token when it covers the request -----------------
async def test_one_caller_spending_its_scoped_mint_budget_leaves_another_callers_budget_alone(
    upstreams: Upstreams, build: Build
) -> None:
    source, _ = await build(x509_token_config(upstreams), Wall())
    await source.refresh("test")
    burst = ScopedLimits().caller_burst
    for i in range(burst):
        await source.scoped_token((f"{GMAIL}a{i}",), caller=1000)
    with pytest.raises(RateLimited) as limited:
        await source.scoped_token((f"{GMAIL}a{burst}",), caller=1000)
    assert "uid 1000" in limited.value.message
    other = await source.scoped_token((f"{GMAIL}b0",), caller=1001)
    assert other.seconds_left(dt.datetime.now(dt.UTC)) > 300


async def test_the_source_caps_scoped_mints_of_all_callers_together(upstreams: Upstreams, build: Build) -> None:
    limits = ScopedLimits(caller_burst=3, caller_per_minute=0.001, mints_burst=5, mints_per_minute=0.001)
    source, _ = await build(x509_token_config(upstreams), Wall(), scoped_limits=limits)
    await source.refresh("test")
    for i in range(5):
        await source.scoped_token((f"{GMAIL}s{i}",), caller=1000 + i % 2)
    with pytest.raises(RateLimited) as limited:
        await source.scoped_token((f"{GMAIL}s5",), caller=1002)
    assert "all callers together" in limited.value.message


async def test_per_caller_scoped_budgets_are_bounded(upstreams: Upstreams, build: Build) -> None:
    limits = ScopedLimits(max_callers=4, caller_burst=1, mints_burst=100)
    source, _ = await build(x509_token_config(upstreams), Wall(), scoped_limits=limits)
    await source.refresh("test")
    for uid in range(1000, 1010):
        await source.scoped_token((f"{GMAIL}{uid}",), caller=uid)
        assert source._scoped is not None and len(source._scoped.callers) <= 4


async def test_a_rate_limited_caller_gets_the_sources_token_when_it_covers_the_request(
    upstreams: Upstreams, build: Build
) -> None:
    limits = ScopedLimits(caller_burst=1, caller_per_minute=0.001)
    source, _ = await build(x509_token_config(upstreams), Wall(), scoped_limits=limits)
    await source.refresh("test")
    await source.scoped_token((f"{AUTH}pubsub",), caller=1000)
    with pytest.raises(RateLimited):  # not covered: the 429 is the answer
        await source.scoped_token((f"{GMAIL}send",), caller=1000)
    covered = await source.scoped_token((READ_ONLY,), caller=1000, covered=True)
    assert covered is source.current


async def test_a_failed_scoped_mint_gives_the_sources_token_when_it_covers_the_request(
    upstreams: Upstreams, build: Build
) -> None:
    source, _ = await build(x509_token_config(upstreams), Wall())
    await source.refresh("test")
    upstreams.inject("iam", Fault(status=503))
    covered = await source.scoped_token((READ_ONLY,), caller=1000, covered=True)
    held = await source.scoped_token((f"{AUTH}pubsub",), caller=1000, covered=True)
    assert covered is source.current and held is source.current
    with pytest.raises(UpstreamError):
        await source.scoped_token((f"{GMAIL}send",), caller=1000)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
async def test_one_user_spending_its_scoped_mint_budget_does_not_deny_another_users_request(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """Through the metadata API: uid 65534 asks for 12 new scope sets the token does not cover and is
    refused after its burst; root then asks for datastore. Seen live: root's Node client failed with "token
    'gcp' minted tokens for scope sets faster than 10 per minute"."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"gcp": x509_token_config(upstreams)},
            "policy": {"tokens": {"users": ["root", 65534]}},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {"address": "127.0.0.1:0", "token": "gcp", "project_id": "demo-project"},
            },
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop):
        await d.tokens["gcp"].get()
        url = f"http://127.0.0.1:{d.metadata_port}{TOKEN}?scopes={GMAIL}nobody"
        program = (
            "import sys, urllib.request, urllib.error\n"
            "codes = []\n"
            "for i in range(12):\n"
            f"    r = urllib.request.Request('{url}' + str(i), headers={{'Metadata-Flavor': 'Google'}})\n"
            "    try: codes.append(urllib.request.urlopen(r).status)\n"
            "    except urllib.error.HTTPError as e: codes.append(e.code)\n"
            "print(codes)\n"
        )
        nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c"]
        result = await anyio.run_process([*nobody, program], check=False)
        assert b"429" in result.stdout, result.stdout  # uid 65534's budget is spent
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metadata_port}", headers=FLAVOR) as c:
            root = await c.get(TOKEN, params={"scopes": AUTH + "datastore"})
            root_uncovered = await c.get(TOKEN, params={"scopes": GMAIL + "root"})
        assert root.status_code == 200, root.text
        assert root_uncovered.status_code == 200, root_uncovered.text  # minted: root's own budget


# ---- 6: files that are not regular files; nothing sent, nothing counted --------------------------------
@contextlib.contextmanager
def fifo_guard(*fifos: Path) -> Iterator[list[Path]]:
    """Let go of any open() still blocked on `fifos` 3 s into the block (by opening their writer end, as
    often as needed), so code that blocks fails instead of hanging the test run. Yields the FIFOs it had to
    release: empty when nothing blocked."""
    released: list[Path] = []
    stop = threading.Event()

    def watch() -> None:
        delay = 3.0
        while not stop.wait(delay):
            delay = 0.05
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO unless a reader is waiting
                except OSError:
                    continue
                released.append(fifo)
                os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield released
    finally:
        stop.set()
        watcher.join()


def test_wlidd_check_of_a_fifo_ca_file_reports_it_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    config = Config.model_validate(
        {"tokens": {"gcp": {"flow": "gce-metadata", "ca_file": str(fifo), "metadata": {"url": "http://127.0.0.1:1"}}}}
    )
    with fifo_guard(fifo) as released:
        problems = token_problems(config)
    assert not released, "token_problems blocked in open() of the FIFO"
    assert problems == [f"tokens.gcp.ca_file: {fifo}: is not a regular file"]


def test_wlidd_check_of_fifo_entra_signer_files_reports_them_instead_of_hanging(tmp_path: Path) -> None:
    cert, key = tmp_path / "entra.pem", tmp_path / "entra.key"
    os.mkfifo(cert)
    os.mkfifo(key)
    entra = {"tenant_id": "t", "client_id": "c", "scope": "api://x/.default", "cert": str(cert), "key": str(key)}
    config = Config.model_validate(
        {"tokens": {"gcp": {"flow": "entra-sts", "entra": entra, "sts": {"audience": "//iam.googleapis.com/x"}}}}
    )
    with fifo_guard(cert, key) as released:
        problems = token_problems(config)
    assert not released, "token_problems blocked in open() of a FIFO"
    assert problems == [
        f"tokens.gcp.entra.key: {key}: is not a regular file",
        f"tokens.gcp.entra.cert: {cert}: is not a regular file",
    ]


def test_a_fifo_ca_file_at_run_time_is_a_permanent_error_naming_the_path(tmp_path: Path) -> None:
    """`upstream_ssl_context` runs on the event loop: OpenSSL's open() of a FIFO blocked it (seen live: `wlidd
    run` never got ready)."""
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with fifo_guard(fifo) as released, pytest.raises(UpstreamError) as info:
        upstream_ssl_context(fifo)
    assert not released, "upstream_ssl_context blocked in open() of the FIFO"
    assert info.value.reason == "wlidd_ca_file" and info.value.permanent
    assert info.value.message == f"ca_file {fifo}: is not a regular file"


async def test_fifo_entra_signer_files_at_run_time_are_a_signer_error(
    upstreams: Upstreams, build: Build, tmp_path: Path
) -> None:
    cert, key = tmp_path / "entra.pem", tmp_path / "entra.key"
    os.mkfifo(cert)
    os.mkfifo(key)
    config = entra_token_config(upstreams)
    config["entra"] |= {"cert": str(cert), "key": str(key)}
    source, _ = await build(config, Wall())
    with fifo_guard(cert, key) as released, pytest.raises(UpstreamError) as info:
        await source.refresh("test")
    assert not released, "the refresh blocked the event loop in open() of a FIFO"
    assert info.value.reason == "entra_signer" and "not a regular file" in info.value.message


@pytest.mark.parametrize("problem", ["missing", "fifo"])
async def test_a_ca_file_that_cannot_be_loaded_sends_nothing_and_counts_no_upstream_call(
    upstreams: Upstreams, build: Build, tmp_path: Path, problem: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if problem == "fifo":
        os.mkfifo(ca_file)
    source, _ = await build(metadata_token_config(upstreams, ca_file=str(ca_file)), Wall())
    with fifo_guard(ca_file) as released, pytest.raises(UpstreamError) as info:
        await source.refresh("test")
    assert not released and info.value.reason == "wlidd_ca_file", info.value.message
    assert source.upstream_calls == 0 and token_status(source, source.clock()).upstream_calls == 0


async def test_an_x509_source_without_a_valid_svid_counts_no_upstream_call(upstreams: Upstreams, build: Build) -> None:
    source, _ = await build(x509_token_config(upstreams), Wall())
    source.flow.current_identity = lambda: None
    with pytest.raises(UpstreamError) as info:
        await source.refresh("test")
    assert info.value.reason == "identity_unavailable" and source.upstream_calls == 0


async def test_a_source_backing_off_says_when_it_tries_again(upstreams: Upstreams, build: Build) -> None:
    """The 503 for a token that is not available while its source backs off carries `retry_after` (the
    HTTP layer's Retry-After)."""
    source, _ = await build(metadata_token_config(upstreams, backoff_min=20, backoff_max=40), Wall())
    upstreams.inject("metadata", Fault(status=503))
    with pytest.raises(UpstreamError):
        await source.refresh("test")
    with pytest.raises(TokenUnavailable) as unavailable:
        await source.get()
    assert unavailable.value.retry_after is not None and 1 <= unavailable.value.retry_after <= 40
