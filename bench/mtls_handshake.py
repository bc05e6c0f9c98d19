"""mTLS handshakes/s on wlidd's listener vs a bare Python `ssl` server with the same certificate.

Both servers run in their own process; the same load processes connect, complete a TLS 1.3 mutual
handshake with the same client SVID, and close, for a fixed time against each in turn.
Baseline: asyncio.start_server with an SSLContext carrying the same server SVID, requiring the same
client certificates, closing at once. Target: wlidd ≥ 0.8× the baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import Figure, free_port, report, start_daemon, stop_daemon, wait_port  # noqa: E402

from wlidd.emulator.ca import CertificateAuthority  # noqa: E402
from wlidd.svid.credential_set import CredentialFiles, build_identity  # noqa: E402
from wlidd.tlsctx import build_client_context  # noqa: E402

BARE_SERVER = """
import asyncio, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
context.verify_mode = ssl.CERT_REQUIRED
context.load_cert_chain(sys.argv[2], sys.argv[3])
context.load_verify_locations(sys.argv[4])
async def handle(reader, writer):
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), ssl=context)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


def _load(port: int, chain: bytes, key: bytes, bundle: bytes, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    context = build_client_context(
        build_identity(CredentialFiles("c", chain, key, own_bundle=bundle), dt.datetime.now(dt.UTC))
    )
    count = failures = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
                assert tls.version() == "TLSv1.3"
                count += 1
        except (OSError, ssl.SSLError):
            failures += 1
    out.put((count, failures))


def measure(port: int, client: tuple[bytes, bytes, bytes], seconds: float, workers: int) -> tuple[float, int]:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    processes = [multiprocessing.Process(target=_load, args=(port, *client, seconds, queue)) for _ in range(workers)]
    for p in processes:
        p.start()
    results = [queue.get(timeout=seconds + 60) for _ in processes]
    for p in processes:
        p.join(30)
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wlidd-bench-"))
    ca = CertificateAuthority("bench.example.org")
    server = ca.issue_svid("/ns/bench/sa/server", ttl=dt.timedelta(hours=2))
    client = ca.issue_svid("/ns/bench/sa/client", ttl=dt.timedelta(hours=2))
    (work / "chain.pem").write_bytes(server.chain_pem)
    (work / "key.pem").write_bytes(server.key_pem)
    (work / "bundle.pem").write_bytes(ca.bundle_pem)
    wlidd_port, bare_port = free_port(), free_port()
    (work / "wlidd.toml").write_text(
        f"""
[daemon]
log_level = "warning"
log_format = "json"
[identities.default]
source = "files"
cert = "{work / "chain.pem"}"
key = "{work / "key.pem"}"
bundle = "{work / "bundle.pem"}"
[listeners.unix]
path = "{work / "wlidd.sock"}"
[listeners.mtls]
address = "127.0.0.1:{wlidd_port}"
identity = "default"
allow = ["spiffe://bench.example.org"]
max_connections = 4096
max_connections_per_caller = 4096
"""
    )
    daemon = start_daemon(work / "wlidd.toml")
    bare = subprocess.Popen(
        [
            sys.executable,
            "-c",
            BARE_SERVER,
            str(bare_port),
            str(work / "chain.pem"),
            str(work / "key.pem"),
            str(work / "bundle.pem"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert bare.stdout is not None
        bare.stdout.readline()
        wait_port(wlidd_port, process=daemon)
        material = (client.chain_pem, client.key_pem, ca.bundle_pem)
        measure(wlidd_port, material, 0.5, args.workers)  # warm-up
        wlidd_rate, wlidd_failed = measure(wlidd_port, material, args.seconds, args.workers)
        bare_rate, bare_failed = measure(bare_port, material, args.seconds, args.workers)
    finally:
        stop_daemon(daemon)
        assert bare.stdin is not None
        bare.stdin.close()
        bare.wait(10)
    ratio = wlidd_rate / bare_rate
    print(f"TLS 1.3 mutual handshakes, {args.workers} client processes, {args.seconds:g}s each")
    print(f"wlidd mTLS listener   {wlidd_rate:8.0f} handshakes/s  (failed: {wlidd_failed})")
    print(f"bare Python ssl       {bare_rate:8.0f} handshakes/s  (failed: {bare_failed})")
    print(f"ratio                 {ratio:8.2f}x")
    return report(
        "mtls_handshake",
        [Figure("mTLS handshakes/s vs bare Python ssl, same certificate", f"{ratio:.2f}x", "≥ 0.8x", ratio >= 0.8)],
    )


if __name__ == "__main__":
    raise SystemExit(main())
