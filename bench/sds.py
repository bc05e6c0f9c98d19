"""Envoy SDS on the Workload API socket: rotation-to-push latency, memory per open stream and CPU per push,
at 100 and 1,000 concurrent StreamSecrets streams.

The daemon runs in its own process on a GCE-style credential directory. The streams are held by client
processes (raw grpcio, asyncio; 50 streams each, 10 per connection) that drop to a uid of their own (one
uid may hold 64 calls, as Envoys of different users would) and behave as Envoy's SDS client does: a first
request naming `default` with a node, then an ACK (version_info + response_nonce) for every response. Each
client stamps every response with the wall clock on arrival and reports the served chain's digest. This
process swaps the symlink as the guest agent does and measures, for every stream, swap → new chain.

Baseline in the same run, same clients, same rotations: bench/_sds_baseline.py, bare watchfiles (same
debounce) and a grpcio server pushing the same bytes (the `default` secret read from the files) to every
stream, with no validation, caller identification, policy or per-stream protocol state.

Figures (targets from issue 18): p99 rotation-to-push ≤ 250 ms at 100 streams and ≤ 1 s at 1,000; memory per
open stream ≤ 50 KB (the server's RSS with every stream open and served, minus with the first 10 open and
served, over the streams in between);
CPU per push (the server's user + system time over the rotations, over the pushes), with its ratio to the
baseline's. `--streams 100,1000` (default) picks the scales, `--rotations` the rotations per scale.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Figure, bench_env, percentile, report, rss_mb, start_daemon, stop_daemon  # noqa: E402

from wlidd.emulator.ca import CertificateAuthority  # noqa: E402
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files  # noqa: E402

PER_PROCESS = 50  # streams per client process (one uid each)
PER_CONNECTION = 10  # streams per connection
WARM_UP = 10  # streams opened before the memory baseline is taken
FIRST_UID = 62000
TARGETS_MS = {100: 250.0, 1000: 1000.0}
TARGET_KB_PER_STREAM = 50.0

CLIENTS = """
import asyncio, hashlib, os, sys, time
import grpc, grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
target, count, per_connection, uid, first = sys.argv[1], *map(int, sys.argv[2:6])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
def node(index):
    return base_pb2.Node(id=f"envoy-{index}", cluster="bench", user_agent_name="envoy",
        user_agent_build_version=base_pb2.BuildVersion(version={"major_number": 1, "minor_number": 30}))
async def follow(index, channel):
    call = channel.stream_stream("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        request_serializer=lambda m: m.SerializeToString(), response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
    await call.write(discovery_pb2.DiscoveryRequest(type_url=SECRET, resource_names=["default"], node=node(index)))
    while (response := await call.read()) is not grpc.aio.EOF:
        stamp = time.time()
        secret = secret_pb2.Secret()
        response.resources[0].Unpack(secret)
        digest = hashlib.sha256(secret.tls_certificate.certificate_chain.inline_bytes).hexdigest()[:16]
        sys.stdout.write(f"{index} {digest} {stamp}\\n")
        sys.stdout.flush()
        await call.write(discovery_pb2.DiscoveryRequest(type_url=SECRET, resource_names=["default"], node=node(index),
            version_info=response.version_info, response_nonce=response.nonce))
async def main():
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), ("bench.c", c)])
                for c in range((count + per_connection - 1) // per_connection)]
    await asyncio.gather(*(follow(first + i, channels[i // per_connection]) for i in range(count)))
asyncio.run(main())
"""


def digest(chain_pem: bytes) -> str:
    return hashlib.sha256(chain_pem).hexdigest()[:16]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Clients:
    """The client processes of one run, and what each stream received: {digest: {stream: stamp}}."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.streams = 0
        self.received: dict[str, dict[int, float]] = {}
        self.lock = threading.Lock()
        self.processes: list[subprocess.Popen[str]] = []

    def add(self, streams: int) -> None:
        """`streams` more streams, PER_PROCESS to a process, each process under a uid of its own."""
        for first in range(self.streams, self.streams + streams, PER_PROCESS):
            count = min(PER_PROCESS, self.streams + streams - first)
            uid = FIRST_UID + len(self.processes)
            args = [self.target, str(count), str(PER_CONNECTION), str(uid), str(first)]
            process = subprocess.Popen(
                [sys.executable, "-c", CLIENTS, *args], stdout=subprocess.PIPE, text=True, env=bench_env()
            )
            self.processes.append(process)
            threading.Thread(target=self.read, args=(process,), daemon=True).start()
        self.streams += streams

    def read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            index, got, stamp = line.split()
            with self.lock:
                self.received.setdefault(got, {})[int(index)] = float(stamp)

    def wait_for(self, chain: str, timeout: float = 60) -> dict[int, float]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                seen = dict(self.received.get(chain, {}))
            if len(seen) >= self.streams:
                return seen
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(seen)} of {self.streams} streams got {chain}")
            time.sleep(0.01)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(10)


@dataclass(frozen=True)
class Run:
    latencies_ms: list[float]
    kb_per_stream: float
    cpu_ms_per_push: float


def measure(
    server_pid: int,
    target: str,
    streams: int,
    rotations: int,
    ca: CertificateAuthority,
    writer: GceCredentialWriter,
    first: str,
) -> Run:
    """Open the streams against the server, wait for all to be served, then rotate `rotations` times.

    Memory per stream is the slope: the RSS with every stream open and served, minus the RSS with the first
    WARM_UP streams open and served (what a first stream costs once: code paths run for the first time,
    caches), over the streams opened in between."""
    clients = Clients(target)
    try:
        clients.add(WARM_UP)
        clients.wait_for(first)
        time.sleep(1.0)  # every ACK read
        rss_before = rss_mb(server_pid)
        clients.add(streams - WARM_UP)
        clients.wait_for(first)
        time.sleep(1.0)
        rss_open = rss_mb(server_pid)
        latencies: list[float] = []
        cpu_start = cpu_seconds(server_pid)
        for _ in range(rotations):
            svid = ca.issue_svid("/ns/bench/sa/app", ttl=dt.timedelta(hours=1))
            new_dir = writer.new_contents_dir()
            writer.write_files(new_dir, gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
            time.sleep(0.15)
            swapped = time.time()
            writer.swap_to(new_dir)
            seen = clients.wait_for(digest(svid.chain_pem))
            latencies += [(stamp - swapped) * 1000 for stamp in seen.values()]
            time.sleep(0.2)
        cpu = cpu_seconds(server_pid) - cpu_start
    finally:
        clients.stop()
    return Run(latencies, (rss_open - rss_before) * 1024 / (streams - WARM_UP), cpu * 1000 / (rotations * streams))


def scale(streams: int, rotations: int) -> tuple[Run, Run]:
    """wlidd's run, then the baseline's, each on fresh credentials and a fresh server."""
    work = Path(tempfile.mkdtemp(prefix="wlidd-bench-sds-"))
    os.chmod(work, 0o755)  # the clients' uids reach the sockets
    ca = CertificateAuthority("bench.example.org")
    processes = 1 + (streams - WARM_UP + PER_PROCESS - 1) // PER_PROCESS  # the warm-up's, then the rest's
    uids = ", ".join(f'"{FIRST_UID + n}"' for n in range(processes))
    runs = []
    for kind in ("wlidd", "baseline"):
        writer = GceCredentialWriter(work / kind / "secrets")
        first = ca.issue_svid("/ns/bench/sa/app", ttl=dt.timedelta(hours=1))
        writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
        socket = work / f"{kind}-sds.sock"
        if kind == "wlidd":
            (work / "wlidd.toml").write_text(
                f"""
[daemon]
log_level = "warning"
log_format = "json"
[identities.default]
source = "gce"
dir = "{writer.link}"
mismatch_retry_delay = "0.2s"
[listeners.unix]
path = "{work / "wlidd.sock"}"
[listeners.workload_api]
path = "{socket}"
max_connections = 1024
[policy.credentials]
users = [{uids}]
"""
            )
            server = start_daemon(work / "wlidd.toml")
        else:
            server = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "_sds_baseline.py"), str(writer.link), str(socket)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=bench_env(),
            )
        try:
            deadline = time.monotonic() + 30
            while not socket.exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the {kind} server never listened on {socket}")
                time.sleep(0.05)
            runs.append(
                measure(server.pid, f"unix://{socket}", streams, rotations, ca, writer, digest(first.chain_pem))
            )
        finally:
            if kind == "wlidd":
                stop_daemon(server)
            else:
                assert server.stdin is not None
                server.stdin.close()
                server.kill()
                server.wait(10)
    return runs[0], runs[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="100,1000", help="comma-separated stream counts")
    parser.add_argument("--rotations", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/sds.py runs its clients as other uids: run it as root")
    figures = []
    for streams in (int(s) for s in args.streams.split(",")):
        ours, bare = scale(streams, args.rotations)
        p50, p99 = percentile(ours.latencies_ms, 50), percentile(ours.latencies_ms, 99)
        b50, b99 = percentile(bare.latencies_ms, 50), percentile(bare.latencies_ms, 99)
        print(f"\n{streams} streams x {args.rotations} rotations = {len(ours.latencies_ms)} pushes measured")
        print(
            f"baseline  swap -> push  p50 {b50:7.1f} ms  p99 {b99:7.1f} ms   {bare.kb_per_stream:6.1f} KB/stream  "
            f"{bare.cpu_ms_per_push:6.3f} ms CPU/push"
        )
        print(
            f"wlidd     swap -> push  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms   {ours.kb_per_stream:6.1f} KB/stream  "
            f"{ours.cpu_ms_per_push:6.3f} ms CPU/push"
        )
        print(
            f"ratio to baseline       p50 {p50 / b50:5.2f}x  p99 {p99 / b99:5.2f}x   "
            f"memory {ours.kb_per_stream / max(bare.kb_per_stream, 0.1):5.2f}x   "
            f"CPU {ours.cpu_ms_per_push / bare.cpu_ms_per_push:5.2f}x"
        )
        target = TARGETS_MS.get(streams, 1000.0)
        figures += [
            Figure(
                f"SDS rotation-to-push p99 ({streams} streams, raw gRPC)",
                f"{p99:.0f} ms ({p99 / b99:.1f}x bare {b99:.0f} ms)",
                f"≤ {target:.0f} ms",
                p99 <= target,
            ),
            Figure(
                f"SDS memory per open stream ({streams} streams)",
                f"{ours.kb_per_stream:.1f} KB (bare {bare.kb_per_stream:.1f} KB)",
                f"≤ {TARGET_KB_PER_STREAM:.0f} KB",
                ours.kb_per_stream <= TARGET_KB_PER_STREAM,
            ),
            Figure(
                f"SDS CPU per push ({streams} streams)",
                f"{ours.cpu_ms_per_push:.2f} ms ({ours.cpu_ms_per_push / bare.cpu_ms_per_push:.1f}x bare)",
                "measured",
                True,
            ),
        ]
    return report("sds", figures)


if __name__ == "__main__":
    raise SystemExit(main())
