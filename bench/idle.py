"""Idle cost and memory: CPU% and wake-ups of an idle daemon, RSS after start and after requests.

The daemon runs a realistic node config (one identity from files, one metadata-upstream token, the
Unix, mTLS and Workload API listeners) against the emulated upstream. Baseline, in the same run: a
bare Python process idling in `asyncio.run(sleep)`, measured over the same window.

Wake-ups are the context switches of all the process's threads (a thread that sleeps and wakes
counts one), read from /proc/<pid>/task/*/status. Targets: CPU < 0.1 %, no busy polling (we count
≤ 10 wake-ups/s as "not polling"), RSS ≤ 50 MB after start and after 10,000 requests, and no growth
from 10,000 to 20,000 requests (≤ 2 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    Figure,
    bench_env,
    read_response,
    report,
    rss_mb,
    start_daemon,
    stop_daemon,
    wait_for_unix_socket,
    write_node_config,
)

REQUESTS = (
    b"GET /v1/token/mds HTTP/1.1\r\nHost: wlidd\r\n\r\n",
    b"GET /v1/health HTTP/1.1\r\nHost: wlidd\r\n\r\n",
)
IDLE_BASELINE = "import asyncio; asyncio.run(asyncio.sleep(1e9))"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass  # the thread ended meanwhile
    return total


def idle_cost(pids: list[int], seconds: float) -> list[tuple[float, float]]:
    """(CPU %, wake-ups per second) of each process over the same window."""
    before = [(cpu_seconds(p), context_switches(p)) for p in pids]
    time.sleep(seconds)
    after = [(cpu_seconds(p), context_switches(p)) for p in pids]
    return [((a[0] - b[0]) / seconds * 100, (a[1] - b[1]) / seconds) for a, b in zip(after, before, strict=True)]


async def _client(path: str, requests: int, per_connection: int) -> int:
    """`requests` requests over keep-alive connections of `per_connection` requests each."""
    ok = 0
    while requests > 0:
        reader, writer = await asyncio.open_unix_connection(path)
        for i in range(min(per_connection, requests)):
            writer.write(REQUESTS[i % len(REQUESTS)])
            head, _ = await read_response(reader)
            ok += head.startswith(b"HTTP/1.1 200")
            requests -= 1
        writer.close()
        await writer.wait_closed()
    return ok


def drive(path: Path, total: int, clients: int = 16, per_connection: int = 50) -> int:
    async def run() -> int:
        shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
        counts = await asyncio.gather(*[_client(str(path), share, per_connection) for share in shares])
        return sum(counts)

    return asyncio.run(run())


def write_config(work: Path, metadata_url: str) -> Path:
    return write_node_config(work, f'start_delay = 0\nrequire_at_start = true\nmetadata.url = "{metadata_url}"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window")
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wlidd-bench-"))
    upstreams = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_upstreams.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=bench_env(),
    )
    assert upstreams.stdout is not None and upstreams.stdin is not None
    urls = json.loads(upstreams.stdout.readline())
    daemon = start_daemon(write_config(work, urls["metadata_url"]))
    baseline = subprocess.Popen([sys.executable, "-c", IDLE_BASELINE])
    sock = work / "wlidd.sock"
    try:
        wait_for_unix_socket(sock, process=daemon)
        if drive(sock, 16, clients=1) < 8:
            raise SystemExit("wlidd did not serve the token")
        time.sleep(2)  # let start-up work (first refreshes, GC) settle
        rss_start, rss_baseline = rss_mb(daemon.pid), rss_mb(baseline.pid)
        anon, mapped = rss_mb(daemon.pid, "RssAnon"), rss_mb(daemon.pid, "RssFile")
        (w_cpu, w_wake), (b_cpu, b_wake) = idle_cost([daemon.pid, baseline.pid], args.seconds)
        ok_first = drive(sock, args.requests)
        rss_10k = rss_mb(daemon.pid)
        ok_second = drive(sock, args.requests)
        rss_20k = rss_mb(daemon.pid)
        threads = len(list(Path(f"/proc/{daemon.pid}/task").iterdir()))
    finally:
        stop_daemon(daemon)
        baseline.kill()
        baseline.wait()
        upstreams.stdin.close()
        upstreams.wait(10)

    print(f"idle window {args.seconds:g}s; wlidd has {threads} threads")
    print(f"{'':<24} {'CPU %':>8} {'wake-ups/s':>11} {'RSS MB':>8}")
    print(f"{'wlidd idle':<24} {w_cpu:>8.3f} {w_wake:>11.1f} {rss_start:>8.1f}")
    print(f"{'bare asyncio idle':<24} {b_cpu:>8.3f} {b_wake:>11.1f} {rss_baseline:>8.1f}")
    print(f"wlidd RSS after start: {anon:.1f} MB private (RssAnon) + {mapped:.1f} MB mapped files (RssFile)")
    print(f"RSS ratio wlidd / bare asyncio after start: {rss_start / rss_baseline:.2f}x")
    n = args.requests
    print(f"RSS after {n} requests: {rss_10k:.1f} MB ({ok_first} answered 200); after {2 * n}: {rss_20k:.1f} MB")
    growth = rss_20k - rss_10k
    return report(
        "idle",
        [
            Figure(
                f"idle CPU over {args.seconds:g} s (bare asyncio: {b_cpu:.3f} %)",
                f"{w_cpu:.3f} %",
                "< 0.1 %",
                w_cpu < 0.1,
            ),
            Figure(
                f"idle wake-ups per second, all threads (bare asyncio: {b_wake:.1f})",
                f"{w_wake:.1f}/s",
                "≤ 10/s (no polling)",
                w_wake <= 10,
            ),
            Figure(
                f"RSS after start / after {n:,} requests (bare asyncio: {rss_baseline:.1f} MB)",
                f"{rss_start:.1f} / {rss_10k:.1f} MB",
                "≤ 50 MB",
                max(rss_start, rss_10k) <= 50 and ok_first == n,
            ),
            Figure(
                f"RSS growth from {n:,} to {2 * n:,} requests",
                f"{growth:+.1f} MB",
                "≤ 2 MB",
                growth <= 2 and ok_second == n,
            ),
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())
