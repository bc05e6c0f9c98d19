"""The hot path: a cached token asked again is answered at once (wlidd.api.routes.Api.answer_now, from the
event loop's callback: wlidd.api.connection), with the answer, the metric and the audit trail the route
gives; and a route table remembers the matches of the paths it was asked (bounded).

The stream and request-loop side (which requests are answered from the callback, which go to the
connection's task) is checked in test_protocol_stream.py; bench/token_serve.py measures the speed (no test
here asserts on it)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from tests.conftest import FileSet, in_background
from tests.test_tokens import client, metadata_token_config, wait_for_token
from wlidd.api.messages import MATCH_CACHE_ENTRIES, MATCH_CACHE_PATH, Request, Response, Router
from wlidd.api.peers import Peer
from wlidd.api.routes import TOKEN_ROUTE, Api
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.logs import configure_logging, reset_logging

TOKEN_ANSWERS = {"listener": "unix", "route": TOKEN_ROUTE, "status": "200"}


async def test_a_cached_token_asked_again_is_answered_at_once_with_the_routes_answer_metric_and_audit(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 more GETs of a token already handed out, on the client's keep-alive connection: none goes through
    the async route (Api.token); each gets the token the route gave, is counted under the route's label,
    and counts as a request for the source (its idle clock); the audit trail keeps its one line. Then the
    same request answered both ways gives the same Response."""
    routed: list[Request] = []
    route = Api.token

    async def counted(self: Api, request: Request, params: dict[str, str]) -> Response:
        routed.append(request)
        return await route(self, request, params)

    monkeypatch.setattr(Api, "token", counted)
    files.put(ca.issue_svid(), ca.bundle_pem)
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"mds": metadata_token_config(upstreams)},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    try:
        async with in_background(d.run, d.stop), client(d) as c:
            first = await wait_for_token(c, "mds")
            by_route = len(routed)
            counted_before = d.metrics.registry.get_sample_value("wlidd_http_requests_total", TOKEN_ANSWERS)
            asked_before = d.tokens["mds"].last_request
            answers = [await c.get("/v1/token/mds") for _ in range(20)]
            assert len(routed) == by_route, "answered at once, not by the route"
            assert [a.json()["access_token"] for a in answers] == [first["access_token"]] * 20
            assert {a.headers["content-type"] for a in answers} == {"application/json"}
            counted_after = d.metrics.registry.get_sample_value("wlidd_http_requests_total", TOKEN_ANSWERS)
            assert counted_before is not None and counted_after == counted_before + 20
            assert asked_before is not None and (d.tokens["mds"].last_request or 0) > asked_before

            request = routed[-1]  # a request of this client, as the server read it
            now = d.api.clock()
            d.api.clock = lambda: now  # one second of expires_in for both answers
            at_once = d.api.answer_now(request)
            assert at_once is not None and at_once[0] == TOKEN_ROUTE
            assert at_once[1] == await route(d.api, request, {"name": "mds"})
    finally:
        reset_logging()
    handed = [json.loads(line) for line in stream.getvalue().splitlines() if '"token handed out"' in line]
    assert len(handed) == 1 and handed[0]["expire_time"] == first["expire_time"]


async def test_a_token_not_configured_another_route_or_a_head_is_left_to_the_route(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """answer_now answers only a GET of a token it holds for a caller it knows: a token not configured,
    another route, a HEAD, a caller not yet resolved are left to the route (which answers them as before)."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {"identities": {"default": files.config()}, "listeners": {"unix": {"path": str(tmp_path / "w.sock")}}}
    )
    api = Daemon(config).api
    request = Request("GET", "/v1/token/mds", {}, (), b"", Peer(uid=0, gid=0, pid=1, groups=frozenset({0})), "unix")
    for method, path in (("GET", "/v1/token/mds"), ("GET", "/v1/health"), ("HEAD", "/v1/token/mds")):
        assert api.answer_now(dataclasses.replace(request, method=method, path=path)) is None


async def _endpoint(request: Request, params: dict[str, str]) -> Response:
    return Response.text(200, params.get("name", ""))


def test_a_route_table_remembers_matches_bounded_and_hands_each_its_own_parameters() -> None:
    """The matches of paths asked before are kept, at most MATCH_CACHE_ENTRIES of them and none of a path
    longer than MATCH_CACHE_PATH (a client cycling through random paths grows nothing); each match's
    parameters are its own (changing them changes no later match)."""
    router = Router([("/v1/token/{name}", _endpoint), ("/v1/health", _endpoint)])
    found = router.match("/v1/token/a")
    assert found is not None
    found[2]["name"] = "changed"
    assert router.match("/v1/token/a") == ("/v1/token/{name}", _endpoint, {"name": "a"})
    for i in range(3 * MATCH_CACHE_ENTRIES):
        assert router.match(f"/v1/token/t{i}") is not None
        assert router.match(f"/nothing/{i}") is None
    assert router.match("/v1/token/" + "x" * MATCH_CACHE_PATH) is not None
    assert 0 < len(router._matched) <= MATCH_CACHE_ENTRIES
    assert all(len(path) <= MATCH_CACHE_PATH for path in router._matched)
