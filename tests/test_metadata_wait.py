"""ETags and `?wait_for_change=true` on the metadata API, as the real server answers them (wlidd.api.metadata
has the sources): every value and directory answer carries an ETag; a wait with the current ETag, or with
none, is held until the value changes or `timeout_sec` passes; one with another ETag is answered at once.
Go's `metadata.Subscribe` once made 25,388 requests in 3 s against a daemon that answered waits at once.

Held requests are bounded (per caller and per listener, beyond: 503 + Retry-After), outlive the idle
deadline, are dropped when their client goes away and are answered at once when the daemon stops.
Waits end on observable state (the API's count of held requests), never on fixed sleeps."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from tests.clients.harness import client_env, metadata_daemon, run_client, unavailable
from tests.conftest import FileSet, in_background, wait_until
from tests.test_tokens import metadata_token_config
from wlidd.api.metadata import MetadataApi
from wlidd.api.metadata_tree import etag
from wlidd.api.metadata_wait import MAX_WAIT_SECONDS
from wlidd.config import Config, parse_token_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

FLAVOR = {"Metadata-Flavor": "Google"}
V1 = "/computeMetadata/v1/"
PROJECT_ID = V1 + "project/project-id"
SCOPES = V1 + "instance/service-accounts/default/scopes"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GOPATH = Path("/usr/share/gocode")
EMAIL = "app@demo-project.iam.gserviceaccount.com"


def api(daemon: Daemon) -> MetadataApi:
    assert daemon.listeners.metadata_server is not None and isinstance(
        daemon.listeners.metadata_server.handler, MetadataApi
    )
    return daemon.listeners.metadata_server.handler


def requests_answered(daemon: Daemon, route: str) -> float:
    """Requests the metadata listener answered on `route` (every status)."""
    total = 0.0
    for metric in daemon.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "wlidd_http_requests_total" and sample.labels.get("route") == route:
                total += sample.value
    return total


@pytest.fixture
async def daemon(tmp_path: Path, ca: CertificateAuthority) -> AsyncIterator[Daemon]:
    async with metadata_daemon(tmp_path, ca) as (d, _):
        yield d


@pytest.fixture
async def mds(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.metadata_port}", headers=FLAVOR, timeout=30) as c:
        yield c


# ---- ETags ------------------------------------------------------------------------------------------
async def test_every_value_and_directory_answer_carries_the_etag_of_its_body(mds: httpx.AsyncClient) -> None:
    answers = {
        "value": await mds.get(PROJECT_ID),
        "value as json": await mds.get(PROJECT_ID, params={"alt": "json"}),
        "list value": await mds.get(SCOPES),
        "listing": await mds.get(V1 + "project/"),
        "recursive": await mds.get(V1 + "project/", params={"recursive": "true"}),
        "ping": await mds.get("/"),
    }
    for kind, answer in answers.items():
        assert answer.status_code == 200, kind
        assert re.fullmatch(r"[0-9a-f]{16}", answer.headers.get("etag", "")), kind  # the real server's form
        assert answer.headers["etag"] == etag(answer.content), kind
    assert (await mds.get(PROJECT_ID)).headers["etag"] == answers["value"].headers["etag"]  # stable
    assert answers["listing"].headers["etag"] != answers["recursive"].headers["etag"]


# ---- holding and answering ------------------------------------------------------------------------------
async def test_a_wait_with_the_current_etag_is_held_until_timeout_sec_then_answers_the_current_value(
    daemon: Daemon, mds: httpx.AsyncClient
) -> None:
    """Moved from the tester's reproduction (tests/test_breaker_clients.py, item 6): the wait is held (not
    answered at once, as before), then answered with the current value and its unchanged ETag."""
    first = await mds.get(PROJECT_ID)
    answered: list[httpx.Response] = []

    async def wait() -> None:
        params = {"wait_for_change": "true", "last_etag": first.headers["etag"], "timeout_sec": "2"}
        answered.append(await mds.get(PROJECT_ID, params=params))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await wait_until(lambda: api(daemon).held == 1 or bool(answered), what="the wait was never held")
        assert not answered, "a wait with the current ETag was answered at once"
    assert answered[0].status_code == 200
    assert (answered[0].text, answered[0].headers["etag"]) == (first.text, first.headers["etag"])
    assert api(daemon).held == 0


async def test_a_held_wait_answers_the_new_value_when_a_reload_changes_it(
    daemon: Daemon, mds: httpx.AsyncClient
) -> None:
    first = await mds.get(SCOPES)
    answered: list[httpx.Response] = []

    async def wait() -> None:
        params = {"wait_for_change": "true", "last_etag": first.headers["etag"]}  # no timeout_sec: the maximum
        answered.append(await mds.get(SCOPES, params=params))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await wait_until(lambda: api(daemon).held == 1, what="the wait was never held")
        config = daemon.tokens["gcp"].config.model_dump()
        config["metadata"]["scopes"] = [CLOUD_PLATFORM, "https://www.googleapis.com/auth/userinfo.email"]
        tokens = {**daemon.config.tokens, "gcp": parse_token_config(config)}
        await daemon._apply(daemon.config.model_copy(update={"tokens": tokens}))  # what a SIGHUP reload does
    assert answered[0].status_code == 200
    assert answered[0].text == CLOUD_PLATFORM + "\nhttps://www.googleapis.com/auth/userinfo.email\n"
    assert answered[0].headers["etag"] == etag(answered[0].content) != first.headers["etag"]


async def test_a_wait_without_last_etag_is_held_and_one_with_another_etag_is_answered_at_once(
    daemon: Daemon, mds: httpx.AsyncClient
) -> None:
    """Without last_etag the real server waits for the next change; another ETag (the guest agent's first
    `NONE`, the samples' `0`) means the client's value is stale: the current one at once."""
    current = await mds.get(PROJECT_ID)
    held: list[httpx.Response] = []

    async def wait() -> None:
        held.append(await mds.get(PROJECT_ID, params={"wait_for_change": "true", "timeout_sec": "2"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await wait_until(lambda: api(daemon).held == 1 or bool(held), what="the wait was never held")
        assert not held, "a wait without last_etag was answered at once"
    assert (held[0].status_code, held[0].text) == (200, current.text)
    for stale in ("NONE", "0"):
        with anyio.fail_after(10):  # held, it would not answer for MAX_WAIT_SECONDS
            answer = await mds.get(PROJECT_ID, params={"wait_for_change": "true", "last_etag": stale})
        assert (answer.status_code, answer.text, answer.headers["etag"]) == (200, current.text, current.headers["etag"])
    assert MAX_WAIT_SECONDS == 3600


async def test_waits_on_listings_and_tokens_and_with_a_bad_timeout_are_refused(mds: httpx.AsyncClient) -> None:
    wait = {"wait_for_change": "true"}
    listing = await mds.get(V1 + "project/", params=wait)
    token = await mds.get(V1 + "instance/service-accounts/default/token", params=wait)
    identity = await mds.get(V1 + "instance/service-accounts/default/identity", params={**wait, "audience": "a"})
    timeout = await mds.get(PROJECT_ID, params={**wait, "timeout_sec": "1.5"})
    assert listing.status_code == 400 and "add recursive=true" in listing.text
    assert token.status_code == 400 and "not served on the token endpoint" in token.text
    assert identity.status_code == 400 and "not served on the identity endpoint" in identity.text
    assert timeout.status_code == 400 and "timeout_sec must be a whole number of seconds" in timeout.text
    assert {r.headers["metadata-flavor"] for r in (listing, token, identity, timeout)} == {"Google"}


# ---- clients: a subscription is a request per change, not a spin ------------------------------------------
async def test_a_subscribe_loop_with_a_raw_client_makes_a_request_per_change_not_a_spin(
    daemon: Daemon, mds: httpx.AsyncClient
) -> None:
    """What Go's Subscribe does (GET, then GET ?wait_for_change=true&last_etag=<the answer's ETag> in a
    loop), for 3 s of a value that does not change: the initial GET and one held wait."""
    made = 0
    with anyio.move_on_after(3):
        answer = await mds.get(PROJECT_ID)
        made += 1
        while True:
            params = {"wait_for_change": "true", "last_etag": answer.headers.get("etag", "")}
            answer = await mds.get(PROJECT_ID, params=params)
            made += 1
    assert made <= 2, f"{made} requests in 3 s"


@pytest.fixture(scope="session")
def go_subscriber(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SUBSCRIBE_GO built offline against Debian's cloud.google.com/go/compute/metadata (as the client
    matrix builds tests/clients/go; without the toolchain: skipped, failed in CI)."""
    go = shutil.which("go")
    if go is None:
        unavailable("go is not installed (apt-get install golang-go)")
    if not (GOPATH / "src" / "cloud.google.com/go/compute/metadata").is_dir():
        unavailable("the Go sources are not installed (apt-get install golang-google-cloud-compute-metadata-dev)")
    out = tmp_path_factory.mktemp("go-subscribe")
    (out / "subscribe.go").write_text(SUBSCRIBE_GO)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(out),
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOCACHE": str(out / "cache"),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    result = subprocess.run(
        [go, "build", "-o", str(out / "subscribe"), str(out / "subscribe.go")],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"go build of the Subscribe client failed:\n{result.stderr[-2000:]}", pytrace=False)
    return out / "subscribe"


async def test_go_metadata_subscribe_makes_a_request_per_change_not_a_spin(
    daemon: Daemon, go_subscriber: Path, tmp_path: Path
) -> None:
    """Unmodified `metadata.Subscribe("project/project-id", fn)` for 3 s: fn runs once (the value never
    changes) and the listener answers one request (the held wait is dropped when the program exits)."""
    facts = await run_client([str(go_subscriber), "project/project-id", "3"], client_env(daemon, tmp_path / "home"))
    assert facts == {"calls": 1, "value": "demo-project"}, facts
    await wait_until(lambda: api(daemon).held == 0, what="the held wait outlived its client")
    assert requests_answered(daemon, PROJECT_ID) == 1


SUBSCRIBE_GO = """// Subscribe to a metadata value (argv[1]) for argv[2] seconds with unmodified
// cloud.google.com/go/compute/metadata; print how often the callback ran and the last value, as JSON.
package main

import (
	"encoding/json"
	"os"
	"strconv"
	"sync"
	"time"

	"cloud.google.com/go/compute/metadata"
)

func main() {
	seconds, _ := strconv.Atoi(os.Args[2])
	var mu sync.Mutex
	calls, last := 0, ""
	failed := make(chan error, 1)
	go func() {
		failed <- metadata.Subscribe(os.Args[1], func(v string, ok bool) error {
			mu.Lock()
			defer mu.Unlock()
			calls++
			last = v
			return nil
		})
	}()
	facts := map[string]interface{}{}
	select {
	case err := <-failed:
		facts["error"] = err.Error()
	case <-time.After(time.Duration(seconds) * time.Second):
	}
	mu.Lock()
	facts["calls"], facts["value"] = calls, last
	mu.Unlock()
	out, _ := json.Marshal(facts)
	os.Stdout.Write(append(out, '\\n'))
}
"""


# ---- bounds: deadlines, caps, clients that leave, stopping ------------------------------------------------
def _daemon(tmp_path: Path, files: FileSet, upstreams: Upstreams, **listener: Any) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config()},
                "tokens": {"gcp": metadata_token_config(upstreams)},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "metadata": {
                        "address": "127.0.0.1:0",
                        "token": "gcp",
                        "email": EMAIL,
                        "project_id": "p",
                        **listener,
                    },
                },
            }
        )
    )


@pytest.fixture
def upstreams(upstreams: Upstreams, files: FileSet, ca: CertificateAuthority) -> Upstreams:
    """The shared emulator (conftest), and a valid identity in `files` for every daemon here."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    return upstreams


async def _exchange(stream: anyio.abc.ByteStream, data: bytes, answers: int = 1) -> bytes:
    """Send `data` and read until `answers` complete answers (status line + headers + body) arrived."""
    await stream.send(data)
    received = b""
    with anyio.fail_after(30):
        while received.count(b"HTTP/1.1 ") < answers or not _complete(received, answers):
            received += await stream.receive()
    return received


def _complete(received: bytes, answers: int) -> bool:
    rest = received
    for _ in range(answers):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
        if len(rest) < length:
            return False
        rest = rest[length:]
    return True


def _wait_request(last_etag: str = "", timeout_sec: int = 60, close: bool = False) -> bytes:
    query = f"wait_for_change=true&timeout_sec={timeout_sec}" + (f"&last_etag={last_etag}" if last_etag else "")
    return (
        f"GET {PROJECT_ID}?{query} HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()


async def test_a_held_wait_outlives_the_idle_and_request_deadlines(
    tmp_path: Path, files: FileSet, upstreams: Upstreams
) -> None:
    d = _daemon(tmp_path, files, upstreams, idle_timeout=0.2, request_timeout=0.2)
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        async with await anyio.connect_tcp("127.0.0.1", d.metadata_port) as stream:
            await stream.send(_wait_request(timeout_sec=2))  # held ten times the idle and request deadlines
            await wait_until(lambda: api(d).held == 1, what="the wait was never held")
            answer = await _exchange(stream, b"")
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\np")


async def test_a_request_pipelined_behind_a_held_wait_is_answered_after_it(
    tmp_path: Path, files: FileSet, upstreams: Upstreams
) -> None:
    d = _daemon(tmp_path, files, upstreams)
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        async with await anyio.connect_tcp("127.0.0.1", d.metadata_port) as stream:
            await stream.send(_wait_request(timeout_sec=1))
            await wait_until(lambda: api(d).held == 1, what="the wait was never held")
            second = f"GET {V1}project/numeric-project-id HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"
            answers = await _exchange(stream, second.encode(), answers=2)
    first, _, rest = answers.partition(b"HTTP/1.1 200 OK")[2].partition(b"HTTP/1.1 200 OK")
    assert first.endswith(b"\r\n\r\np") and rest.endswith(b"\r\n\r\n0")


async def test_held_waits_are_capped_per_caller_and_the_rest_get_503_with_retry_after(
    tmp_path: Path, files: FileSet, upstreams: Upstreams
) -> None:
    d = _daemon(tmp_path, files, upstreams, max_connections_per_caller=4)  # at most 2 held per uid
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        held = [await anyio.connect_tcp("127.0.0.1", d.metadata_port) for _ in range(2)]
        try:
            for stream in held:
                await stream.send(_wait_request())
            await wait_until(lambda: api(d).held == 2, what="the waits were never held")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metadata_port}", headers=FLAVOR) as c:
                over = await c.get(PROJECT_ID, params={"wait_for_change": "true"})
                plain = await c.get(PROJECT_ID)
        finally:
            for stream in held:
                await stream.aclose()
        await wait_until(lambda: api(d).held == 0, what="the waits outlived their clients")
    assert over.status_code == 503 and over.headers["retry-after"] == "5"
    assert over.headers["metadata-flavor"] == "Google" and "too many wait_for_change requests held" in over.text
    assert plain.status_code == 200  # the caller keeps room for ordinary requests


async def test_a_held_wait_is_dropped_when_its_client_goes_away(
    tmp_path: Path, files: FileSet, upstreams: Upstreams
) -> None:
    d = _daemon(tmp_path, files, upstreams)
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        stream = await anyio.connect_tcp("127.0.0.1", d.metadata_port)
        await stream.send(_wait_request(timeout_sec=MAX_WAIT_SECONDS))
        await wait_until(lambda: api(d).held == 1, what="the wait was never held")
        await stream.aclose()
        await wait_until(lambda: api(d).held == 0, what="the wait was held after its client left")
        loop = next(loop for loop in d.listeners.accept_loops if loop.name == "metadata")
        await wait_until(lambda: loop.counter.total == 0, what="the connection is still counted")


async def test_stopping_the_daemon_answers_held_waits_at_once(
    tmp_path: Path, files: FileSet, upstreams: Upstreams
) -> None:
    d = _daemon(tmp_path, files, upstreams)
    answer = b""
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        async with await anyio.connect_tcp("127.0.0.1", d.metadata_port) as stream:
            await stream.send(_wait_request(timeout_sec=MAX_WAIT_SECONDS))
            await wait_until(lambda: api(d).held == 1, what="the wait was never held")
            d.stop()
            answer = await _exchange(stream, b"")
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in answer and answer.endswith(b"p")


async def test_a_held_wait_whose_client_sent_a_byte_then_left_is_released(
    tmp_path: Path,
    files: FileSet,
    upstreams: Upstreams,
) -> None:
    """A client that sent one more byte (the start of a pipelined request) and then closed kept its hold, and
    its connection slot, until timeout_sec (a tester found it: CLOSE-WAIT sockets counted for an hour)."""
    d = _daemon(tmp_path, files, upstreams)
    async with in_background(d.run, d.stop):
        assert d.metadata_port is not None
        stream = await anyio.connect_tcp("127.0.0.1", d.metadata_port)
        await stream.send(_wait_request(timeout_sec=MAX_WAIT_SECONDS))
        await wait_until(lambda: api(d).held == 1, what="the wait was never held")
        await stream.send(b"G")  # the first byte of a pipelined request: the watcher stops here
        await anyio.sleep(0.2)  # let the watcher read it (no observable state for "read one chunk")
        await stream.aclose()
        loop = next(loop for loop in d.listeners.accept_loops if loop.name == "metadata")
        await wait_until(lambda: api(d).held == 0, 15, "the wait was held after its client left")
        await wait_until(lambda: loop.counter.total == 0, 5, "the connection is still counted")
