"""The daemon's listeners: the metrics listener, one start line per listener, and a start that answers.

The accept loops run right after binding, before the first loads: a daemon whose identity cannot be read
yet says "starting" (and what it waits for) instead of being unreachable, serves what needs no identity,
and sends READY=1 only once the loads are over. Identities here retry every hour (mismatch_retry_delay),
so a start only moves on when a test writes the files: tests wait on observable state, never on time.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import FileSet, in_background
from tests.test_systemd import NotifySocket
from tests.test_systemd import start as start_process
from tests.test_tokens import metadata_token_config, x509_token_config
from wlidd.cli.client_commands import fetch_status, render_status
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.logs import configure_logging, reset_logging

EMAIL = "app@demo-project.iam.gserviceaccount.com"
HOUR = 3600.0  # a retry delay no test waits for: the first load ends when the test writes the files


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    sock.sock.setblocking(False)
    yield sock
    sock.close()


def drain(notify: NotifySocket) -> list[dict[str, str]]:
    """Every datagram received so far (non-blocking), also kept in notify.messages."""
    while True:
        try:
            data = notify.sock.recv(65536)
        except BlockingIOError:
            return notify.messages
        notify.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The daemon's log lines, as JSON, in a buffer the test reads."""
    out = io.StringIO()
    configure_logging("info", "json", out)
    yield out
    reset_logging()


def events(out: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, out.getvalue().splitlines()) if line.get("event") == event]


def config(tmp_path: Path, files: FileSet, *, slow: bool = False, **listeners: Any) -> Config:
    """One identity "default" from `files` and a Unix socket, plus `listeners`. `slow`: the identity's first
    load waits an hour between reads (or until a file event), so while its files are missing the daemon
    stays "starting" until the test writes them."""
    identity = files.config(mismatch_retries=3, mismatch_retry_delay=HOUR) if slow else files.config()
    return Config.model_validate(
        {
            "identities": {"default": identity},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}, **listeners},
        }
    )


def slow_identity(files: FileSet) -> dict[str, Any]:
    """`config(slow=True)`'s identity, for configs built here."""
    return files.config(mismatch_retries=3, mismatch_retry_delay=HOUR).model_dump()


def unix_client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path)), base_url="http://wlidd")


def metrics_client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metrics_port}")


async def wait_for_state(d: Daemon, state: str, timeout: float = 10) -> dict[str, Any]:
    """Poll /v1/status on the Unix socket until the daemon's state is `state`; the document then."""
    with anyio.fail_after(timeout):
        while True:
            try:
                if d.socket_path.exists():
                    async with unix_client(d) as c:
                        document: dict[str, Any] = (await c.get("/v1/status")).json()
                    if document["daemon"]["state"] == state:
                        return document
            except httpx.TransportError:
                pass  # not bound yet, or (before this change) bound but not accepting
            await anyio.sleep(0.02)


@asynccontextmanager
async def running(d: Daemon) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Run `d` without waiting for READY (tg.start would): the start is what these tests look at."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        try:
            yield tg
        finally:
            d.stop()


# ---- [listeners.metrics] ----------------------------------------------------------------------------


@pytest.fixture
async def metrics_daemon(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(tmp_path, files, metrics={"address": "127.0.0.1:0"}))
    async with in_background(d.run, d.stop):
        yield d


async def test_the_metrics_listener_serves_the_prometheus_exposition_over_plain_http(metrics_daemon: Daemon) -> None:
    async with metrics_client(metrics_daemon) as c:
        response = await c.get("/metrics")
        head = await c.head("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'wlidd_identity_valid{identity="default"} 1.0' in response.text
    assert 'wlidd_listener_up{listener="metrics"} 1.0' in response.text
    assert head.status_code == 200 and head.content == b""


async def test_curl_scrapes_the_metrics_listener(metrics_daemon: Daemon) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = await anyio.run_process(
        ["curl", "-sS", "--fail", f"http://127.0.0.1:{metrics_daemon.metrics_port}/metrics"]
    )
    assert b"# TYPE wlidd_identity_valid gauge" in result.stdout


async def test_the_metrics_scrape_passes_promtool_check_metrics(metrics_daemon: Daemon) -> None:
    """promtool (Debian package `prometheus`) lints the exposition a scraper gets from the listener."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    async with metrics_client(metrics_daemon) as c:
        await c.get("/nothing")  # a request counter and a few more series to lint
        scrape = await c.get("/metrics")
    result = await anyio.run_process([promtool, "check", "metrics"], input=scrape.content, check=False)
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not problems.strip(), problems  # lint advice (names, HELP) counts too


@pytest.mark.parametrize(
    "path",
    [
        "/v1/status",
        "/v1/token/gcp",
        "/v1/credentials/default",
        "/v1/identity/default",
        "/v1/ready/default",
        "/get_wif_token",
        "/computeMetadata/v1/instance/service-accounts/default/token",
        "/",
        "/metrics/",
    ],
)
async def test_the_metrics_listener_answers_404_to_everything_else(metrics_daemon: Daemon, path: str) -> None:
    async with metrics_client(metrics_daemon) as c:
        response = await c.get(path, headers={"Metadata-Flavor": "Google"})
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert "spiffe://" not in response.text and "BEGIN" not in response.text


async def test_the_metrics_listener_refuses_other_methods_than_get(metrics_daemon: Daemon) -> None:
    async with metrics_client(metrics_daemon) as c:
        response = await c.post("/metrics", content=b"x")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"


async def test_the_metrics_listener_health_is_200_when_ready(metrics_daemon: Daemon) -> None:
    async with metrics_client(metrics_daemon) as c:
        response = await c.get("/v1/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_the_metrics_listener_health_is_503_with_the_reason_when_a_required_identity_is_missing(
    tmp_path: Path, files: FileSet
) -> None:
    d = Daemon(config(tmp_path, files, metrics={"address": "127.0.0.1:0"}))  # no files: the load fails
    async with in_background(d.run, d.stop), metrics_client(d) as c, unix_client(d) as u:
        response = await c.get("/v1/health")
        unix = await u.get("/v1/health")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"
    assert "identity/default" in response.json()["problems"]
    assert response.json() == unix.json()  # the Unix socket's own answer


async def test_the_metrics_listener_has_its_caps_and_closes_a_silent_connection(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    metrics = {"address": "127.0.0.1:0", "max_connections": 3, "max_connections_per_caller": 2}
    d = Daemon(config(tmp_path, files, metrics={**metrics, "first_byte_timeout": 0.2}))
    async with in_background(d.run, d.stop):
        listener = d.listeners.status()["metrics"]
        assert (listener.max_connections, listener.max_per_caller) == (3, 2)
        assert listener.address == f"127.0.0.1:{d.metrics_port}"
        with anyio.fail_after(10):
            stream = await anyio.connect_tcp("127.0.0.1", d.metrics_port or 0)
            async with stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError)):
                    await stream.receive()  # closed after first_byte_timeout: nothing was sent


async def test_a_metrics_listener_off_loopback_logs_a_warning(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, json_logs: io.StringIO
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(tmp_path, files, metrics={"address": "0.0.0.0:0"}))
    async with in_background(d.run, d.stop), metrics_client(d) as c:
        assert (await c.get("/metrics")).status_code == 200
    warnings = [line for line in events(json_logs, "listener started") if line["listener"] == "metrics"]
    assert warnings and warnings[0]["address"].startswith("0.0.0.0:")
    (warning,) = [
        line for line in map(json.loads, json_logs.getvalue().splitlines()) if "not on a loopback" in line["event"]
    ]
    assert warning["level"] == "warning" and warning["address"] == f"0.0.0.0:{d.metrics_port}"


async def test_a_metrics_listener_on_loopback_logs_no_warning(metrics_daemon: Daemon, json_logs: io.StringIO) -> None:
    assert "not on a loopback" not in json_logs.getvalue()


def test_the_metrics_listener_takes_a_socket_activated_fd_named_metrics(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    passed = socket.socket()
    passed.bind(("127.0.0.1", 0))
    passed.listen()
    port = passed.getsockname()[1]
    path = tmp_path / "wlidd.toml"
    path.write_text(
        f'[identities.default]\nsource = "files"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
        f'bundle = "{files.bundle}"\n[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n'
        '[listeners.metrics]\naddress = "127.0.0.1:0"\n'  # bound here, it would be another port than `port`
    )
    fd = passed.fileno()

    def as_fd_3() -> None:
        os.dup2(fd, 3)

    proc = subprocess.Popen(
        ["/bin/sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m wlidd run --config "{path}"'],
        env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "metrics"},
        preexec_fn=as_fd_3,
        pass_fds=(fd, 3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the passed metrics socket never answered"
            time.sleep(0.05)
        assert "wlidd_identity_valid" in response.text
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        started = [json.loads(line) for line in stderr.splitlines() if '"listener started"' in line]
        assert {"listener": "metrics", "address": f"127.0.0.1:{port}"}.items() <= next(
            line for line in started if line["listener"] == "metrics"
        ).items()
    finally:
        passed.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


# ---- one start line per listener --------------------------------------------------------------------


async def test_every_listener_logs_one_start_line_with_its_address_or_path(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, json_logs: io.StringIO
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    cfg = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"gcp": metadata_token_config(upstreams)},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "mtls": {"address": "127.0.0.1:0", "identity": "default", "allow": ["spiffe://example.org/**"]},
                "metadata": {"address": "127.0.0.1:0", "token": "gcp", "email": EMAIL},
                "workload_api": {"path": str(tmp_path / "workload.sock")},
                "metrics": {"address": "127.0.0.1:0"},
            },
        }
    )
    d = Daemon(cfg)
    async with in_background(d.run, d.stop):
        pass
    lines = {line["listener"]: line for line in events(json_logs, "listener started")}
    assert len(events(json_logs, "listener started")) == 5
    assert lines["unix"]["path"] == str(tmp_path / "wlidd.sock")
    assert lines["workload_api"]["path"] == str(tmp_path / "workload.sock")
    assert lines["mtls"]["address"] == f"127.0.0.1:{d.mtls_port}"
    assert lines["metadata"]["address"] == f"127.0.0.1:{d.metadata_port}"
    assert lines["metrics"]["address"] == f"127.0.0.1:{d.metrics_port}"
    assert all(line["level"] == "info" for line in lines.values())


# ---- a start that answers ---------------------------------------------------------------------------


async def test_a_daemon_whose_identity_cannot_be_read_yet_answers_starting_and_what_it_waits_for(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    d = Daemon(config(tmp_path, files, slow=True))
    async with running(d):
        document = await wait_for_state(d, "starting")
        assert document["daemon"]["waiting_for"] == {"identities": ["default"], "tokens": []}
        async with unix_client(d) as c:
            health = await c.get("/v1/health")
            identity = await c.get("/v1/identity/default")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        assert health.json()["waiting_for"] == {"identities": ["default"], "tokens": []}
        assert identity.status_code == 503 and identity.json()["error"] == "identity_unavailable"
        assert d.summary() == "starting: waiting for identity default (first load)"
        files.put(ca.issue_svid(), ca.bundle_pem)  # the file event ends the hour-long retry wait
        document = await wait_for_state(d, "running")
        assert document["daemon"]["waiting_for"] == {"identities": [], "tokens": []}
        async with unix_client(d) as c:
            assert (await c.get("/v1/health")).json() == {"status": "ok"}


async def test_wlidd_status_says_starting_and_what_it_waits_for(tmp_path: Path, files: FileSet) -> None:
    d = Daemon(config(tmp_path, files, slow=True))
    async with running(d):
        await wait_for_state(d, "starting")
        table = await anyio.to_thread.run_sync(lambda: render_status(fetch_status(d.socket_path)))
    lines = table.splitlines()
    assert lines[0].startswith("wlidd ") and ": starting, up " in lines[0]
    assert lines[1] == "starting: waiting for identity default (first load)"
    assert lines[2].split()[:2] == ["IDENTITY", "VALID"]


async def test_a_gce_metadata_token_is_served_while_an_identity_is_still_loading(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    cfg = Config.model_validate(
        {
            "identities": {"default": slow_identity(files)},
            "tokens": {
                "mds": metadata_token_config(upstreams, require_at_start=True),
                "x509": x509_token_config(upstreams),  # needs the identity still loading
            },
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {"address": "127.0.0.1:0", "token": "mds", "email": EMAIL},
            },
        }
    )
    d = Daemon(cfg)
    async with running(d):
        await wait_for_state(d, "starting")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metadata_port}") as m, unix_client(d) as c:
            token = await m.get(
                "/computeMetadata/v1/instance/service-accounts/default/token", headers={"Metadata-Flavor": "Google"}
            )
            local = await c.get("/v1/token/mds")
            bound = await c.get("/v1/token/x509")
            status = (await c.get("/v1/status")).json()
        assert token.status_code == 200 and token.json()["token_type"] == "Bearer"
        assert local.status_code == 200
        # the same answer as an absent identity, and no upstream attempt (no failure, no backoff)
        assert bound.status_code == 503 and bound.json()["error"] == "token_unavailable"
        assert "identity 'default' has no valid SVID loaded yet" in bound.json()["message"]
        assert d.tokens["x509"].failures == 0 and d.tokens["x509"].upstream_calls == 0
        assert status["daemon"]["state"] == "starting"
        assert status["daemon"]["waiting_for"] == {"identities": ["default"], "tokens": []}  # mds was had
        files.put(ca.issue_svid(), ca.bundle_pem)
        await wait_for_state(d, "running")
        async with unix_client(d) as c:
            with anyio.fail_after(10):
                while (bound := await c.get("/v1/token/x509")).status_code != 200:
                    await anyio.sleep(0.02)


async def test_ready_is_sent_only_once_the_first_loads_are_over(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, notify: NotifySocket
) -> None:
    cfg = config(tmp_path, files, slow=True)
    d = Daemon(cfg, environ={"NOTIFY_SOCKET": str(notify.path)})
    async with running(d):
        await wait_for_state(d, "starting")
        with anyio.fail_after(10):  # STATUS= says what the start waits for …
            while not any(
                m.get("STATUS", "").startswith("starting: waiting for identity default") for m in drain(notify)
            ):
                await anyio.sleep(0.02)
        assert not any("READY" in m for m in drain(notify))  # … and READY=1 waits for the load
        files.put(ca.issue_svid(), ca.bundle_pem)
        with anyio.fail_after(10):
            while not any("READY" in m for m in drain(notify)):
                await anyio.sleep(0.02)
        assert d.watchers["default"].is_valid()
        (ready,) = [m for m in drain(notify) if "READY" in m]
        assert ready["STATUS"].startswith("serving 1 identities")


async def test_a_stop_during_the_start_closes_the_listeners_and_sends_no_ready(
    tmp_path: Path, files: FileSet, notify: NotifySocket
) -> None:
    cfg = config(tmp_path, files, slow=True, metrics={"address": "127.0.0.1:0"})
    d = Daemon(cfg, environ={"NOTIFY_SOCKET": str(notify.path)})
    with anyio.fail_after(20):  # the load would wait an hour: only the stop ends it
        async with running(d):
            await wait_for_state(d, "starting")
            port = d.metrics_port
            d.stop()
    assert not d.socket_path.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port or 0), timeout=2).close()
    keys = [key for m in drain(notify) for key in m]
    assert "STOPPING" in keys and "READY" not in keys


async def test_a_sighup_during_the_start_reloads_only_after_ready(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, notify: NotifySocket
) -> None:
    cfg = config(tmp_path, files, slow=True)
    d = Daemon(cfg, environ={"NOTIFY_SOCKET": str(notify.path)})
    async with running(d):
        await wait_for_state(d, "starting")
        await d.reload()
        assert not any("RELOADING" in m or "READY" in m for m in drain(notify))
        files.put(ca.issue_svid(), ca.bundle_pem)
        with anyio.fail_after(10):
            while sum("READY" in m for m in drain(notify)) < 2:
                await anyio.sleep(0.02)
    keys = [key for m in drain(notify) for key in m if key in ("READY", "RELOADING", "STOPPING")]
    assert keys == ["READY", "RELOADING", "READY", "STOPPING"]


def test_sigterm_during_the_start_stops_wlidd_run_cleanly_without_ready(
    tmp_path: Path, files: FileSet, notify: NotifySocket
) -> None:
    """The real process: SIGTERM while the first load waits (an hour) ends the start at once, exit 0."""
    path = tmp_path / "wlidd.toml"
    path.write_text(
        f'[identities.default]\nsource = "files"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
        f'bundle = "{files.bundle}"\nmismatch_retries = 3\nmismatch_retry_delay = "1h"\n'
        f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n'
    )
    proc = start_process(path, {"NOTIFY_SOCKET": str(notify.path)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if (tmp_path / "wlidd.sock").exists():  # (httpx leaks a socket when the path is missing)
                    with httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "wlidd.sock"))) as client:
                        if client.get("http://wlidd/v1/status").json()["daemon"]["state"] == "starting":
                            break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon never answered while starting"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    keys = [key for m in drain(notify) for key in m]
    assert "STOPPING" in keys and "READY" not in keys
    assert not (tmp_path / "wlidd.sock").exists()
