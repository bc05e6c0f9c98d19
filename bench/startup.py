"""Start-up to READY=1 without an upstream: process start → sd_notify READY on $NOTIFY_SOCKET.

Two configs: a full node (one identity from files; the Unix, mTLS and Workload API listeners; one
token source pointing at an upstream that does not answer and is not required at start, so no
network is on the path) and the smallest useful one (the identity and the Unix socket). Baseline, in the same run: a bare Python process that sends READY=1 as its
first act (the interpreter's own start). Targets: median ≤ 0.5 s for the full node, ≤ 0.3 s for the
smallest one.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Figure, bench_env, free_port, precompile, report, write_minimal_config, write_node_config

BARE = (
    "import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM);"
    " s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])"
)


# Median seconds to READY=1. The smallest node imports only what it needs (no token flows, httpx, PyJWT,
# gRPC or protobuf: wlidd.daemon wires them in when a configuration names them).
TARGETS = {"full node": 0.5, "identity + Unix socket": 0.3}


def write_config(work: Path) -> Path:
    return write_node_config(work, f'require_at_start = false\nmetadata.url = "http://127.0.0.1:{free_port()}"')


def time_to_ready(argv: list[str], work: Path) -> float:
    notify = work / "notify.sock"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(notify))
        server.settimeout(30)
        start = time.perf_counter()
        process = subprocess.Popen(argv, env={**bench_env(), "NOTIFY_SOCKET": str(notify)}, stderr=subprocess.DEVNULL)
        try:
            while b"READY=1" not in server.recv(65536).split(b"\n"):
                pass
            return time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    precompile()
    work = Path(tempfile.mkdtemp(prefix="wlidd-bench-"))
    configs = {"full node": write_config(work), "identity + Unix socket": write_minimal_config(work / "minimal")}
    times: dict[str, list[float]] = {name: [] for name in configs}
    bare: list[float] = []
    for config in configs.values():
        time_to_ready([sys.executable, "-m", "wlidd", "run", "--config", str(config)], work)  # warm caches
    for _ in range(args.runs):
        for name, config in configs.items():
            times[name].append(time_to_ready([sys.executable, "-m", "wlidd", "run", "--config", str(config)], work))
        bare.append(time_to_ready([sys.executable, "-c", BARE], work))
    base = statistics.median(bare)
    print(f"{args.runs} starts each; CPUs: {os.cpu_count()}")
    for name, values in times.items():
        print(
            f"{name:<24} → READY=1  median {statistics.median(values) * 1000:6.0f} ms  max {max(values) * 1000:6.0f} ms"
        )
    print(f"{'bare python':<24} → READY=1  median {base * 1000:6.0f} ms")
    figures = []
    for name, values in times.items():
        median = statistics.median(values)
        what = "identity, token, Unix, mTLS, Workload API" if name == "full node" else name
        target = TARGETS[name]
        figures.append(
            Figure(
                f"start-up to READY=1, no upstream: {what} (median of {args.runs}; max {max(values):.2f} s;"
                f" bare Python {base:.2f} s, {median / base:.0f}x)",
                f"{median:.2f} s",
                f"≤ {target:g} s",
                median <= target,
            )
        )
    return report("startup", figures)


if __name__ == "__main__":
    raise SystemExit(main())
