"""The typed /v1/status model (wlidd.status): the daemon produces it, wlidd.client parses it, `wlidd status`
prints it. A document round-trips (produce → JSON → parse gives an equal value), the daemon's own answer
re-serializes to the very JSON it sent (no key left out of the model), and a malformed answer is the
client's ClientError `bad_response` naming the field — never a KeyError or TypeError."""

from __future__ import annotations

import copy
import datetime as dt
import http.server
import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FileSet, in_background
from tests.test_tokens import metadata_token_config
from wlidd.cli import main
from wlidd.cli.client_commands import render_status
from wlidd.client import AsyncClient, Client, ClientError
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.errors import InvalidValue
from wlidd.health import health
from wlidd.lifecycle import State
from wlidd.status import (
    BundleTrouble,
    DaemonStatus,
    FailingSink,
    IdentityStatus,
    ListenerStatus,
    Outcome,
    Status,
    TokenStatus,
    UpstreamFailure,
    WaitingFor,
    WorkloadApiStatus,
    parse_status,
    to_json,
)
from wlidd.status_report import status_of
from wlidd.watch import CredentialWatcher

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def full_status() -> Status:
    """Every part of the document, every optional field set (and one identity and token with none)."""
    loaded = IdentityStatus(
        source="files",
        path="/etc/wlidd/chain.pem",
        valid=True,
        required=True,
        spiffe_id="spiffe://example.org/ns/default/sa/app",
        serial="0a1b2c",
        not_before=T0 - HOUR,
        not_after=T0 + HOUR,
        seconds_left=3600,
        trust_domains=("example.org", "other.org"),
        last_loaded=T0,
        last_checked=T0,
        last_error=Outcome("chain_bad_pem", "chain.pem: not base64", T0),
        last_rejection=Outcome(None, "refused", None),
        bundle_problems=(BundleTrouble("other.org", "file_missing", "gone", True),),
        reloads=3,
        retries=1,
        updates=2,
        rejections=1,
        warnings=("key file readable by group",),
        origin="/etc/wlidd",
        version=2,
    )
    never = IdentityStatus(
        "gce", "/run/gce", False, False, None, None, None, None, None, (), None, None, None, None, (), 0, 0, 0, 0, ()
    )
    failing = TokenStatus(
        flow="x509-sts",
        identity="default",
        valid=False,
        required=True,
        on_demand=False,
        expire_time=T0 + HOUR,
        seconds_left=0,
        last_refresh=T0 - HOUR,
        next_refresh=T0 + dt.timedelta(seconds=30),
        failures=4,
        upstream_calls=9,
        last_error=UpstreamFailure("sts_unavailable", 503, "the STS answered 503", False, T0),
    )
    fresh = TokenStatus("gce-metadata", None, True, False, True, None, None, None, None, 0, 0, None)
    return Status(
        daemon=DaemonStatus("starting", WaitingFor(("default",), ("gcp",)), "1.2.3", 4242, T0, 61, T0 + HOUR),
        identities={"default": loaded, "late": never},
        tokens={"gcp": failing, "mds": fresh},
        listeners={
            "unix": ListenerStatus("/run/wlidd/wlidd.sock", True, None, 1, 1, 128, 32, 10, 0),
            "metrics": ListenerStatus("127.0.0.1:9464", False, "OSError: boom", 0, 0, 64, 8, 3, 2),
        },
        sink_problems={"/run/out": FailingSink("identity", "default", "Not a directory: /run/out")},
        workload_api=WorkloadApiStatus(2, 5, {"default": T0}),
    )


def over_the_wire(status: Status) -> Any:
    return json.loads(json.dumps(to_json(status)))


def test_a_full_status_survives_json_and_parses_back_equal() -> None:
    status = full_status()
    assert parse_status(over_the_wire(status)) == status


def test_a_status_without_its_optional_parts_parses_back_equal_and_leaves_them_out_of_the_json() -> None:
    status = Status(
        DaemonStatus("running", WaitingFor(), "1.2.3", 1, T0, 0, T0),
        identities={},
        tokens={},
        listeners={},
        sink_problems={},
    )
    document = over_the_wire(status)
    assert list(document) == ["daemon", "identities", "tokens", "listeners", "sink_problems"]  # no workload_api
    assert document["daemon"]["waiting_for"] == {"identities": [], "tokens": []}
    assert parse_status(document) == status


def test_times_are_rfc3339_with_z_and_keep_their_microseconds() -> None:
    document = over_the_wire(full_status())
    assert document["daemon"]["started_at"] == "2030-01-02T03:04:05.678901Z"
    assert parse_status(document).daemon.started_at == T0


def test_an_identity_not_loaded_yet_has_no_origin_or_version_keys() -> None:
    identities = over_the_wire(full_status())["identities"]
    assert list(identities["default"])[-2:] == ["origin", "version"]
    assert "origin" not in identities["late"] and "version" not in identities["late"]


def test_keys_a_newer_daemon_adds_are_ignored() -> None:
    document = over_the_wire(full_status())
    document["daemon"]["build"] = "abc"
    document["identities"]["default"]["something_new"] = {"x": 1}
    document["future_section"] = []
    assert parse_status(document) == full_status()


async def test_a_status_made_from_loaded_watchers_round_trips(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    loaded = CredentialWatcher("default", files.source())
    assert await loaded.reload("start")
    missing = CredentialWatcher("absent", FileSet(tmp_path / "absent").source(mismatch_retries=1))
    assert not await missing.reload("start")
    watchers = {"default": loaded, "absent": missing}
    now = loaded.clock()
    status = status_of(now, health(now, State.READY, watchers, {}, []), T0, watchers, {}, {}, None)
    assert status.identities["default"].version == 1 and status.identities["absent"].last_error is not None
    assert parse_status(over_the_wire(status)) == status


async def test_the_daemons_own_answer_reserializes_to_the_same_json(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """Every key the daemon sends is in the model: parse then write gives the document back, unchanged."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    listeners = {
        "unix": {"path": str(tmp_path / "wlidd.sock")},
        "workload_api": {"path": str(tmp_path / "workload.sock")},
        "metrics": {"address": "127.0.0.1:0"},
    }
    tokens = {"mds": metadata_token_config(upstreams)}
    d = Daemon(
        Config.model_validate({"identities": {"default": files.config()}, "tokens": tokens, "listeners": listeners})
    )
    async with in_background(d.run, d.stop):
        await d.tokens["mds"].wait_until_servable(10)
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path))) as http:
            document = (await http.get("http://wlidd/v1/status")).json()
        async with AsyncClient(d.socket_path) as client:
            status = await client.status()
    assert to_json(parse_status(document)) == document
    assert set(document) == {"daemon", "identities", "tokens", "listeners", "sink_problems", "workload_api"}
    assert status.tokens["mds"].valid and status.identities["default"].valid
    assert set(status.listeners) == {"unix", "workload_api", "metrics"}
    assert "IDENTITY" in render_status(status)


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 and the server's `body`."""

    def do_GET(self) -> None:
        body: bytes = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    body = b"{}"


@pytest.fixture
def canned(tmp_path: Path) -> Iterator[tuple[Path, Callable[[object], None]]]:
    """A Unix socket answering every request with the JSON given to the returned setter."""
    path = tmp_path / "canned.sock"
    server = _UnixServer(str(path), _Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answer(document: object) -> None:
        server.body = json.dumps(document).encode()

    try:
        yield path, answer
    finally:
        server.shutdown()
        server.server_close()


def _set(path: tuple[object, ...], value: object) -> Callable[[Any], None]:
    def change(document: Any) -> None:
        for key in path[:-1]:
            document = document[key]
        document[path[-1]] = value

    return change


def _drop(*path: object) -> Callable[[Any], None]:
    def change(document: Any) -> None:
        for key in path[:-1]:
            document = document[key]
        del document[path[-1]]

    return change


MALFORMED: list[tuple[str, Callable[[Any], None], str]] = [
    ("no daemon section", _drop("daemon"), "status: 'daemon' is missing"),
    ("an unknown state", _set(("daemon", "state"), "sleeping"), "status.daemon.state: expected one of starting"),
    ("a pid as a string", _set(("daemon", "pid"), "12"), "status.daemon.pid: expected an integer, got str"),
    ("an uptime as a bool", _set(("daemon", "uptime_seconds"), True), "expected an integer, got bool"),
    ("identities as a list", _set(("identities",), []), "status.identities: expected an object, got list"),
    ("an identity without valid", _drop("identities", "default", "valid"), "status.identities['default']: 'valid'"),
    ("a time without offset", _set(("identities", "default", "last_loaded"), "2030-01-01T00:00:00"), "with its offset"),
    ("a time that is no time", _set(("daemon", "now"), "yesterday"), "status.daemon.now: expected an RFC 3339 time"),
    ("trust domains as a string", _set(("identities", "default", "trust_domains"), "x"), "expected a list, got str"),
    ("a bundle problem as null", _set(("identities", "default", "bundle_problems"), [None]), "bundle_problems[0]"),
    ("permanent as a string", _set(("tokens", "gcp", "last_error", "permanent"), "no"), "expected true or false"),
    ("a listener cap as null", _set(("listeners", "unix", "max_connections"), None), "expected an integer, got null"),
    ("a sink problem without error", _drop("sink_problems", "/run/out", "error"), "'error' is missing"),
    ("a last push as a number", _set(("workload_api", "last_push", "default"), 17), "last_push['default']"),
    ("the daemon section as a string", _set(("daemon",), "up"), "status.daemon: expected an object, got str"),
]


@pytest.mark.parametrize(("change", "expected"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_status_is_a_client_error_naming_the_field(
    canned: tuple[Path, Callable[[object], None]], change: Callable[[Any], None], expected: str
) -> None:
    path, answer = canned
    document = copy.deepcopy(over_the_wire(full_status()))
    change(document)
    answer(document)
    with Client(path) as client, pytest.raises(ClientError) as caught:
        client.status()
    assert caught.value.reason == "bad_response" and caught.value.status == 200
    assert caught.value.message.startswith("wlidd answered a malformed status: ")
    assert expected in caught.value.message


def test_the_parser_refuses_with_invalid_value_and_nothing_else() -> None:
    for _, change, expected in MALFORMED:
        document = copy.deepcopy(over_the_wire(full_status()))
        change(document)
        with pytest.raises(InvalidValue) as caught:
            parse_status(document)
        assert caught.value.reason == "json_document" and expected in caught.value.message
    for document in (None, [], "status", 3, {"daemon": None}):
        with pytest.raises(InvalidValue):
            parse_status(document)


async def test_the_async_client_refuses_a_malformed_status_too(canned: tuple[Path, Callable[[object], None]]) -> None:
    path, answer = canned
    answer({"daemon": {"state": "running"}})
    async with AsyncClient(path) as client:
        with pytest.raises(ClientError) as caught:
            await client.status()
    assert caught.value.reason == "bad_response" and "status.daemon: 'waiting_for' is missing" in caught.value.message


def test_a_malformed_token_answer_is_a_client_error_that_does_not_show_the_token(
    canned: tuple[Path, Callable[[object], None]],
) -> None:
    path, answer = canned
    answer({"access_token": "ya29.secret-token-value", "token_type": "Bearer", "expire_time": "2030-01-01T00:00:00Z"})
    with Client(path) as client, pytest.raises(ClientError) as caught:
        client.get_token("gcp")
    assert caught.value.reason == "bad_response" and "token: 'expires_in' is missing" in caught.value.message
    assert "secret-token-value" not in str(caught.value)


def test_wlidd_status_against_a_malformed_answer_says_so_and_exits_1_without_a_traceback(
    canned: tuple[Path, Callable[[object], None]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, answer = canned
    document = over_the_wire(full_status())
    del document["identities"]["default"]["serial"]
    answer(document)
    assert main(["status", "--socket", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wlidd: error: wlidd answered a malformed status: ") and "'serial' is missing" in err
    assert "Traceback" not in err


def test_wlidd_status_json_prints_the_document_the_daemon_sent(
    canned: tuple[Path, Callable[[object], None]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, answer = canned
    document = over_the_wire(full_status())
    answer(document)
    assert main(["status", "--socket", str(path), "--json"]) == 1  # "starting" is not "running"
    assert json.loads(capsys.readouterr().out) == document
