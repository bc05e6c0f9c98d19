"""Envoy's SDS made observable: /v1/status workload_api.sds (open streams, streams on a NACKed version,
pushes, NACKs, the last NACK's resource names and time), the wlidd_sds_* metrics (labelled by method only),
and the `wlidd status` line. Judged against a real daemon through the Envoy stand-in (tests.sds_envoy), and
on the counting core (wlidd.workload_api.sds_counts) and the status model (wlidd.status) without sockets.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FileSet, in_background, wait_until
from tests.test_sds import envoy, make_daemon, sha, socket_of
from tests.test_status_model import full_status, over_the_wire
from wlidd.cli.client_commands import render_status
from wlidd.client import AsyncClient
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.errors import InvalidValue
from wlidd.metrics import Metrics
from wlidd.status import SdsNack, SdsStatus, Status, WorkloadApiStatus, parse_status
from wlidd.workload_api.sds_counts import LOGGED_NAME_LENGTH, LOGGED_NAMES, SdsCounts, verdict
from wlidd.workload_api.sds_protocol import Received

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
SDS_SERIES = ("wlidd_sds_streams", "wlidd_sds_streams_nacked", "wlidd_sds_pushes_total", "wlidd_sds_nacks_total")


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of the wlidd_sds_* samples in a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in SDS_SERIES:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def sample(exposition: str, name: str, method: str) -> float:
    return samples(exposition)[(name, (("method", method),))]


async def get(d: Daemon, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path))) as http:
        return await http.get(f"http://wlidd{path}")


async def sds_status(d: Daemon) -> dict[str, Any]:
    document: dict[str, Any] = (await get(d, "/v1/status")).json()
    return dict(document["workload_api"]["sds"])


@pytest.fixture
async def daemon(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = make_daemon(tmp_path / "workload.sock", {"default": files.config()})
    async with in_background(d.run, d.stop):
        yield d


def counted(d: Daemon) -> SdsCounts:
    assert d.workload_api is not None and d.workload_api.sds is not None
    return d.workload_api.sds.counts


# ---- against a daemon, through the Envoy stand-in -----------------------------------------------------------


async def test_a_nack_shows_in_status_and_metrics_until_envoy_accepts_the_next_rotation(
    daemon: Daemon, files: FileSet, ca: CertificateAuthority
) -> None:
    counts = counted(daemon)
    assert await sds_status(daemon) == {"streams": 0, "streams_nacked": 0, "pushes": 0, "nacks": 0, "last_nack": None}
    metrics = (await get(daemon, "/metrics")).text
    assert all(sample(metrics, "wlidd_sds_nacks_total", m) == 0 for m in ("StreamSecrets", "DeltaSecrets"))
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default", "ROOTCA"], node={"id": "sidecar-7", "cluster": "payments"})
        await client.next("s")
        before = dt.datetime.now(dt.UTC)
        await client("nack", "s", error="Failed to load certificate chain from <inline>")
        await wait_until(lambda: counts.streams_nacked == 1, what="the NACK")
        after = dt.datetime.now(dt.UTC)

        status = await sds_status(daemon)
        at = dt.datetime.fromisoformat(status["last_nack"].pop("at").replace("Z", "+00:00"))
        assert before <= at <= after
        assert status == {
            "streams": 1,
            "streams_nacked": 1,
            "pushes": 1,
            "nacks": 1,
            "last_nack": {"resources": ["default", "ROOTCA"], "names": 2},
        }
        metrics = (await get(daemon, "/metrics")).text
        assert sample(metrics, "wlidd_sds_streams", "StreamSecrets") == 1
        assert sample(metrics, "wlidd_sds_streams_nacked", "StreamSecrets") == 1
        assert sample(metrics, "wlidd_sds_nacks_total", "StreamSecrets") == 1
        assert sample(metrics, "wlidd_sds_pushes_total", "StreamSecrets") == 1
        assert "sidecar-7" not in metrics and "payments" not in metrics and "ROOTCA" not in metrics

        files.put(ca.issue_svid())  # the next rotation is pushed, and this time Envoy takes it
        await client.next("s")
        await client("ack", "s")
        await wait_until(lambda: counts.streams_nacked == 0, what="the ACK")
        status = await sds_status(daemon)
        assert (status["streams"], status["pushes"], status["nacks"]) == (1, 2, 1)
        assert status["last_nack"]["resources"] == ["default", "ROOTCA"]  # the last one stays, with its time
        metrics = (await get(daemon, "/metrics")).text
        assert sample(metrics, "wlidd_sds_streams_nacked", "StreamSecrets") == 0
        assert sample(metrics, "wlidd_sds_pushes_total", "StreamSecrets") == 2

        await client("close", "s")
        assert (await client.next("s"))["event"] == "end"
        await wait_until(lambda: counts.streams == 0, what="the stream's end")
    metrics = (await get(daemon, "/metrics")).text
    assert sample(metrics, "wlidd_sds_streams", "StreamSecrets") == 0


async def test_a_stream_that_ends_on_a_nacked_version_is_no_longer_counted_as_nacked(daemon: Daemon) -> None:
    counts = counted(daemon)
    async with envoy(socket_of(daemon)) as client:
        await client("open", "d", kind="delta")
        await client("send", "d", subscribe=["default"])
        await client.next("d")
        await client("nack", "d", error="rejected by the test")
        await wait_until(lambda: counts.streams_nacked == 1, what="the NACK")
        assert counts.last_nack is not None and counts.last_nack.resources == ("default",)
        metrics = (await get(daemon, "/metrics")).text
        assert sample(metrics, "wlidd_sds_nacks_total", "DeltaSecrets") == 1
        assert sample(metrics, "wlidd_sds_nacks_total", "StreamSecrets") == 0
        await client("close", "d")
        assert (await client.next("d"))["event"] == "end"
        await wait_until(lambda: counts.streams == 0, what="the stream's end")
    assert counts.streams_nacked == 0 and counts.nacks == 1
    assert sample((await get(daemon, "/metrics")).text, "wlidd_sds_streams_nacked", "DeltaSecrets") == 0


async def test_a_stream_stays_nacked_while_envoy_changes_its_names_on_an_older_version(daemon: Daemon) -> None:
    """After a NACK, Envoy asks for one more name with its last accepted version (none): still nacked; the
    answer to the new names, once acked, ends it."""
    counts = counted(daemon)
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        first = await client.next("s")
        await client("nack", "s", error="rejected by the test")
        await wait_until(lambda: counts.streams_nacked == 1, what="the NACK")
        await client("send", "s", names=["default", "ROOTCA"], version="", nonce=first["nonce"], node=False)
        second = await client.next("s")
        assert counts.streams_nacked == 1 and [r["name"] for r in second["resources"]] == ["default", "ROOTCA"]
        await client("ack", "s")
        await wait_until(lambda: counts.streams_nacked == 0, what="the ACK")


async def test_fetch_secrets_answers_are_counted_as_pushes_of_their_method(daemon: Daemon) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("fetch", "f", names=["default"])
        assert (await client.next("f"))["event"] == "response"
    await wait_until(lambda: counted(daemon).pushes == 1, what="the answer counted")
    metrics = (await get(daemon, "/metrics")).text
    assert sample(metrics, "wlidd_sds_pushes_total", "FetchSecrets") == 1
    assert sample(metrics, "wlidd_sds_streams", "StreamSecrets") == 0


async def test_the_status_holds_no_key_material_and_the_client_and_cli_read_the_sds_part(
    daemon: Daemon, files: FileSet
) -> None:
    state = daemon.watchers["default"].current
    assert state is not None
    key = state.identity.svid.key_pem()
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        [secret] = (await client.next("s"))["resources"]
        assert secret["key_sha256"] == sha(key)  # the key was sent …
        await client("nack", "s", error="rejected by the test")
        await wait_until(lambda: counted(daemon).nacks == 1, what="the NACK")
        raw = (await get(daemon, "/v1/status")).text
        assert b"PRIVATE KEY" not in raw.encode() and sha(key) not in raw  # … and is nowhere in the status
        async with AsyncClient(daemon.socket_path) as wlidd:
            status = await wlidd.status()
    assert status.workload_api is not None and status.workload_api.sds is not None
    assert status.workload_api.sds.last_nack is not None
    assert status.workload_api.sds.last_nack.resources == ("default",)
    assert "SDS (Envoy)    1 streams (1 nacked), 1 pushes, 1 NACKs, last 20" in render_status(status)


async def test_the_sds_part_and_series_are_there_while_sds_is_served_and_gone_when_it_is_switched_off(
    daemon: Daemon, tmp_path: Path, files: FileSet
) -> None:
    served = (await get(daemon, "/v1/status")).json()["workload_api"]
    assert served["sds"]["streams"] == 0 and len(samples((await get(daemon, "/metrics")).text)) == 9
    off = make_daemon(
        tmp_path / "off.sock", {"default": files.config()}, unix=tmp_path / "off-wlidd.sock", sds={"enabled": False}
    )
    async with in_background(off.run, off.stop):
        document = (await get(off, "/v1/status")).json()
        metrics = (await get(off, "/metrics")).text
    assert "sds" not in document["workload_api"] and {"streams", "pushes"} <= set(document["workload_api"])
    assert samples(metrics) == {}
    assert "SDS" not in render_status(parse_status(document))


# ---- the counting core ------------------------------------------------------------------------------------


def test_verdict_reads_a_nack_an_ack_and_requests_that_are_neither() -> None:
    assert verdict(Received(("default",), rejected="v1", error="bad", nonce="n1", nack=True)) is True
    assert verdict(Received(("default",), nonce="n1", ack=True)) is False
    assert verdict(Received(("default",), nonce="n1")) is None  # new names, still an older version
    assert verdict(Received(("default",), error="bad", nonce="n1")) is None  # the same NACK again: counted once
    assert verdict(Received(("default",))) is None  # a first request: no response to judge yet
    stale = Received(("default",), stale=True, rejected="v0", error="bad", nonce="old", nack=True)
    assert verdict(stale) is None  # about an older response: counted, but says nothing of the last one


def test_the_last_nack_keeps_the_first_names_cut_short_with_their_count_and_time() -> None:
    counts = SdsCounts(None, lambda: T0)
    names = [f"spiffe://example.org/{i}/" + "x" * 400 for i in range(LOGGED_NAMES + 5)]
    counts.nack("StreamSecrets", names)
    assert counts.last_nack is not None
    assert len(counts.last_nack.resources) == LOGGED_NAMES and counts.last_nack.names == LOGGED_NAMES + 5
    assert all(len(name) == LOGGED_NAME_LENGTH for name in counts.last_nack.resources)
    assert counts.last_nack.at == T0 and counts.status().nacks == 1


def test_every_sds_series_exists_at_zero_from_the_start_labelled_by_method_only() -> None:
    metrics = Metrics()
    SdsCounts(metrics, lambda: T0)
    found = samples(metrics.exposition().decode())
    streams = [
        (name, (("method", m),))
        for name in SDS_SERIES
        if "pushes" not in name
        for m in ("StreamSecrets", "DeltaSecrets")
    ]
    pushes = [("wlidd_sds_pushes_total", (("method", m),)) for m in ("StreamSecrets", "DeltaSecrets", "FetchSecrets")]
    assert found == dict.fromkeys(streams + pushes, 0.0)


# ---- the status model and the CLI line ----------------------------------------------------------------------


def with_sds(sds: SdsStatus | None) -> Status:
    status = full_status()
    assert status.workload_api is not None
    workload = WorkloadApiStatus(
        status.workload_api.streams, status.workload_api.pushes, status.workload_api.last_push, sds
    )
    return Status(status.daemon, status.identities, status.tokens, status.listeners, status.sink_problems, workload)


def test_an_sds_part_survives_json_and_parses_back_equal() -> None:
    for sds in (SdsStatus(3, 1, 12, 2, SdsNack(("default", "ROOTCA"), 2, T0)), SdsStatus(0, 0, 0, 0, None)):
        status = with_sds(sds)
        document = over_the_wire(status)
        assert list(document["workload_api"]) == ["streams", "pushes", "last_push", "sds"]
        assert parse_status(document) == status


def test_a_document_from_a_daemon_without_sds_parses_with_sds_none() -> None:
    document = over_the_wire(full_status())
    assert "sds" not in document["workload_api"]
    parsed = parse_status(document)
    assert parsed.workload_api is not None and parsed.workload_api.sds is None


def test_a_malformed_sds_part_is_refused_naming_the_field() -> None:
    document = over_the_wire(with_sds(SdsStatus(1, 0, 1, 1, SdsNack(("default",), 1, T0))))
    document["workload_api"]["sds"]["last_nack"]["names"] = "1"
    with pytest.raises(InvalidValue, match=r"status\.workload_api\.sds\.last_nack\.names: expected an integer"):
        parse_status(json.loads(json.dumps(document)))


def test_the_cli_line_shows_counts_and_the_last_nacks_first_names() -> None:
    nack = SdsNack(("default", "ROOTCA", "ALL", "spiffe://example.org"), 7, T0)
    rendered = render_status(with_sds(SdsStatus(3, 1, 12, 2, nack)))
    line = next(line for line in rendered.splitlines() if line.startswith("SDS (Envoy)"))
    assert line == (
        "SDS (Envoy)    3 streams (1 nacked), 12 pushes, 2 NACKs, last 2030-01-02T03:04:05Z for default, ROOTCA, "
        "ALL +4 more"
    )
    quiet = render_status(with_sds(SdsStatus(0, 0, 0, 0, None))).splitlines()
    assert "SDS (Envoy)    0 streams (0 nacked), 0 pushes, 0 NACKs" in quiet
    every = render_status(with_sds(SdsStatus(1, 1, 1, 1, SdsNack((), 0, T0))))
    assert "last 2030-01-02T03:04:05Z for every resource (no name)" in every


def test_the_cli_line_shows_no_terminal_escape_an_envoy_put_in_a_resource_name() -> None:
    nack = SdsNack(("\x1b]0;owned\x07default\nnext", "x" * 300), 2, T0)
    rendered = render_status(with_sds(SdsStatus(1, 1, 1, 1, nack)))
    assert "\x1b" not in rendered and "\x07" not in rendered
    assert "for ?]0;owned?default?next, " + "x" * 64 + "\n" in rendered + "\n"
