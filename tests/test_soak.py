"""Rotation soak (`make soak`, not part of `make test`): fast GCE-style rotations, bad sets mixed in,
continuous mTLS handshakes. Nothing expired may ever be presented and no handshake may fail. And the sink
soak: hundreds of rotations of a real daemon while event-driven and random readers check every pair they
read from its sinks.

SOAK_SECONDS sets the duration of the first (default 60), SOAK_ROTATIONS the rotations of the second
(default 500).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import anyio
import pytest
from anyio.streams.tls import TLSListener
from cryptography import x509

from tests.conftest import TD
from tests.test_sink_atomic import FILES_CONSUMERS, run_rotations
from wlidd.config import parse_identity_config
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.svid.load.source import CredentialSource
from wlidd.tlsctx import HotServerContext, build_client_context
from wlidd.watch import CredentialWatcher

pytestmark = pytest.mark.soak


async def test_rotation_soak_never_presents_an_expired_leaf_nor_fails_a_handshake(tmp_path: Path) -> None:
    duration = float(os.environ.get("SOAK_SECONDS", "60"))
    ca = CertificateAuthority(TD)
    writer = GceCredentialWriter(tmp_path / "secrets")
    first = ca.issue_svid(ttl=dt.timedelta(seconds=4))
    writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
    config = parse_identity_config(
        {"source": "gce", "dir": writer.link, "mismatch_retries": 4, "mismatch_retry_delay": 0.1, "debounce": 0.02}
    )
    watcher = CredentialWatcher("soak", CredentialSource("soak", config))
    hot = HotServerContext(watcher.current_tls)
    client_svid = ca.issue_svid("/ns/soak/sa/client", ttl=dt.timedelta(hours=2))
    client = build_client_context(
        build_identity(
            CredentialFiles("c", client_svid.chain_pem, client_svid.key_pem, own_bundle=ca.bundle_pem),
            dt.datetime.now(dt.UTC),
        )
    )
    counts = {"handshakes": 0, "failures": 0, "expired": 0, "rotations": 0, "bad_sets": 0}
    stop = threading.Event()
    lock = threading.Lock()

    def probe(port: int) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, client.wrap_socket(raw) as tls:
                    leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                    expired = leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC)
                    with lock:
                        counts["handshakes"] += 1
                        counts["expired"] += expired
            except (OSError, ssl.SSLError):
                with lock:
                    counts["failures"] += 1

    async def handle(stream: anyio.abc.ByteStream) -> None:
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = tcp.extra(anyio.abc.SocketAttribute.local_port)
        listener = TLSListener(tcp, hot.context, standard_compatible=False)
        tg.start_soon(listener.serve, handle)
        threads = [threading.Thread(target=probe, args=(port,), daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            await anyio.sleep(0.4)
            if counts["rotations"] % 7 == 3:  # a damaged set now and then: must be refused, old kept
                svid = ca.issue_svid(ttl=dt.timedelta(seconds=4))
                writer.rotate(gce_files(svid.chain_pem[:200], svid.key_pem, ca_pem=ca.bundle_pem))
                counts["bad_sets"] += 1
                await anyio.sleep(0.2)
            svid = ca.issue_svid(ttl=dt.timedelta(seconds=4))
            writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
            counts["rotations"] += 1
        stop.set()
        await anyio.to_thread.run_sync(lambda: [t.join(10) for t in threads])
        watcher.close()
        tg.cancel_scope.cancel()
    await listener.aclose()
    print(f"\nsoak {duration:.0f}s: {counts}, published {watcher.stats.updates}, rejected {watcher.stats.rejections}")
    assert counts["failures"] == 0 and counts["expired"] == 0
    assert counts["handshakes"] > counts["rotations"]
    assert watcher.stats.rejections >= counts["bad_sets"] > 0


def test_sink_soak_event_driven_and_random_readers_never_read_a_mismatched_pair(tmp_path: Path) -> None:
    """A real `wlidd run` rotated SOAK_ROTATIONS times (GCE-style source, a new SVID each time), its "files"
    and "spiffe-fs" sinks read all along by separate processes: reloading on the first inotify event
    (through ..data, and through the stable names as Go's LoadX509KeyPair does), Envoy's watched_directory
    (IN_MOVED_TO), a random reader through ..data and a random reader of the single-file credential bundle.
    Every pair read must be a key with its own chain, verifying to the bundle: 0 mismatches."""
    rotations = int(os.environ.get("SOAK_ROTATIONS", "500"))
    results = run_rotations(tmp_path, rotations, layouts=("files", "spiffe-fs"))
    print(f"\nsink soak, {rotations} rotations: {results}")
    assert {kind: counts["mismatches"] for kind, counts in results.items()} == dict.fromkeys(
        (*FILES_CONSUMERS, "random-single"), 0
    ), results
    assert results["envoy"]["reads"] >= rotations // 2 and results["first-event-data"]["reads"] >= rotations // 2
