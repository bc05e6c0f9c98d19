"""The request metrics' route label is the template of the route that answered (wlidd.api.messages.Router),
taken from the match that dispatched the request, never from the path: a label is always a template of
the route table, or "other"."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import FileSet, in_background
from wlidd.api.messages import Request, Response, Router
from wlidd.api.mtls import MtlsGate
from wlidd.api.peers import Peer
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority


def request(path: str, method: str = "GET") -> Request:
    return Request(method, path, {}, (), b"", Peer(), "unix")


def daemon(tmp_path: Path, files: FileSet) -> Daemon:
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}, "metrics": {"address": "127.0.0.1:0"}},
        }
    )
    return Daemon(config)


def instance(template: str) -> str:
    """A path the template matches: each {name} filled in."""
    return re.sub(r"\{\w+\}", "default", template)


JUNK = [
    "/",
    "/v1",
    "/v1/token",
    "/v1/token/",
    "/v1/token/a/b",
    "/v1/status/",
    "/v1/status\n",
    "/metrics.txt",
    "//v1/status",
]


def test_each_route_of_the_table_is_labelled_by_its_own_template_and_anything_else_other(
    tmp_path: Path, files: FileSet
) -> None:
    d = daemon(tmp_path, files)
    assert d.api.router.templates == {
        "/v1/status",
        "/v1/health",
        "/v1/live",
        "/v1/identity/{name}",
        "/v1/credentials/{name}",
        "/v1/ready/{name}",
        "/v1/token/{name}",
        "/get_wif_token",
        "/metrics",
    }
    for template in d.api.router.templates:
        assert d.api.route(request(instance(template)))[0] == template
        assert d.api.route(request(instance(template), "POST"))[0] == template  # a 405 is the route's too
    for path in JUNK:
        assert d.api.route(request(path))[0] == "other", path
    assert d.listeners.metrics_server is not None
    metrics_routes = d.listeners.metrics_server.handler
    assert metrics_routes.router.templates == {"/metrics", "/v1/health", "/v1/live"}  # type: ignore[attr-defined]
    assert metrics_routes.route(request("/v1/status"))[0] == "other"  # type: ignore[attr-defined]


def test_the_mtls_gate_labels_by_the_wrapped_api_s_route(tmp_path: Path, files: FileSet) -> None:
    d = daemon(tmp_path, files)
    gate = MtlsGate(d.api, d.watchers["default"], ())
    assert gate.route(request("/v1/token/x"))[0] == "/v1/token/{name}"
    assert gate.route(request("/v1/token/x/y"))[0] == "other"


async def test_a_template_is_matched_whole_with_one_segment_per_name() -> None:
    async def answer(_request: Request, params: dict[str, str]) -> Response:
        return Response.json(200, params)

    router = Router([("/a.b/{name}", answer), ("/x/{first}/y/{second}", answer)])
    found = router.match("/a.b/c")
    assert found is not None and found[0] == "/a.b/{name}" and found[2] == {"name": "c"}
    assert router.match("/aXb/c") is None  # the dot is literal
    assert router.match("/a.b/c/d") is None and router.match("/a.b/") is None
    found = router.match("/x/1/y/2")
    assert found is not None and found[2] == {"first": "1", "second": "2"}


@pytest.mark.parametrize("listener", ["unix", "metrics"])
async def test_every_request_metric_label_is_a_template_of_the_route_table(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, listener: str
) -> None:
    """Requests to every route (answered 200, 404, 405 or 503 — errors raised inside a route included) and
    to junk paths: the `route` labels of wlidd_http_requests_total are exactly the templates asked plus
    "other"."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = daemon(tmp_path, files)
    async with in_background(d.run, d.stop):
        if listener == "unix":
            client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path)), base_url="http://w")
            router = d.api.router
        else:
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metrics_port}")
            router = d.listeners.metrics_server.handler.router  # type: ignore[union-attr]
        async with client as c:
            for template in router.templates:
                await c.get(instance(template))
                await c.post(instance(template))
                await c.get(template.replace("{name}", "unknown-name"))
            for path in JUNK:
                await c.get(path.replace("\n", "%0A"))
            exposition = (await c.get("/metrics")).text if listener == "metrics" else ""
        if not exposition:
            exposition = d.metrics.exposition().decode()
    labels = set(re.findall(rf'wlidd_http_requests_total\{{listener="{listener}",route="([^"]*)"', exposition))
    assert labels == set(router.templates) | {"other"}, labels
