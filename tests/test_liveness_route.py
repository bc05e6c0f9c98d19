"""GET /v1/live: the liveness a Kubernetes livenessProbe asks, on the metrics listener and the Unix socket.

It says what the systemd watchdog decides (wlidd.health.Health.liveness_problems): 503 naming every listener
whose accept loop died, 200 otherwise — also while the daemon is degraded (credentials not provisioned),
which /v1/health reports and no restart fixes. A wedged event loop answers nothing, as it sends no
WATCHDOG=1: the probe's timeout is its failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FileSet, in_background, kill_accept_loop
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority


def config(tmp_path: Path, files: FileSet) -> Config:
    """One identity from `files`, the Unix socket and a metrics listener on a free loopback port."""
    return Config.model_validate(
        {
            "identities": {"default": files.config()},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}, "metrics": {"address": "127.0.0.1:0"}},
        }
    )


@contextlib.asynccontextmanager
async def clients(d: Daemon) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(the metrics listener's client, the Unix socket's client)."""
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metrics_port}") as metrics,
        httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path)), base_url="http://w") as unix,
    ):
        yield metrics, unix


async def test_live_is_200_on_the_metrics_listener_and_the_unix_socket_when_every_accept_loop_runs(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(tmp_path, files))
    async with in_background(d.run, d.stop), clients(d) as (metrics, unix):
        for client in (metrics, unix):
            response = await client.get("/v1/live")
            assert (response.status_code, response.json()) == (200, {"status": "ok"})
            head = await client.head("/v1/live")
            assert head.status_code == 200 and head.content == b""


async def test_live_is_503_on_the_metrics_listener_naming_the_unix_listener_whose_accept_loop_died(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """The Unix socket accepts nothing while /metrics still answers: /v1/live 503, the kubelet restarts."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(tmp_path, files))
    async with in_background(d.run, d.stop), clients(d) as (metrics, _):
        (unix_loop,) = [loop for loop in d.listeners.accept_loops if loop.name == "unix"]
        await kill_accept_loop(unix_loop, d.socket_path)
        response = await metrics.get("/v1/live")
        assert response.status_code == 503
        assert response.json() == {
            "status": "dead",
            "problems": {"listener/unix": "accept loop stopped: OSError: [Errno 22] Invalid argument"},
        }
        assert response.json()["problems"] == d.health().liveness_problems  # what withholds WATCHDOG=1
        assert (await metrics.get("/metrics")).status_code == 200  # what the old liveness probe asked


async def test_live_is_200_while_the_credentials_are_missing_since_degraded_is_not_dead(
    tmp_path: Path, files: FileSet
) -> None:
    """No SVID provisioned: /v1/health 503 (not ready), /v1/live 200 (no restart: it would fix nothing)."""
    d = Daemon(config(tmp_path, files))  # no files written: the required identity cannot load
    async with in_background(d.run, d.stop), clients(d) as (metrics, unix):
        assert (await metrics.get("/v1/health")).status_code == 503
        assert d.health().state == "degraded"
        for client in (metrics, unix):
            response = await client.get("/v1/live")
            assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_live_refuses_other_methods_than_get_and_head(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, method: str
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(tmp_path, files))
    async with in_background(d.run, d.stop), clients(d) as (metrics, _):
        response = await metrics.request(method, "/v1/live")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
