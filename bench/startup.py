"""Start-up to READY=1 without an upstream: process start → sd_notify READY on $NOTIFY_SOCKET.

The daemon loads one identity from files and binds the Unix, mTLS and Workload API listeners; its
one token source points at an upstream that does not answer and is not required at start, so no
network is on the path. Baseline, in the same run: a bare Python process that sends READY=1 as its
first act (the interpreter's own start). Target: median ≤ 0.5 s.
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

from _common import Figure, bench_env, free_port, report, write_node_config

BARE = (
    "import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM);"
    " s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])"
)


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
    work = Path(tempfile.mkdtemp(prefix="wlidd-bench-"))
    config = write_config(work)
    daemon_argv = [sys.executable, "-m", "wlidd", "run", "--config", str(config)]
    time_to_ready(daemon_argv, work)  # warm the page cache and bytecode
    wlidd, bare = [], []
    for _ in range(args.runs):
        wlidd.append(time_to_ready(daemon_argv, work))
        bare.append(time_to_ready([sys.executable, "-c", BARE], work))
    median, worst, base = statistics.median(wlidd), max(wlidd), statistics.median(bare)
    print(f"{args.runs} starts each; CPUs: {os.cpu_count()}")
    print(f"wlidd start → READY=1      median {median * 1000:6.0f} ms  max {worst * 1000:6.0f} ms")
    print(f"bare python → READY=1      median {base * 1000:6.0f} ms")
    print(f"ratio                      {median / base:6.2f}x")
    return report(
        "startup",
        [
            Figure(
                f"start-up to READY=1, no upstream (median of {args.runs}; max {worst:.2f} s; bare Python {base:.2f} s)",
                f"{median:.2f} s",
                "≤ 0.5 s",
                median <= 0.5,
            )
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())
