"""Faults in wlidd's SDS found by a tester playing Envoy (the xDS protocol) and a hostile local user.

Each test failed on the code it was written against (issue 18's first build). Real daemons on real Unix
sockets; the Envoy stand-in (tests.sds_envoy) or a raw HTTP/2 client (tests.test_hostile_workload_api)
connected as nobody. Waits are on observable state: a response, a counter, a stream's end; the memory
test waits until the daemon stops opening its flow-control windows (as RawGrpc.push does).

xDS rules cited: envoy api-docs/xds_protocol ("How the client specifies what resources to return",
"Unsubscribing From Resources", "ACK/NACK and resource type instance version"); DiscoveryRequest.error_detail.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h2.settings
import pytest
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]

from tests.conftest import FileSet, in_background, wait_until
from tests.test_hostile_workload_api import DaemonProcess, RawGrpc
from tests.test_sds import envoy, make_daemon, socket_of
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, spiffe_bundle

APP = "spiffe://example.org/ns/default/sa/app"
OTHER = "spiffe://example.org/ns/default/sa/other"
NOBODY = 65534
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@pytest.fixture
async def daemon(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> AsyncIterator[Daemon]:
    """One identity (APP) with other.org federated (the bundle file in a directory of its own)."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    federated = tmp_path / "federated" / "partner.json"
    federated.parent.mkdir()
    federated.write_text(json.dumps(spiffe_bundle(foreign_ca.root)))
    d = make_daemon(tmp_path / "workload.sock", {"default": files.config(bundles={"other.org": federated})})
    async with in_background(d.run, d.stop):
        yield d


def sds_of(d: Daemon) -> Any:
    assert d.workload_api is not None and d.workload_api.sds is not None
    return d.workload_api.sds


async def test_an_empty_resource_list_after_a_subscription_unsubscribes_and_pushes_no_key(daemon: Daemon) -> None:
    """xDS: the legacy wildcard (no names) holds only until the client names a resource; after that an
    empty resource_names is an unsubscription. wlidd answers it with every secret the caller has."""
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        first = await client.next("s")
        await client("send", "s", names=[], version=first["version"], nonce=first["nonce"], node=False)
        # a barrier: a NACK of the first response (counted) read after the unsubscription; a NACK counts only
        # when it answers a response the stream sent (F4), so the barrier names the first response's nonce
        await client("send", "s", names=[], nonce=first["nonce"], error="late", node=False)
        await wait_until(lambda: sds_of(daemon).nacks == 1, what="the barrier")
        await client("send", "s", names=["ROOTCA"], version=first["version"], nonce=first["nonce"], node=False)
        second = await client.next("s")  # nothing came for the unsubscription: this answers ROOTCA
        assert [r["name"] for r in second["resources"]] == ["ROOTCA"]


async def test_a_subscription_change_after_a_nack_is_not_counted_as_another_nack(daemon: Daemon) -> None:
    """After a NACK Envoy keeps sending its last accepted version_info with the latest nonce on every
    request (here: one more name), without error_detail; only the NACK itself is a NACK."""
    sds = sds_of(daemon)
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        first = await client.next("s")
        await client("nack", "s", error="certificate rejected")
        await wait_until(lambda: sds.nacks == 1, what="the NACK")
        await client("send", "s", names=["default", "ROOTCA"], version="", nonce=first["nonce"], node=False)
        second = await client.next("s")
        assert [r["name"] for r in second["resources"]] == ["default", "ROOTCA"]
        assert sds.nacks == 1


async def test_alternating_resource_names_do_not_write_an_audit_line_per_stream(
    tmp_path: Path, ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """One process that keeps getting the same two certificates is audited once per certificate, whatever
    names it asks them by (AuditOnce's promise: a caller asking in a loop adds nothing to the trail)."""
    mine, other = FileSet(tmp_path / "mine"), FileSet(tmp_path / "other")
    mine.put(ca.issue_svid(), ca.bundle_pem)
    other.put(ca.issue_svid("/ns/default/sa/other"), ca.bundle_pem)
    d = make_daemon(tmp_path / "workload.sock", {"default": mine.config(), "other": other.config()})
    asks = [["default"], [APP], [OTHER]]
    async with in_background(d.run, d.stop), envoy(socket_of(d)) as client:
        for i in range(12):
            await client("open", i, kind="sotw")
            await client("send", i, names=asks[i % 3])
            await client.next(i)
            await client("close", i)
            assert (await client.next(i))["event"] == "end"
    audited = capsys.readouterr().out.count("secrets pushed")
    assert audited <= 4, f"{audited} audit lines for 12 hand-outs of the same 2 certificates"


async def test_a_stale_nonce_is_not_logged_whole(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A response_nonce is the client's text: the debug line of a stale one must be bounded like the
    other client text SDS logs (names, error_detail)."""
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        first = await client.next("s")
        await client("send", "s", names=["default"], version=first["version"], nonce="n" * 300_000, node=False)
        # a barrier: a NACK of the first response (the long nonce was stale: ignored), counted
        await client("send", "s", names=["default"], nonce=first["nonce"], error="late", node=False)
        await wait_until(lambda: sds_of(daemon).nacks == 1, what="the barrier")
    longest = max(len(line) for line in capsys.readouterr().out.splitlines())
    assert longest < 8192, f"a log line of {longest} characters"


# ---- a hostile uid with rights to one identity ---------------------------------------------------------


def connect_as(uid: int, path: Path) -> socket.socket:
    """A Unix socket connected to `path` by a child that dropped to `uid` and no groups (the daemon's
    SO_PEERCRED sees that uid), handed back over SCM_RIGHTS: the test drives it as root."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                socket.send_fds(child, [b"x"], [sock.fileno()])
        finally:
            os._exit(0)
    _, fds, _, _ = socket.recv_fds(parent, 1, 1)
    os.waitpid(pid, 0)
    parent.close()
    child.close()
    return socket.socket(fileno=fds[0])


def grpc_frame(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return struct.pack(">?I", False, len(data)) + data


@pytest.mark.skipif(os.geteuid() != 0, reason="the client connects as nobody: needs root")
def test_streams_whose_pushes_are_held_back_hold_a_bounded_amount_of_their_requests(
    tmp_path: Path, shared_dir: Path, ca: CertificateAuthority
) -> None:
    """nobody, allowed one identity, opens 12 StreamSecrets calls (one connection each, at most 16 a uid)
    with an HTTP/2 window of 0, so no push can leave, and sends 1 MiB requests (1,000 names of 1,000
    characters: within the limits) as fast as the daemon opens its windows. The daemon should hold about
    a request or two per stream; it held six (its inbox of four, one more parsed, the one it answers) for
    SEND_TIMEOUT, 30 s: ~8 MB per stream, ~0.5 GB for the 64 calls one uid may open, again and again."""
    files = FileSet(tmp_path / "creds")
    files.put(ca.issue_svid(), ca.bundle_pem)
    node = DaemonProcess(tmp_path, shared_dir, {"default": files})
    node.write({"default": {"users": ["nobody"]}})
    node.start()
    clients: list[tuple[RawGrpc, int]] = []
    try:
        warm = RawGrpc(sock=connect_as(NOBODY, node.workload))  # SDS's modules loaded before the baseline
        call = warm.call(security_header=False, method=SDS + "StreamSecrets")
        warm.h2.send_data(call, grpc_frame(discovery_pb2.DiscoveryRequest(type_url=SECRET, resource_names=["default"])))
        warm.flush()
        assert warm.wait_for_data(call).data_bytes > 0
        warm.close()
        before = node.rss_kb()

        names = ["default"] + [f"spiffe://example.org/{i}/" + "x" * 1000 for i in range(1000)]
        frame = grpc_frame(discovery_pb2.DiscoveryRequest(type_url=SECRET, resource_names=names))
        for _ in range(12):  # a connection each: a stream the daemon stops reading holds its connection's window
            client = RawGrpc(sock=connect_as(NOBODY, node.workload))
            client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            client.flush()
            clients.append((client, client.call(security_header=False, method=SDS + "StreamSecrets")))
        pending = [frame] * len(clients)
        sent = 0
        last = time.monotonic()
        while time.monotonic() - last < 2.0:  # until the daemon opened no window for 2 s
            for index, (client, call) in enumerate(clients):
                if client.closed or client.calls[call].done:
                    continue
                window = min(client.h2.local_flow_control_window(call), client.h2.max_outbound_frame_size)
                if window > 0:
                    chunk = pending[index][:window]
                    client.h2.send_data(call, chunk)
                    client.flush()
                    pending[index] = pending[index][len(chunk) :] or frame
                    sent += pending[index] is frame
                    last = time.monotonic()
                client.receive(0)
        assert not any(client.calls[call].done for client, call in clients)  # all still held back
        grown = (node.rss_kb() - before) / 1024
        assert grown < 12 * 4, f"{grown:.0f} MB held for 12 streams ({sent} requests of 1 MiB taken in)"
    finally:
        for client, _ in clients:
            client.close()
        node.stop()
