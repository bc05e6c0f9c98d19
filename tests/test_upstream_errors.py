"""Upstream errors (issue 15 items 10 and 11): permanent errors back off to the maximum at once and say
so; transient ones back off as before; reasons are `<upstream>_<code>` from a fixed set per upstream,
whatever the upstream sends."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_SCALE, X509_AUDIENCE
from tests.test_id_token_guards import Wall
from tests.test_id_token_guards import build as build
from tests.test_tokens import (
    entra_token_config,
    metadata_token_config,
    x509_token_config,
)
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.errors import UpstreamError
from wlidd.logs import configure_logging, reset_logging
from wlidd.metrics import Metrics
from wlidd.status_report import token_status
from wlidd.tokens.manager import TokenSource
from wlidd.tokens.providers.entra import build_assertion
from wlidd.tokens.providers.http import error_from_response, request_json

KINDS = ("entra", "sts", "iam", "metadata")
REASON = re.compile(r"^[a-z0-9_]{1,48}$")


def _response(status: int, body: Any = None, *, raw: bytes | None = None) -> httpx.Response:
    request = httpx.Request("POST", "https://upstream.invalid/token")
    if raw is not None:
        return httpx.Response(status, content=raw, request=request)
    return httpx.Response(status, json=body, request=request)


# ---- item 10: permanent or transient ------------------------------------------------------------


def _google(status: int, name: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": "m", "status": name}}


# (status, body, transient): 408, 425, 429, 5xx are transient; any other 4xx (or 3xx) permanent unless the
# upstream's code says it is overloaded or failing.
CLASSES: list[tuple[int, dict[str, Any] | None, bool]] = [
    (400, {"error": "invalid_grant", "error_description": "subject token expired"}, False),
    (400, {"error": "invalid_target"}, False),
    (400, {"error": "temporarily_unavailable"}, True),  # the code says transient
    (400, {"error": "invalid_client", "error_description": "AADSTS90033: A transient error."}, True),
    (401, _google(401, "UNAUTHENTICATED"), False),
    (403, _google(403, "PERMISSION_DENIED"), False),
    (403, _google(403, "RESOURCE_EXHAUSTED"), True),  # quota, sent as 403 by some Google APIs
    (404, None, False),
    (409, _google(409, "ABORTED"), True),
    (302, None, False),
    (408, None, True),
    (429, _google(429, "RESOURCE_EXHAUSTED"), True),
    (500, _google(500, "INTERNAL"), True),
    (501, _google(501, "UNIMPLEMENTED"), True),  # every 5xx is transient
    (503, {"error": "invalid_grant"}, True),
    (507, None, True),
]


async def test_http_status_and_upstream_code_decide_permanent_or_transient() -> None:
    wrong: list[tuple[int, object, bool]] = []
    for status, body, transient in CLASSES:
        error = error_from_response("sts", _response(status, body) if body else _response(status, raw=b""))
        if error.retryable is not transient:
            wrong.append((status, body, error.retryable))
    for raised in (httpx.ConnectError("refused"), httpx.ReadTimeout("slow")):  # no answer at all: transient

        def handler(request: httpx.Request, raised: Exception = raised) -> httpx.Response:
            raise raised

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            with pytest.raises(UpstreamError) as info:
                await request_json(client, "sts", "POST", "https://sts.invalid/v1/token")
        if not info.value.retryable:
            wrong.append((0, type(raised).__name__, False))
    assert wrong == []


async def test_wlidd_side_refusals_are_permanent_and_a_metadata_url_that_is_no_metadata_server_too() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from wlidd.emulator.ca import CertificateAuthority as CA
    from wlidd.tokens.providers.metadata import fetch_metadata_token

    svid = CA("example.org").issue_svid()
    with pytest.raises(UpstreamError) as not_rsa:
        build_assertion(
            key=ec.generate_private_key(ec.SECP256R1()),
            cert=svid.leaf,
            client_id="c",
            token_url="https://login.invalid/t",
            alg="PS256",
            now=svid.leaf.not_valid_before_utc,
            lifetime=300,
        )
    assert not_rsa.value.reason == "entra_key_not_rsa" and not_rsa.value.permanent

    def not_metadata(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"access_token": "x", "expires_in": 3600})  # no Metadata-Flavor

    async with httpx.AsyncClient(transport=httpx.MockTransport(not_metadata)) as client:
        with pytest.raises(UpstreamError) as info:
            await fetch_metadata_token(client, "http://169.254.169.254")
    assert info.value.reason == "metadata_not_metadata" and info.value.permanent


def _permanent_trigger(case: str, upstreams: Upstreams) -> dict[str, Any]:
    """A config (and emulator state) whose refresh fails permanently with the reason `case`."""
    if case == "iam_permission_denied":
        upstreams.service_accounts.clear()
        return x509_token_config(upstreams)
    if case == "sts_invalid_target":
        return x509_token_config(upstreams, sts={"url": upstreams.sts_mtls_url, "audience": X509_AUDIENCE + "-gone"})
    return entra_token_config(upstreams)  # entra_key_not_rsa: the identity's key is EC


@pytest.mark.parametrize("case", ["iam_permission_denied", "sts_invalid_target", "entra_key_not_rsa"])
async def test_a_permanent_error_backs_off_to_the_maximum_at_once_and_status_and_log_say_permanent(
    case: str, upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        wall = Wall()
        source: TokenSource = await build(
            _permanent_trigger(case, upstreams) | {"backoff_min": 1, "backoff_max": 300}, wall
        )
        with pytest.raises(UpstreamError):
            await source.refresh("test")
    finally:
        configure_logging("info", "console")
        reset_logging()
    assert (source.next_refresh - wall.now).total_seconds() == 300  # type: ignore[operator]
    last_error = token_status(source, wall.now).last_error
    assert last_error is not None and last_error.reason == case and last_error.permanent is True
    assert "last error (permanent)" in source.not_servable_reason(wall.now)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if "token refresh failed" in line]
    assert len(lines) == 1 and lines[0]["permanent"] is True and lines[0]["reason"] == case


async def test_a_transient_error_backs_off_exponentially_from_the_minimum_and_status_says_not_permanent(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    wall = Wall()
    source: TokenSource = await build(
        x509_token_config(upstreams, impersonate=None, backoff_min=1, backoff_max=300), wall
    )
    upstreams.inject("sts_mtls", Fault(status=503))
    delays = []
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await source.refresh("test")
        delays.append((source.next_refresh - wall.now).total_seconds())  # type: ignore[operator]
        assert getattr(token_status(source, wall.now).last_error, "permanent", None) is False
    assert delays[0] == 1 and 1 <= delays[1] <= 2 and 1 <= delays[2] <= 4
    assert "(permanent)" not in source.not_servable_reason(wall.now)


# ---- item 11: reasons from a fixed set -----------------------------------------------------------

# What upstreams (and things that pretend to be one) have been seen to answer, and worse.
BODIES: list[tuple[str, Any]] = [
    ("oauth, text with a space", {"error": "rate limited"}),
    ("oauth, known", {"error": "invalid_grant", "error_description": "expired"}),
    ("oauth, upper case", {"error": "INVALID_GRANT"}),
    ("oauth, punctuation", {"error": "Invalid Grant!! <script>alert(1)</script>"}),
    ("oauth, unicode", {"error": "ünïcödé_érrör", "error_description": "x"}),
    ("oauth, long", {"error": "e" * 10_000}),
    ("oauth, newline", {"error": "bad\nrequest\r\nX-Injected: 1"}),
    ("oauth, empty", {"error": ""}),
    ("oauth, number", {"error": 42}),
    ("aadsts known", {"error": "invalid_client", "error_description": "AADSTS700027: Client assertion failed."}),
    ("aadsts unknown", {"error": "invalid_client", "error_description": "AADSTS99999999: something new."}),
    ("google, known", _google(403, "PERMISSION_DENIED")),
    ("google, status with a space", _google(403, "PERMISSION DENIED (custom)")),
    ("google, numeric only", {"error": {"code": 418}}),
    ("google, status is an object", {"error": {"code": 500, "status": {"nested": ["x"]}}}),
    ("google, status is a number", {"error": {"status": 503}}),
    ("google, empty", {"error": {}}),
    ("json array", ["error", "rate limited"]),
    ("json null", None),
    ("plain text", b"rate limited, try again later"),
    ("html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    ("binary", bytes(range(256))),
    ("empty", b""),
]
STATUSES = (400, 401, 403, 404, 418, 429, 500, 503, 599, 302)


def _any_response(status: int, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return _response(status, raw=body)
    return _response(status, raw=json.dumps(body).encode())


@pytest.mark.parametrize("kind", KINDS)
def test_every_error_body_gives_a_reason_from_the_upstreams_fixed_set(kind: str) -> None:
    from wlidd.errors import upstream_reasons

    allowed = upstream_reasons(kind)
    seen = set()
    for name, body in BODIES:
        for status in STATUSES:
            reason = error_from_response(kind, _any_response(status, body)).reason
            assert REASON.match(reason) and reason.startswith(f"{kind}_"), (name, status, reason)
            assert reason in allowed, (name, status, reason)
            seen.add(reason)
    assert f"{kind}_other" in seen and len(allowed) < 200


NAMED: list[tuple[str, int, Any, str]] = [
    ("metadata", 429, {"error": "rate limited"}, "metadata_other"),
    ("sts", 400, {"error": "INVALID_GRANT"}, "sts_invalid_grant"),
    ("sts", 400, {"error": "Invalid Grant!! <script>"}, "sts_other"),
    ("entra", 401, {"error": "invalid_client", "error_description": "AADSTS700027: x"}, "entra_aadsts700027"),
    ("entra", 400, {"error": "invalid_client", "error_description": "AADSTS99999999: x"}, "entra_other"),
    ("iam", 403, _google(403, "PERMISSION_DENIED"), "iam_permission_denied"),
    ("iam", 403, _google(403, "PERMISSION DENIED (custom)"), "iam_other"),
    ("iam", 429, {"error": {"code": 429}}, "iam_http_429"),
    ("iam", 418, {"error": {"code": 418}}, "iam_http_4xx"),
    ("iam", 500, {"error": {"code": 500, "status": {"nested": 1}}}, "iam_other"),
    ("metadata", 599, b"", "metadata_http_5xx"),
]


def test_known_codes_keep_their_name_and_unknown_ones_become_other() -> None:
    got = [
        (kind, status, error_from_response(kind, _any_response(status, body)).reason) for kind, status, body, _ in NAMED
    ]
    assert got == [(kind, status, reason) for kind, status, _, reason in NAMED]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda e, d: json.dumps({"error": e, "error_description": d}).encode(), _json, _json),
    st.builds(lambda s, c: json.dumps({"error": {"status": s, "code": c}}).encode(), _json, _json),
    st.builds(lambda t: json.dumps({"error": "x", "error_description": f"AADSTS{t}: y"}).encode(), st.text()),
)


@settings(max_examples=300 * FUZZ_SCALE, deadline=None)
@given(kind=st.sampled_from(KINDS), status=st.integers(300, 599), body=_bodies)
def test_any_answer_from_any_upstream_gives_a_reason_from_its_fixed_set(kind: str, status: int, body: bytes) -> None:
    from wlidd.errors import upstream_reasons

    reason = error_from_response(kind, _response(status, raw=body)).reason
    assert REASON.match(reason) and reason in upstream_reasons(kind)


@pytest.mark.parametrize("expires_in", [b"NaN", b"Infinity", b"1e400", b"1e12", b'"NaN"', b'"Infinity"'])
async def test_nan_infinite_or_absurd_expires_in_from_the_metadata_server_is_metadata_bad_response(
    expires_in: bytes, upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = b'{"access_token": "ya29.fake", "token_type": "Bearer", "expires_in": ' + expires_in + b"}"
        return httpx.Response(200, content=body, headers={"metadata-flavor": "Google"})

    source: TokenSource = await build(metadata_token_config(upstreams), Wall(), metrics=Metrics())
    source.flow._plain = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    with pytest.raises(UpstreamError) as info:
        await source.refresh("test")
    assert info.value.reason == "metadata_bad_response" and info.value.retryable
    assert getattr(token_status(source, source.clock()).last_error, "reason", None) == "metadata_bad_response"


@pytest.mark.parametrize("expires_in", [float("nan"), float("inf"), 1e12])
async def test_nan_infinite_or_absurd_expires_in_from_sts_over_real_sockets_is_sts_bad_response(
    expires_in: float, upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    answer = {"access_token": "ya29.fake", "token_type": "Bearer", "expires_in": expires_in}
    upstreams.inject("sts_mtls", Fault(status=200, body=answer))
    source: TokenSource = await build(x509_token_config(upstreams), Wall())
    with pytest.raises(UpstreamError) as info:
        await source.refresh("test")
    assert info.value.reason == "sts_bad_response"


async def test_failure_metric_labels_stay_within_each_upstreams_fixed_set_over_real_sockets(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    from wlidd.errors import upstream_reasons

    metrics = Metrics()
    metadata = await build(metadata_token_config(upstreams), Wall(), metrics=metrics)
    x509 = await build(x509_token_config(upstreams), Wall(), metrics=metrics)
    faults = [
        (metadata, "metadata", Fault(status=429, body={"error": "rate limited"}, count=1)),
        (metadata, "metadata", Fault(status=503, body={"error": {"status": "Back-end Error\n"}}, count=1)),
        (x509, "sts_mtls", Fault(status=400, body={"error": "Invalid Grant!! <script>"}, count=1)),
        (x509, "iam", Fault(status=403, body=_google(403, "PERMISSION DENIED (custom)"), count=1)),
        (x509, "iam", Fault(status=418, body={"error": {"code": 418, "message": "teapot"}}, count=1)),
    ]
    for source, endpoint, fault in faults:
        upstreams.inject(endpoint, fault)
        with pytest.raises(UpstreamError):
            await source.refresh("test")
        source.failures = 0  # let the next refresh go at once
    labels = {
        sample.labels["reason"]
        for family in metrics.registry.collect()
        if family.name == "wlidd_token_failures"
        for sample in family.samples
        if sample.name == "wlidd_token_failures_total"
    }
    assert labels == {"metadata_other", "sts_other", "iam_other", "iam_http_4xx"}
    assert labels <= upstream_reasons("metadata") | upstream_reasons("sts") | upstream_reasons("iam")


async def test_wlidds_own_failures_are_wlidd_reasons_never_a_flow_name(
    upstreams: Upstreams, build: Callable[..., Any]
) -> None:
    source: TokenSource = await build(x509_token_config(upstreams, impersonate=None), Wall())
    with pytest.raises(UpstreamError) as unsupported:
        await source.id_token("https://service.example.com")
    assert unsupported.value.reason == "wlidd_id_token_unsupported" and unsupported.value.permanent

    async def broken(now: Any) -> Any:
        raise RuntimeError("a bug")

    source.flow.fetch = broken  # type: ignore[method-assign]
    with pytest.raises(UpstreamError) as internal:
        await source.refresh("test")
    assert internal.value.reason == "wlidd_internal" and "RuntimeError" in internal.value.message
