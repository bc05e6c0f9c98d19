"""Token flows end to end over real loopback sockets against the strict emulator."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import random
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import APP_URI, AUDIENCE, CLIENT_ID, SA, TD, X509_AUDIENCE, FileSet, in_background, wait_until
from wlidd.config import Config, parse_token_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid, new_key
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.errors import UpstreamError
from wlidd.logs import configure_logging, reset_logging
from wlidd.status_report import token_status
from wlidd.tokens.flows import Flow
from wlidd.tokens.manager import TokenSource
from wlidd.tokens.providers.entra import build_assertion


@pytest.fixture
def rsa_svid(ca: CertificateAuthority) -> IssuedSvid:
    return ca.issue_svid("/ns/prod/sa/entra-client", key_kind="rsa2048")


def _fast(upstreams: Upstreams, flow: str, overrides: dict[str, Any], **values: Any) -> dict[str, Any]:
    """A token config that fetches at once and backs off in milliseconds, for tests."""
    base: dict[str, Any] = {"flow": flow, "ca_file": str(upstreams.ca_file), "start_delay": 0, "min_interval": 0}
    base |= {"backoff_min": 0.05, "backoff_max": 0.2}
    return base | values | overrides


def entra_token_config(upstreams: Upstreams, **overrides: Any) -> dict[str, Any]:
    entra = {
        "authority": upstreams.authority,
        "tenant_id": upstreams.tenant_id,
        "client_id": CLIENT_ID,
        "scope": f"{APP_URI}/.default",
    }
    return _fast(
        upstreams,
        "entra-sts",
        overrides,
        identity="default",
        entra=entra,
        sts={"url": upstreams.sts_url, "audience": AUDIENCE},
        impersonate={"service_account": SA, "url": upstreams.iam_url},
    )


def x509_token_config(upstreams: Upstreams, **overrides: Any) -> dict[str, Any]:
    return _fast(
        upstreams,
        "x509-sts",
        overrides,
        identity="default",
        sts={"url": upstreams.sts_mtls_url, "audience": X509_AUDIENCE},
        impersonate={"service_account": SA, "url": upstreams.iam_mtls_url},
    )


def metadata_token_config(upstreams: Upstreams, **overrides: Any) -> dict[str, Any]:
    return _fast(upstreams, "gce-metadata", overrides, metadata={"url": upstreams.metadata_url})


def daemon_config(tmp_path: Path, files: FileSet, tokens: dict[str, dict[str, Any]], **unix: Any) -> Config:
    return Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": tokens,
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock"), **unix}},
        }
    )


def client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path)), base_url="http://wlidd", timeout=30
    )


async def wait_for_token(c: httpx.AsyncClient, name: str, timeout: float = 15) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            response = await c.get(f"/v1/token/{name}")
            if response.status_code == 200:
                document: dict[str, Any] = response.json()
                return document
            await anyio.sleep(0.05)


# ---- each flow end to end -------------------------------------------------------------------


async def test_entra_sts_with_impersonation_end_to_end(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, rsa_svid: IssuedSvid
) -> None:
    files.put(rsa_svid, ca.bundle_pem)
    upstreams.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
    d = Daemon(daemon_config(tmp_path, files, {"gcp": entra_token_config(upstreams)}))
    async with in_background(d.run, d.stop), client(d) as c:
        document = await wait_for_token(c, "gcp")
        plain = await c.get("/get_wif_token")
        status = (await c.get("/v1/status")).json()["tokens"]["gcp"]
    assert document["access_token"].startswith("ya29.iam-") and document["token_type"] == "Bearer"
    assert 3500 < document["expires_in"] <= 3600 and document["expire_time"].endswith("Z")
    assert plain.text == document["access_token"] and plain.headers["content-type"].startswith("text/plain")
    assert upstreams.calls["entra"] == 1 and upstreams.calls["sts"] == 1 and upstreams.calls["iam"] == 1
    assert status["valid"] is True and status["failures"] == 0 and status["next_refresh"] is not None
    assert upstreams.issued[document["access_token"]][1] == SA


async def test_entra_sts_without_impersonation_serves_the_federated_token(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, rsa_svid: IssuedSvid
) -> None:
    files.put(rsa_svid, ca.bundle_pem)
    upstreams.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
    d = Daemon(daemon_config(tmp_path, files, {"gcp": entra_token_config(upstreams, impersonate=None)}))
    async with in_background(d.run, d.stop), client(d) as c:
        document = await wait_for_token(c, "gcp")
    assert document["access_token"].startswith("ya29.sts-") and upstreams.calls["iam"] == 0


async def test_entra_sts_with_a_separate_signing_certificate(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)  # an EC identity: Entra needs RSA, so a separate cert signs
    signer = CertificateAuthority("entra.example", intermediate=False).issue_svid(key_kind="rsa2048")
    (tmp_path / "entra.crt").write_bytes(signer.chain_pem)
    (tmp_path / "entra.key").write_bytes(signer.key_pem)
    upstreams.register_app(CLIENT_ID, APP_URI, signer.leaf)
    entra = entra_token_config(upstreams)["entra"] | {
        "cert": str(tmp_path / "entra.crt"),
        "key": str(tmp_path / "entra.key"),
    }
    d = Daemon(daemon_config(tmp_path, files, {"gcp": entra_token_config(upstreams, identity=None, entra=entra)}))
    async with in_background(d.run, d.stop), client(d) as c:
        assert (await wait_for_token(c, "gcp"))["access_token"].startswith("ya29.iam-")


async def test_entra_with_an_ec_identity_key_fails_clearly(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(daemon_config(tmp_path, files, {"gcp": entra_token_config(upstreams)}))
    async with in_background(d.run, d.stop), client(d) as c:
        await wait_until(lambda: d.tokens["gcp"].failures > 0, what="the first failure")
        response = await c.get("/v1/token/gcp")
    assert response.status_code == 503 and response.json()["error"] == "token_unavailable"
    assert "need an RSA key" in response.json()["message"] and upstreams.calls["entra"] == 0


async def test_x509_sts_with_impersonation_over_mtls_end_to_end(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    svid = ca.issue_svid("/ns/prod/sa/x509")
    files.put(svid, ca.bundle_pem)
    d = Daemon(daemon_config(tmp_path, files, {"gcp": x509_token_config(upstreams)}))
    async with in_background(d.run, d.stop), client(d) as c:
        document = await wait_for_token(c, "gcp")
    assert document["access_token"].startswith("ya29.iam-")
    assert upstreams.mtls_leaves == [svid.leaf.serial_number]
    assert upstreams.calls["sts_mtls"] == 1 and upstreams.calls["iam"] == 1


async def test_gce_metadata_token_is_cached_and_re_served(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(daemon_config(tmp_path, files, {"mds": metadata_token_config(upstreams)}))
    async with in_background(d.run, d.stop), client(d) as c:
        first = await wait_for_token(c, "mds")
        for _ in range(20):
            assert (await c.get("/v1/token/mds")).json()["access_token"] == first["access_token"]
    assert first["access_token"].startswith("ya29.mds-") and upstreams.calls["metadata"] == 1


# ---- the emulator refuses wrong assertions ------------------------------------------------------


async def _post_assertion(upstreams: Upstreams, assertion: str) -> httpx.Response:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(upstreams.ca_file))) as c:
        return await c.post(
            f"{upstreams.authority}/{upstreams.tenant_id}/oauth2/v2.0/token",
            data={
                "client_id": CLIENT_ID,
                "scope": f"{APP_URI}/.default",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
                "grant_type": "client_credentials",
            },
        )


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("good", None),
        ("bad-signature", "AADSTS700027"),
        ("wrong-aud", "AADSTS700021"),
        ("long-exp", "AADSTS700024"),
        ("reused-jti", "AADSTS7000215"),
    ],
)
async def test_emulator_refuses_a_wrong_assertion(
    upstreams: Upstreams, rsa_svid: IssuedSvid, case: str, code: str | None
) -> None:
    upstreams.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
    token_url = f"{upstreams.authority}/{upstreams.tenant_id}/oauth2/v2.0/token"
    kwargs: dict[str, Any] = {
        "key": rsa_svid.key,
        "cert": rsa_svid.leaf,
        "client_id": CLIENT_ID,
        "token_url": token_url,
        "alg": "PS256",
        "now": dt.datetime.now(dt.UTC),
        "lifetime": 300,
    }
    if case == "bad-signature":
        kwargs["key"] = new_key("rsa2048")  # header still names the registered certificate
    if case == "wrong-aud":
        kwargs["token_url"] = "https://login.microsoftonline.com/other/oauth2/v2.0/token"
    if case == "long-exp":
        kwargs["lifetime"] = 3600
    if case == "reused-jti":
        kwargs["jti"] = "fixed-jti"
        assert (await _post_assertion(upstreams, build_assertion(**kwargs))).status_code == 200
    response = await _post_assertion(upstreams, build_assertion(**kwargs))
    if code is None:
        assert response.status_code == 200 and response.json()["token_type"] == "Bearer"
    else:
        assert response.status_code == 401
        assert response.json()["error_description"].startswith(code + ":")


async def test_sts_refuses_an_authorization_header_and_a_wrong_audience(upstreams: Upstreams) -> None:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(upstreams.ca_file))) as c:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "audience": AUDIENCE,
            "scope": "https://www.googleapis.com/auth/cloud-platform",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_token": "not-a-jwt",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        }
        with_auth = await c.post(upstreams.sts_url, data=form, headers={"Authorization": "Bearer x"})
        bad_token = await c.post(upstreams.sts_url, data=form)
        wrong_audience = await c.post(upstreams.sts_url, data=form | {"audience": "//iam.googleapis.com/nope"})
    assert with_auth.status_code == 400 and with_auth.json()["error"] == "invalid_request"
    assert bad_token.status_code == 400 and bad_token.json()["error"] == "invalid_grant"
    assert wrong_audience.json()["error"] == "invalid_target"


# ---- failures, backoff, skew, clock jumps ---------------------------------------------------------


@pytest.fixture
async def make_source() -> AsyncIterator[Any]:
    made: list[TokenSource] = []

    def make(config: dict[str, Any], files: FileSet) -> tuple[TokenSource, Any]:
        source, watcher = _source(config, files)
        made.append(source)
        return source, watcher

    yield make
    for source in made:
        await source.flow.aclose()


def _source(config: dict[str, Any], files: FileSet, clock: Any = None, **kwargs: Any) -> tuple[TokenSource, Any]:
    from wlidd.config import parse_identity_config
    from wlidd.svid.load.source import CredentialSource
    from wlidd.watch import CredentialWatcher

    watcher = CredentialWatcher(
        "default", CredentialSource("default", parse_identity_config(files.config().model_dump()))
    )
    token_config = parse_token_config(config)
    source = TokenSource(
        "gcp",
        token_config,
        Flow("gcp", token_config, lambda: watcher.current),
        watcher=watcher,
        rng=random.Random(3),
        **({"clock": clock} if clock else {}),
        **kwargs,
    )
    return source, watcher


async def test_sts_failing_for_a_while_serves_the_last_good_token_backs_off_and_recovers(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, make_source: Any
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    source, watcher = make_source(
        x509_token_config(upstreams, impersonate=None, backoff_min=0.05, backoff_max=1.0), files
    )
    await watcher.reload("start")
    good = await source.refresh("test")
    upstreams.inject("sts_mtls", Fault(status=503, count=3))
    delays = []
    for _ in range(3):
        before = source.clock()
        with pytest.raises(UpstreamError) as info:
            await source.refresh("test")
        assert info.value.status == 503 and info.value.retryable
        delays.append((source.next_refresh - before).total_seconds())  # type: ignore[operator]
        assert (await source.get()).value == good.value  # the last good token keeps being served
    assert source.failures == 3 and getattr(token_status(source, source.clock()).last_error, "status", None) == 503
    assert all(d >= 0.05 for d in delays) and source.backoff.attempts == 3
    recovered = await source.refresh("test")
    assert recovered.value != good.value and source.failures == 0 and source.backoff.attempts == 0


async def test_429_with_retry_after_is_honoured(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, make_source: Any
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    source, watcher = make_source(x509_token_config(upstreams, impersonate=None), files)
    await watcher.reload("start")
    upstreams.inject("sts_mtls", Fault(status=429, retry_after="7", count=1))
    now = source.clock()
    with pytest.raises(UpstreamError) as info:
        await source.refresh("test")
    assert info.value.status == 429 and info.value.retry_after == 7
    assert (source.next_refresh - now).total_seconds() >= 7  # type: ignore[operator]


async def test_token_within_the_skew_with_upstream_down_gives_503_never_the_old_token(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    wall = [dt.datetime.now(dt.UTC)]
    d = Daemon(daemon_config(tmp_path, files, {"mds": metadata_token_config(upstreams)}), clock=lambda: wall[0])
    async with in_background(d.run, d.stop), client(d) as c:
        first = await wait_for_token(c, "mds")
        upstreams.inject("metadata", Fault(status=503))
        expiry = d.tokens["mds"].current.expire_time  # type: ignore[union-attr]
        for jump in (dt.timedelta(seconds=-59), dt.timedelta(seconds=1), dt.timedelta(hours=5)):  # skew, past, far past
            wall[0] = expiry + jump
            d.tokens["mds"].failures = max(1, d.tokens["mds"].failures)  # upstream known to be down
            response = await c.get("/v1/token/mds")
            assert response.status_code == 503, jump
            assert first["access_token"] not in response.text
            assert response.json()["error"] == "token_unavailable"
            plain = await c.get("/get_wif_token")
            assert plain.status_code == 503 and first["access_token"] not in plain.text


async def test_svid_rotation_triggers_a_new_x509_token_from_the_new_certificate(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    first = ca.issue_svid("/ns/prod/sa/x509")
    files.put(first, ca.bundle_pem)
    d = Daemon(daemon_config(tmp_path, files, {"gcp": x509_token_config(upstreams)}))
    async with in_background(d.run, d.stop), client(d) as c:
        old = await wait_for_token(c, "gcp")
        second = ca.issue_svid("/ns/prod/sa/x509")
        files.put(second)
        with anyio.fail_after(10):
            while (await c.get("/v1/token/gcp")).json()["access_token"] == old["access_token"]:
                await anyio.sleep(0.02)
    assert upstreams.mtls_leaves == [first.leaf.serial_number, second.leaf.serial_number]


async def test_x509_token_never_outlives_its_certificate(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, make_source: Any
) -> None:
    svid = ca.issue_svid(ttl=dt.timedelta(minutes=20))  # the STS token would last an hour
    files.put(svid, ca.bundle_pem)
    source, watcher = make_source(x509_token_config(upstreams), files)
    await watcher.reload("start")
    token = await source.refresh("test")
    assert token.expire_time == svid.leaf.not_valid_after_utc


async def test_200_concurrent_requests_for_a_cold_token_make_exactly_one_upstream_call(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    upstreams.inject("metadata", Fault(error_rate=0.0, latency=0.3))  # slow enough for all callers to pile up
    tokens = {"mds": metadata_token_config(upstreams, on_demand=True)}
    d = Daemon(daemon_config(tmp_path, files, tokens, max_connections_per_caller=256))  # 200 from one uid
    async with in_background(d.run, d.stop), client(d) as c:
        responses = []

        async def one() -> None:
            responses.append(await c.get("/v1/token/mds"))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
    assert len(responses) == 200 and {r.status_code for r in responses} == {200}
    assert len({r.json()["access_token"] for r in responses}) == 1
    assert upstreams.calls["metadata"] == 1


async def test_on_demand_token_is_not_fetched_until_asked(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(daemon_config(tmp_path, files, {"mds": metadata_token_config(upstreams, on_demand=True)}))
    async with in_background(d.run, d.stop), client(d) as c:
        # Serving, and no fetch made or planned (the refresh loop of an idle on-demand source only naps:
        # test_on_demand_source_stops_refreshing_when_idle watches it do so).
        status = (await c.get("/v1/status")).json()["tokens"]["mds"]
        assert (status["upstream_calls"], status["next_refresh"]) == (0, None)
        assert upstreams.calls["metadata"] == 0
        assert (await c.get("/v1/token/mds")).status_code == 200
    assert upstreams.calls["metadata"] == 1


async def test_require_at_start_fails_start_when_the_token_cannot_be_had(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    from wlidd.errors import WlidError

    files.put(ca.issue_svid(), ca.bundle_pem)
    upstreams.inject("metadata", Fault(status=500))
    config = daemon_config(
        tmp_path, files, {"mds": metadata_token_config(upstreams, require_at_start=True, require_timeout=0.5)}
    )
    d = Daemon(config)
    with pytest.raises(BaseException) as info:
        await d.run()
    errors = info.value.exceptions if isinstance(info.value, BaseExceptionGroup) else [info.value]
    assert any(isinstance(e, WlidError) and "could not be obtained within 0.5s" in str(e) for e in errors)


async def test_upstream_error_bodies_become_typed_errors(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, rsa_svid: IssuedSvid, make_source: Any
) -> None:
    files.put(rsa_svid, ca.bundle_pem)  # app not registered: Entra refuses with AADSTS700016
    source, watcher = make_source(entra_token_config(upstreams), files)
    await watcher.reload("start")
    with pytest.raises(UpstreamError) as entra:
        await source.refresh("test")
    assert entra.value.kind == "entra" and entra.value.code == "AADSTS700016" and entra.value.status == 400
    assert entra.value.reason == "entra_aadsts700016" and not entra.value.retryable
    upstreams.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
    upstreams.service_accounts.clear()
    with pytest.raises(UpstreamError) as iam:
        await source.refresh("test")
    assert iam.value.kind == "iam" and iam.value.code == "PERMISSION_DENIED" and iam.value.status == 403


async def test_token_sink_is_written_atomically_with_its_mode_and_runs_on_change(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    marker = tmp_path / "changed"
    sinks = [
        {"path": str(tmp_path / "out" / "gcp.token")},
        {
            "path": str(tmp_path / "out" / "gcp.json"),
            "format": "json",
            "mode": "0640",
            "on_change": ["/usr/bin/touch", str(marker)],
        },
    ]
    d = Daemon(daemon_config(tmp_path, files, {"mds": metadata_token_config(upstreams, sinks=sinks)}))
    async with in_background(d.run, d.stop), client(d) as c:
        document = await wait_for_token(c, "mds")
        await wait_until(marker.exists, 5, "the on_change hook ran")
    text = tmp_path / "out" / "gcp.token"
    assert text.read_text() == document["access_token"]
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o600
    as_json = json.loads((tmp_path / "out" / "gcp.json").read_text())
    assert as_json["access_token"] == document["access_token"] and as_json["token_type"] == "Bearer"
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "gcp.json").st_mode) == 0o640
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


async def test_no_secret_in_any_log_line(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, rsa_svid: IssuedSvid
) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    try:
        files.put(rsa_svid, ca.bundle_pem)
        upstreams.register_app(CLIENT_ID, APP_URI, rsa_svid.leaf)
        upstreams.inject("iam", Fault(status=503, count=1))
        d = Daemon(
            daemon_config(
                tmp_path, files, {"gcp": entra_token_config(upstreams), "mds": metadata_token_config(upstreams)}
            )
        )
        async with in_background(d.run, d.stop), client(d) as c:
            await wait_for_token(c, "gcp")
            await wait_for_token(c, "mds")
    finally:
        configure_logging("info", "console")
        reset_logging()
    logs = out.getvalue()
    assert "token refreshed" in logs and "token refresh failed" in logs
    for secret in upstreams.issued:
        assert secret not in logs
    assert "eyJ" not in logs  # no JWT (assertion or Entra token)
    assert "PRIVATE KEY" not in logs
    assert TD in logs  # the logs did capture the daemon's lines


async def test_cli_token_prints_the_token_for_scripts(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    import sys

    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(daemon_config(tmp_path, files, {"mds": metadata_token_config(upstreams)}))
    async with in_background(d.run, d.stop), client(d) as c:
        document = await wait_for_token(c, "mds")
        result = await anyio.run_process(
            [sys.executable, "-m", "wlidd", "token", "mds", "--socket", str(d.socket_path)]
        )
        missing = await anyio.run_process(
            [sys.executable, "-m", "wlidd", "token", "nope", "--socket", str(d.socket_path)], check=False
        )
    assert result.stdout.decode() == document["access_token"] + "\n"
    assert missing.returncode == 1 and b"no token named 'nope'" in missing.stderr


async def test_min_interval_spaces_upstream_calls(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    ticks = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        ticks[0] += seconds

    config = parse_token_config(metadata_token_config(upstreams, min_interval=5))
    source = TokenSource("mds", config, Flow("mds", config), monotonic=lambda: ticks[0], sleep=fake_sleep)
    try:
        await source.refresh("one")
        ticks[0] += 2  # two seconds later someone asks again
        await source.refresh("two")
    finally:
        await source.flow.aclose()
    assert slept == [3.0] and upstreams.calls["metadata"] == 2


async def test_on_demand_source_stops_refreshing_when_idle(files: FileSet, upstreams: Upstreams) -> None:
    ticks = [0.0]
    naps: list[float] = []  # the monotonic time at each nap of the refresh loop

    async def nap(seconds: float) -> None:
        naps.append(ticks[0])
        await anyio.sleep(seconds)

    config = parse_token_config(metadata_token_config(upstreams, on_demand=True, idle=60))
    source = TokenSource("mds", config, Flow("mds", config), monotonic=lambda: ticks[0], sleep=nap)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run)
            await wait_until(lambda: naps, 5, "the first nap of the loop")
            assert upstreams.calls["metadata"] == 0  # not fetched until asked
            await source.get()  # first request: fetched on demand
            assert upstreams.calls["metadata"] == 1
            ticks[0] = 61.0  # no request for longer than `idle`
            source.trigger("test")  # even a due refresh is skipped while idle
            # Every nap that starts from here on starts after the trigger: the loop took it, and fetched (it
            # must not) or not before it slept again.
            await wait_until(lambda: 61.0 in naps, 5, "the loop went back to sleep after the trigger")
            assert upstreams.calls["metadata"] == 1
            await source.get()  # still valid: served from memory, and marks the source active again
            source.trigger("test")
            await wait_until(lambda: upstreams.calls["metadata"] >= 2, 5, "the refresh of an active source")
            tg.cancel_scope.cancel()
    finally:
        await source.flow.aclose()


async def test_an_upstream_that_hangs_becomes_a_timeout_error(files: FileSet, upstreams: Upstreams) -> None:
    config = parse_token_config(metadata_token_config(upstreams, timeout=0.3))
    source = TokenSource("mds", config, Flow("mds", config))
    upstreams.inject("metadata", Fault(hang=True, count=1))
    try:
        with pytest.raises(UpstreamError) as info:
            await source.refresh("test")
    finally:
        await source.flow.aclose()
    assert info.value.reason == "metadata_timeout" and info.value.retryable
    assert "did not answer in time" in info.value.message


def test_token_repr_never_shows_the_value() -> None:
    from wlidd.tokens.model import Token

    now = dt.datetime.now(dt.UTC)
    token = Token("ya29.super-secret", now + dt.timedelta(hours=1), now, "gcp")
    assert "super-secret" not in repr(token) and "super-secret" not in str(token)


async def test_id_tokens_come_from_generate_id_token_over_the_impersonation_and_are_cached(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, make_source: Any
) -> None:
    import jwt

    files.put(ca.issue_svid(), ca.bundle_pem)
    source, watcher = make_source(x509_token_config(upstreams), files)
    await watcher.reload("start")
    first = await source.id_token("https://service.example.com")
    again = await source.id_token("https://service.example.com")
    other = await source.id_token("https://other.example.com")
    claims = jwt.decode(first, options={"verify_signature": False})
    assert claims["aud"] == "https://service.example.com" and claims["email"] == SA
    assert again == first and other != first
    # one exchange (with its generateAccessToken, which also renews the federated token), two generateIdToken calls
    assert upstreams.calls["sts_mtls"] == 1 and upstreams.calls["iam"] == 3


async def test_id_tokens_without_impersonation_are_refused_clearly(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, make_source: Any
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    source, watcher = make_source(x509_token_config(upstreams, impersonate=None), files)
    await watcher.reload("start")
    with pytest.raises(UpstreamError) as info:
        await source.id_token("https://service.example.com")
    assert info.value.reason == "wlidd_id_token_unsupported" and not info.value.retryable


async def test_a_graceful_stop_lets_the_request_in_flight_finish(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    upstreams.inject("metadata", Fault(error_rate=0.0, latency=0.8))  # the cold fetch takes a while
    d = Daemon(daemon_config(tmp_path, files, {"mds": metadata_token_config(upstreams, on_demand=True)}))
    results: list[httpx.Response] = []
    async with client(d) as c, anyio.create_task_group() as tg:
        await tg.start(d.run)

        async def ask() -> None:
            results.append(await c.get("/v1/token/mds"))

        tg.start_soon(ask)
        await wait_until(lambda: upstreams.calls["metadata"] == 1, what="the request reached the upstream")
        d.stop()  # the request is in flight: the upstream answers in 0.8 s
    assert len(results) == 1 and results[0].status_code == 200
    assert results[0].json()["access_token"].startswith("ya29.mds-")
    assert results[0].headers["connection"] == "close"  # stopping: no keep-alive


async def test_a_reload_adds_changes_and_removes_token_sources_while_serving(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    import tomllib

    files.put(ca.issue_svid(), ca.bundle_pem)
    path = tmp_path / "wlidd.toml"

    def write(tokens: dict[str, Any]) -> None:
        lines = [f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n']
        for name, values in tokens.items():
            lines.append(f"[tokens.{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
            lines += [
                f"{k}.{kk} = {json.dumps(vv)}" for k, v in values.items() if isinstance(v, dict) for kk, vv in v.items()
            ]
        path.write_text("\n".join(lines) + "\n")
        tomllib.loads(path.read_text())

    write({"a": metadata_token_config(upstreams), "b": metadata_token_config(upstreams)})
    from wlidd.config import load_config

    d = Daemon(load_config(path, {}), config_path=path, environ={})
    async with in_background(d.run, d.stop), client(d) as c:
        await wait_for_token(c, "a")
        await wait_for_token(c, "b")
        old_b = d.tokens["b"]
        write(
            {
                "a": metadata_token_config(upstreams),
                "b": metadata_token_config(upstreams, skew=30),
                "c": metadata_token_config(upstreams),
            }
        )
        await d.reload()
        assert d.tokens["b"] is not old_b and d.tokens["b"].config.skew == 30  # changed: restarted
        assert (await wait_for_token(c, "c"))["access_token"].startswith("ya29.mds-")  # added
        write({"a": metadata_token_config(upstreams)})
        await d.reload()
        gone = await c.get("/v1/token/c")
        assert gone.status_code == 404 and "b" not in d.tokens  # removed
        assert (await c.get("/v1/token/a")).status_code == 200  # untouched, still served
