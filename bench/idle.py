"""Idle cost and memory: CPU% and wake-ups of an idle daemon, RSS after start and after requests.

The daemon runs a realistic node config (one identity from files, one metadata-upstream token, the
Unix, mTLS and Workload API listeners) against the emulated upstream. Baseline, in the same run: a
bare Python process idling in `asyncio.run(sleep)`, measured over the same window.

Wake-ups are the context switches of all the process's threads (a thread that sleeps and wakes
counts one), read from /proc/<pid>/task/*/status. Targets: CPU < 0.1 %, no busy polling (we count
≤ 10 wake-ups/s as "not polling"), and no RSS growth from 10,000 to 20,000 requests (≤ 2 MB).

Memory, after start and after 10,000 requests: ≤ 50 MB for the smallest useful node (one identity and
the Unix socket, started after the full node is stopped), which imports only what it uses; ≤ 70 MB for
the full node, whose token flows (httpx, PyJWT) and Workload API (gRPC, protobuf) add about 15 MB: a
guard against growth (it measured 64-66 MB before), not a goal.
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
    precompile,
    read_response,
    report,
    rss_mb,
    start_daemon,
    stop_daemon,
    wait_for_unix_socket,
    write_minimal_config,
    write_node_config,
)

REQUESTS = (
    b"GET /v1/token/mds HTTP/1.1\r\nHost: wlidd\r\n\r\n",
    b"GET /v1/health HTTP/1.1\r\nHost: wlidd\r\n\r\n",
)
MINIMAL_REQUESTS = (  # the smallest node serves no token
    b"GET /v1/identity/default HTTP/1.1\r\nHost: wlidd\r\n\r\n",
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


async def _client(path: str, requests: int, per_connection: int, kinds: tuple[bytes, ...]) -> int:
    """`requests` requests (taking turns through `kinds`) over keep-alive connections of `per_connection`
    requests each."""
    ok = 0
    while requests > 0:
        reader, writer = await asyncio.open_unix_connection(path)
        for i in range(min(per_connection, requests)):
            writer.write(kinds[i % len(kinds)])
            head, _ = await read_response(reader)
            ok += head.startswith(b"HTTP/1.1 200")
            requests -= 1
        writer.close()
        await writer.wait_closed()
    return ok


def drive(
    path: Path, total: int, clients: int = 16, per_connection: int = 50, kinds: tuple[bytes, ...] = REQUESTS
) -> int:
    async def run() -> int:
        shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
        counts = await asyncio.gather(*[_client(str(path), share, per_connection, kinds) for share in shares])
        return sum(counts)

    return asyncio.run(run())


def settled_rss(pid: int, sock: Path, requests: int) -> tuple[tuple[float, float, float], float]:
    """((RSS, RssAnon, RssFile) in MB after start, RSS in MB after `requests` requests) of the smallest
    node, which serves no token: it answers identity and health requests."""
    deadline = time.monotonic() + 30
    while drive(sock, 16, clients=1, kinds=MINIMAL_REQUESTS) < 16:  # its identity loads after the socket answers
        if time.monotonic() > deadline:
            raise SystemExit("the identity + Unix socket node did not answer")
        time.sleep(0.05)
    time.sleep(2)  # as for the full node: let start-up work settle
    start = (rss_mb(pid), rss_mb(pid, "RssAnon"), rss_mb(pid, "RssFile"))
    if drive(sock, requests, kinds=MINIMAL_REQUESTS) < requests:
        raise SystemExit("the identity + Unix socket node did not answer every request")
    return start, rss_mb(pid)


def write_config(work: Path, metadata_url: str) -> Path:
    return write_node_config(work, f'start_delay = 0\nrequire_at_start = true\nmetadata.url = "{metadata_url}"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window")
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    precompile()
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
        stop_daemon(daemon)
        minimal = start_daemon(write_minimal_config(work / "minimal"))
        try:
            wait_for_unix_socket(work / "minimal" / "wlidd.sock", process=minimal)
            small_start, small_requests = settled_rss(minimal.pid, work / "minimal" / "wlidd.sock", args.requests)
        finally:
            stop_daemon(minimal)
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
    print(
        f"identity + Unix socket node: RSS after start {small_start[0]:.1f} MB ({small_start[1]:.1f} private +"
        f" {small_start[2]:.1f} mapped); after {n} requests {small_requests:.1f} MB"
    )
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
                f"RSS after start / after {n:,} requests, identity + Unix socket (bare asyncio: {rss_baseline:.1f} MB)",
                f"{small_start[0]:.1f} / {small_requests:.1f} MB",
                "≤ 50 MB",
                max(small_start[0], small_requests) <= 50,
            ),
            Figure(
                f"RSS after start / after {n:,} requests, the full node (token, mTLS, Workload API)",
                f"{rss_start:.1f} / {rss_10k:.1f} MB",
                "≤ 70 MB",
                max(rss_start, rss_10k) <= 70 and ok_first == n,
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
