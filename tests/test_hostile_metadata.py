"""The metadata listener against a hostile local user: who owns the calling socket (issue 13 item 4),
and ID tokens that cannot be used to flood the upstreams (item 6)."""

from __future__ import annotations

import configparser
import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import APP_URI, CLIENT_ID, FileSet, as_user, in_background
from tests.test_tokens import _source, entra_token_config, metadata_token_config
from wlidd.api import tcp_owner
from wlidd.api.messages import Request
from wlidd.api.metadata import MetadataApi
from wlidd.api.peers import Peer
from wlidd.config import Config, MetadataListenerConfig, PolicyConfig, parse_token_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.logs import configure_logging, reset_logging
from wlidd.metrics import Metrics
from wlidd.policy import Policy
from wlidd.tokens.flows import Flow
from wlidd.tokens.limits import IdTokenLimits
from wlidd.tokens.manager import RateLimited, TokenSource

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
EMAIL = "app@demo-project.iam.gserviceaccount.com"
IDENTITY = "/computeMetadata/v1/instance/service-accounts/default/identity"
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid's sockets, mount namespaces)")


def metadata_daemon_config(tmp_path: Path, files: FileSet, upstreams: Upstreams) -> Config:
    return Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"gcp": metadata_token_config(upstreams)},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {"address": "127.0.0.1:0", "token": "gcp", "email": EMAIL},
            },
        }
    )


@pytest.fixture
async def daemon(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(metadata_daemon_config(tmp_path, files, upstreams))
    async with in_background(d.run, d.stop):
        yield d


@contextmanager
def audit_lines() -> Iterator[list[dict[str, Any]]]:
    """The daemon's log lines (JSON) written inside the block, parsed when it ends."""
    out = io.StringIO()
    lines: list[dict[str, Any]] = []
    configure_logging("info", "json", out)
    try:
        yield lines
    finally:
        configure_logging("info", "console")
        reset_logging()
        lines += [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


# ---- item 4: the owner of the calling socket ----------------------------------------------------


def _send_and_close_as(uid: int, port: int, targets: list[str]) -> list[int]:
    """From a child that dropped to `uid`: for each target, connect, send the request, close at once
    (the attack: a socket whose owner closed it looked like root). The client ports used."""

    def attack() -> str:
        ports = []
        for target in targets:
            raw = f"GET {target} HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
            s = socket.socket()
            s.connect(("127.0.0.1", port))
            ports.append(s.getsockname()[1])
            s.sendall(raw.encode())
            s.close()
        return json.dumps(ports)

    answer = as_user(uid, attack)
    assert not answer.startswith("CHILD-ERROR"), answer
    ports: list[int] = json.loads(answer)
    return ports


def _until_orphaned(port: int, client_ports: list[int], timeout: float = 5.0) -> None:
    """Block (the event loop too: a daemon too busy to read yet) until the kernel reports every client
    socket as its owner's no more: a closed socket whose FIN was acknowledged becomes a FIN_WAIT2 or
    TIME_WAIT minisocket with inode 0 and, there, uid 0 (the delayed ACK comes after ~40 ms)."""
    deadline = time.monotonic() + timeout
    for client_port in client_ports:
        while time.monotonic() < deadline:
            theirs = tcp_owner.lookup_tcp_peer(("127.0.0.1", client_port), ("127.0.0.1", port)).socket
            if theirs is None or (theirs.inode == 0 and theirs.state in (5, 6) and theirs.uid == 0):
                break
            time.sleep(0.002)


async def _wait_until_the_daemon_closed(port: int, client_ports: list[int]) -> None:
    """Until the daemon closed its end of each connection (it finished with the request, or refused it):
    the kernel shows that end gone or past CLOSE_WAIT."""
    open_states = {1, 8}  # ESTABLISHED, CLOSE_WAIT
    with anyio.fail_after(20):
        for client_port in client_ports:
            while True:
                ours = tcp_owner.lookup_tcp_peer(("127.0.0.1", port), ("127.0.0.1", client_port)).socket
                if ours is None or ours.state not in open_states:
                    break
                await anyio.sleep(0.01)


@needs_root
async def test_a_request_whose_socket_closes_at_once_is_never_served_as_root(
    daemon: Daemon, upstreams: Upstreams
) -> None:
    port = daemon.metadata_port
    assert port is not None
    await daemon.tokens["gcp"].wait_until_servable(10)  # the access token's own first fetch is done
    before = upstreams.calls["metadata"]
    targets = [f"{IDENTITY}?audience=https://attack-{n}.example.com" for n in range(20)]
    with audit_lines() as lines:
        # Synchronously, so the daemon (on this event loop) reads the requests only once the kernel
        # reports the closed sockets as nobody's: the attack on a daemon slowed down by load.
        client_ports = _send_and_close_as(NOBODY, port, targets)
        _until_orphaned(port, client_ports)
        await _wait_until_the_daemon_closed(port, client_ports)
    assert not [line for line in lines if line.get("uid") == 0]
    assert not [line for line in lines if line["event"] in ("id token handed out", "token handed out")]
    assert upstreams.calls["metadata"] == before  # no ID token was minted for anyone
    assert not daemon.tokens["gcp"]._id_cache


def _connected_pair(client_uid: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, our end, the client end) of a loopback connection whose client socket belongs to
    `client_uid` (a socket's owner is the fsuid it was made with)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    os.seteuid(client_uid)
    try:
        client = socket.socket()
    finally:
        os.seteuid(0)
    client.connect(listener.getsockname())
    ours, _ = listener.accept()
    return listener, ours, client


@needs_root
def test_the_owner_is_the_live_socket_and_a_closed_one_has_none() -> None:
    listener, ours, client = _connected_pair(NOBODY)
    remote, local = ours.getpeername(), ours.getsockname()
    try:
        owner = tcp_owner.tcp_peer_owner(remote, local)
        assert owner == tcp_owner.TcpOwner(NOBODY, os.fstat(client.fileno()).st_ino)
        client.close()
        after = tcp_owner.lookup_tcp_peer(remote, local)
        assert after.owner is None and tcp_owner.tcp_peer_owner(remote, local) is None
        assert "not ESTABLISHED" in after.reason() and "FIN_WAIT" in after.reason()
        with pytest.raises(tcp_owner.PeerRefused, match="FIN_WAIT"):
            tcp_owner.verify_tcp_peer(remote, local, owner)
    finally:
        for s in (listener, ours, client):
            s.close()


@needs_root
def test_sock_diag_and_proc_self_net_agree_and_proc_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    listener, ours, client = _connected_pair(NOBODY)
    remote, local = ours.getpeername(), ours.getsockname()
    try:
        via_diag = tcp_owner.lookup_tcp_peer(remote, local).socket
        via_proc = tcp_owner.proc_lookup(remote, local)
        assert via_diag is not None and via_diag.via == "sock_diag"
        assert via_proc is not None and via_proc.via == "/proc/self/net/tcp"
        assert (via_diag.state, via_diag.uid, via_diag.inode) == (via_proc.state, via_proc.uid, via_proc.inode)

        def refused(*args: object) -> None:
            raise OSError(97, "Address family not supported by protocol")  # EAFNOSUPPORT: no AF_NETLINK

        monkeypatch.setattr(tcp_owner, "_sock_diag", tcp_owner._SockDiag())
        monkeypatch.setattr(tcp_owner._SockDiag, "_query", refused)
        fallback = tcp_owner.lookup_tcp_peer(remote, local)
        assert fallback.socket is not None and fallback.socket.via == "/proc/self/net/tcp"
        assert fallback.owner == tcp_owner.TcpOwner(NOBODY, via_proc.inode)
        assert not tcp_owner.lookup_is_cheap()  # netlink refused: not asked again, and callers use a thread
    finally:
        for s in (listener, ours, client):
            s.close()


SUBSET_PID_CHILD = """
import json, os, socket, sys
from wlidd.api import tcp_owner

listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
os.seteuid(65534); client = socket.socket(); os.seteuid(0)
client.connect(listener.getsockname()); ours, _ = listener.accept()
remote, local = ours.getpeername(), ours.getsockname()
diag = tcp_owner.tcp_peer_owner(remote, local)
tcp_owner._sock_diag.usable = False  # now the /proc path alone
print(json.dumps({
    "proc_net_hidden": not os.path.exists("/proc/net/tcp"),
    "inode": os.fstat(client.fileno()).st_ino,
    "diag": [diag.uid, diag.inode] if diag else None,
    "proc_uid": (lambda owner: owner.uid if owner else None)(tcp_owner.tcp_peer_owner(remote, local)),
}))
"""


@needs_root
def test_the_owner_is_found_under_proc_mounted_subset_pid() -> None:
    """The shipped unit's ProcSubset=pid hides /proc/net: the lookup must not need it."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}")
    script = 'mount -t proc -o subset=pid proc /proc || exit 77; exec "$0" -c "$1"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable, SUBSET_PID_CHILD],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    if result.returncode == 77:
        pytest.skip(f"proc cannot be mounted with subset=pid here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout)
    assert seen["proc_net_hidden"]  # the namespace is like the unit's
    assert seen["diag"] == [NOBODY, seen["inode"]]
    assert seen["proc_uid"] == NOBODY


def test_the_unit_allows_the_address_families_the_lookup_uses() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / "wlidd.service")
    service = parser["Service"]
    families = service["RestrictAddressFamilies"].split()
    assert "AF_NETLINK" in families and {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert service.get("ProcSubset") == "pid"  # hence /proc/self/net, never /proc/net, for the fallback


def _api(source: TokenSource) -> MetadataApi:
    return MetadataApi(
        MetadataListenerConfig(token=source.name, email=EMAIL),
        source,
        Policy.from_config(PolicyConfig()),  # root and group wlidd-clients
        lambda: dt.datetime.now(dt.UTC),
    )


def _request(path: str, query: dict[str, list[str]], ours: socket.socket, **peer: Any) -> Request:
    remote, local = ours.getpeername(), ours.getsockname()
    return Request(
        "GET",
        path,
        query,
        (("metadata-flavor", "Google"),),
        b"",
        Peer(address=f"{remote[0]}:{remote[1]}", tcp_remote=remote, tcp_local=local, **peer),
        "metadata",
    )


class FakeClock:
    """A monotonic clock (seconds) and a sleep that advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = time.monotonic()  # from the real clock's reading: a source's earlier calls were timed on it
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        target = self.now + seconds
        await anyio.sleep(0)
        self.now = max(self.now, target)


@pytest.fixture
async def make_mds(upstreams: Upstreams) -> AsyncIterator[Callable[..., TokenSource]]:
    """gce-metadata token sources against the emulator: `make_mds(id_limits=…, monotonic=…)`."""
    made: list[TokenSource] = []

    def make(**kwargs: Any) -> TokenSource:
        config = parse_token_config(metadata_token_config(upstreams))
        made.append(TokenSource("gcp", config, Flow("gcp", config), **kwargs))
        return made[-1]

    yield make
    for source in made:
        await source.flow.aclose()


@pytest.fixture
def mds_source(make_mds: Callable[..., TokenSource]) -> TokenSource:
    return make_mds()


@needs_root
@pytest.mark.parametrize("path", [IDENTITY, TOKEN])
async def test_a_caller_that_closes_before_the_answer_gets_no_token(
    mds_source: TokenSource, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, ours, client = _connected_pair(0)  # root: allowed, until its socket is closed
    real_id_token, real_get = mds_source.id_token, mds_source.get
    served: list[str] = []

    async def id_token_then_close(audience: str, *, caller: int | None = None) -> str:
        value = await real_id_token(audience, caller=caller)
        served.append(value)
        client.close()  # while the upstream answered, the caller went away
        return value

    async def get_then_close() -> Any:
        token = await real_get()
        served.append(token.value)
        client.close()
        return token

    monkeypatch.setattr(mds_source, "id_token", id_token_then_close)
    monkeypatch.setattr(mds_source, "get", get_then_close)
    try:
        with audit_lines() as lines:
            response = await _api(mds_source)(_request(path, {"audience": ["https://a.example.com"]}, ours))
    finally:
        for s in (listener, ours, client):
            s.close()
    status, body = response.status, response.body  # (a failed assertion must not print a token)
    assert status == 403
    assert b"not ESTABLISHED" in body and served and served[0].encode() not in body and b"access_token" not in body
    assert not [line for line in lines if line["event"].endswith("handed out")]


@needs_root
async def test_the_owner_found_at_accept_must_still_hold_the_socket(mds_source: TokenSource) -> None:
    listener, ours, client = _connected_pair(0)
    api = _api(mds_source)
    query = {"audience": ["https://a.example.com"]}
    try:
        impostor = await api(_request(IDENTITY, query, ours, uid=NOBODY))  # accept saw another owner
        same = await api(_request(IDENTITY, query, ours, uid=0))
    finally:
        for s in (listener, ours, client):
            s.close()
    refused, allowed = (impostor.status, impostor.body), same.status  # (a failed assertion must not print a token)
    assert refused[0] == 403 and b"changed owner" in refused[1]
    assert allowed == 200


# ---- item 6: ID tokens go through the source's guards --------------------------------------------


async def test_random_audiences_from_one_caller_are_rate_limited_with_a_clear_429(
    daemon: Daemon, upstreams: Upstreams
) -> None:
    source = daemon.tokens["gcp"]
    clock = FakeClock()
    source.monotonic = clock  # the buckets' clock: time stands still unless the test moves it
    burst = source.id_limits.caller_burst
    before = upstreams.calls["metadata"]
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.metadata_port}", timeout=30) as c:
        flavor = {"Metadata-Flavor": "Google"}
        limited = None
        for n in range(200):
            response = await c.get(IDENTITY, params={"audience": f"https://{n}.random.example"}, headers=flavor)
            statuses.append(response.status_code)
            if response.status_code == 429:
                limited = response
        cached = await c.get(IDENTITY, params={"audience": "https://0.random.example"}, headers=flavor)
        clock.now += 60 / source.id_limits.caller_per_minute  # one mint's worth of refill
        refilled = await c.get(IDENTITY, params={"audience": "https://new.random.example"}, headers=flavor)
        again = await c.get(IDENTITY, params={"audience": "https://newer.random.example"}, headers=flavor)
    assert statuses.count(200) == burst and statuses.count(429) == 200 - burst
    assert upstreams.calls["metadata"] - before == burst + 1  # the burst, then the one refilled mint
    assert limited is not None and limited.headers["retry-after"] == "6"
    assert limited.headers["metadata-flavor"] == "Google"
    assert "uid 0 asked token 'gcp' for ID tokens for new audiences faster than 10 per minute" in limited.text
    assert cached.status_code == 200  # cache hits are free, even while limited
    assert refilled.status_code == 200 and again.status_code == 429
    calls = daemon.metrics.registry.get_sample_value(
        "wlidd_token_upstream_calls_total", {"source": "gcp", "kind": "id_token"}
    )
    assert calls == burst + 1 and source.upstream_calls >= burst + 1


async def test_an_overlong_audience_is_refused_with_a_400(daemon: Daemon, upstreams: Upstreams) -> None:
    before = upstreams.calls["metadata"]
    flavor = {"Metadata-Flavor": "Google"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.metadata_port}", timeout=30) as c:
        too_long = await c.get(IDENTITY, params={"audience": "a" * 513}, headers=flavor)
        control = await c.get(IDENTITY, params={"audience": "a\x01b"}, headers=flavor)
        longest = await c.get(IDENTITY, params={"audience": "a" * 512}, headers=flavor)
    assert too_long.status_code == 400 and "513 characters long; at most 512 are accepted" in too_long.text
    assert control.status_code == 400 and "control characters" in control.text
    assert longest.status_code == 200
    assert upstreams.calls["metadata"] - before == 1


async def test_new_audiences_are_capped_across_callers(
    make_mds: Callable[..., TokenSource], upstreams: Upstreams
) -> None:
    limits = IdTokenLimits(caller_burst=5, new_audiences_burst=12, new_audiences_per_minute=12)
    mds_source = make_mds(id_limits=limits, monotonic=FakeClock())
    minted = 0
    refusals: list[str] = []
    for uid in range(1000, 1006):  # six callers, five mints each allowed on their own
        for n in range(5):
            try:
                await mds_source.id_token(f"https://{uid}-{n}.example", caller=uid)
                minted += 1
            except RateLimited as exc:
                refusals.append(exc.message)
                assert exc.http_status == 429 and exc.retry_after == 5
    assert minted == 12 and upstreams.calls["metadata"] == 12
    assert all("more new audiences than 12 per minute (all callers together)" in r for r in refusals)


async def test_the_id_token_cache_and_the_in_flight_table_stay_bounded(
    make_mds: Callable[..., TokenSource], upstreams: Upstreams
) -> None:
    limits = IdTokenLimits(cache_size=8, max_inflight=4, caller_burst=1000, new_audiences_burst=1000)
    mds_source = make_mds(id_limits=limits, monotonic=FakeClock())
    peak = 0
    results: list[str | int] = []

    async def ask(audience: str) -> None:
        nonlocal peak
        try:
            results.append(await mds_source.id_token(audience, caller=0))
        except RateLimited as exc:
            results.append(exc.http_status)
        peak = max(peak, len(mds_source._id_flights))

    async with anyio.create_task_group() as tg:
        for n in range(40):
            tg.start_soon(ask, f"https://{n}.example")
            tg.start_soon(ask, f"https://{n}.example")  # the same audience at once: one mint, shared
    # all 80 asked at once: four audiences minted (each shared by its two askers), the rest told to retry
    assert len(results) == 80 and peak <= 4 and upstreams.calls["metadata"] == 4
    assert sum(isinstance(r, str) for r in results) == 8 and results.count(429) == 72
    assert not mds_source._id_flights and len(mds_source._id_cache) <= 8
    for n in range(40, 60):  # one at a time: every one minted, the cache keeps only the latest
        await mds_source.id_token(f"https://{n}.example", caller=0)
    assert list(mds_source._id_cache) == [f"https://{n}.example" for n in range(52, 60)]


async def test_the_per_caller_rate_limit_table_stays_bounded(
    make_mds: Callable[..., TokenSource], upstreams: Upstreams
) -> None:
    clock = FakeClock()
    mds_source = make_mds(id_limits=IdTokenLimits(max_callers=4, caller_burst=1), monotonic=clock)
    for uid in range(1000, 1010):
        await mds_source.id_token(f"https://{uid}.example", caller=uid)
        assert len(mds_source._id_callers) <= 4
    with pytest.raises(RateLimited):  # a caller still in the table keeps its (empty) bucket
        await mds_source.id_token("https://again.example", caller=1009)
    assert upstreams.calls["metadata"] == 10


async def test_an_on_demand_entra_sts_id_token_goes_through_single_flight_min_interval_and_counts(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    svid = ca.issue_svid("/ns/prod/sa/entra-client", key_kind="rsa2048")
    upstreams.register_app(CLIENT_ID, APP_URI, svid.leaf)
    files.put(svid, ca.bundle_pem)
    clock = FakeClock()
    metrics = Metrics()
    config = entra_token_config(upstreams, on_demand=True, min_interval=5)
    source, watcher = _source(config, files, monotonic=clock, sleep=clock.sleep, metrics=metrics)
    try:
        await watcher.reload("start")
        async with anyio.create_task_group() as tg:
            for audience in ("https://a.example", "https://b.example", "https://c.example", "https://a.example"):
                tg.start_soon(source.id_token, audience)
    finally:
        await source.flow.aclose()
    # one Entra→STS→IAM chain shared by all (single-flight), then one generateIdToken per audience
    assert upstreams.calls["entra"] == 1 and upstreams.calls["sts"] == 1 and upstreams.calls["iam"] == 1 + 3
    assert source.upstream_calls == 4
    assert sorted(clock.slept) == [5.0, 10.0, 15.0]  # each call min_interval after the one before
    for kind, count in (("token", 1), ("id_token", 3)):
        labels = {"source": "gcp", "kind": kind}
        assert metrics.registry.get_sample_value("wlidd_token_upstream_calls_total", labels) == count
