"""What every benchmark shares: percentiles, the daemon process, and the figure table.

Each benchmark ends by calling `report(bench, figures)`: it prints the bench's own table and, when
BENCH_RESULTS_FILE names a file, appends the figures to it as JSON lines, from which
`bench/report.py` builds the one table `make bench` ends with.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
RESULTS_ENV = "BENCH_RESULTS_FILE"


@dataclass(frozen=True)
class Figure:
    figure: str
    value: str
    target: str
    passed: bool
    bench: str = ""


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


def report(bench: str, figures: list[Figure]) -> int:
    """Print the figures as a markdown table, record them for the summary; 0 if all passed."""
    print("\n| figure | value | target | result |\n|---|---|---|---|")
    for f in figures:
        print(f"| {f.figure} | {f.value} | {f.target} | {'pass' if f.passed else 'FAIL'} |")
    results = os.environ.get(RESULTS_ENV)
    if results:
        with open(results, "a") as out:
            for f in figures:
                out.write(json.dumps(asdict(Figure(f.figure, f.value, f.target, f.passed, bench))) + "\n")
    return 0 if all(f.passed for f in figures) else 1


def write_node_config(work: Path, token: str) -> Path:
    """A realistic node: one identity from files, one token (`token`: the [tokens.mds] keys), and the
    Unix, mTLS and Workload API listeners, all under `work`."""
    import datetime as dt

    from wlidd.emulator.ca import CertificateAuthority

    ca = CertificateAuthority("bench.example.org")
    svid = ca.issue_svid("/ns/bench/sa/node", ttl=dt.timedelta(hours=2))
    (work / "chain.pem").write_bytes(svid.chain_pem)
    (work / "key.pem").write_bytes(svid.key_pem)
    (work / "key.pem").chmod(0o600)
    (work / "bundle.pem").write_bytes(ca.bundle_pem)
    config = work / "wlidd.toml"
    config.write_text(
        f"""
[daemon]
log_level = "warning"
[identities.default]
source = "files"
cert = "{work / "chain.pem"}"
key = "{work / "key.pem"}"
bundle = "{work / "bundle.pem"}"
[tokens.mds]
flow = "gce-metadata"
{token}
[listeners.unix]
path = "{work / "wlidd.sock"}"
[listeners.mtls]
address = "127.0.0.1:{free_port()}"
identity = "default"
allow = ["spiffe://bench.example.org"]
[listeners.workload_api]
path = "{work / "workload.sock"}"
"""
    )
    return config


def write_minimal_config(work: Path) -> Path:
    """The smallest useful node, under `work`: one identity from files and the Unix socket (no tokens,
    mTLS or Workload API)."""
    work.mkdir(exist_ok=True)
    full = write_node_config(work, f'require_at_start = false\nmetadata.url = "http://127.0.0.1:{free_port()}"')
    text = full.read_text()
    kept = text[: text.index("[tokens.mds]")] + text[text.index("[listeners.unix]") : text.index("[listeners.mtls]")]
    full.write_text(kept)
    return full


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident MB; RssAnon is the private heap, RssFile the mapped library and interpreter code."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response from a keep-alive connection: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(h.split(b":", 1)[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


def bench_env() -> dict[str, str]:
    """The daemon's environment: this tree first on the path, and bytecode cached as an installed package's
    is (PYTHONDONTWRITEBYTECODE dropped: a start that compiles every module from source measures the
    compiler: the identity + Unix socket node took 0.29 s instead of 0.22 s and 3.6 MB more RSS)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def precompile() -> None:
    """Compile wlidd's modules to bytecode before the first measured start (as a package install does)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "wlidd")], env=bench_env(), check=True)


def start_daemon(config: Path, stderr: IO[bytes] | int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "wlidd", "run", "--config", str(config)], env=bench_env(), stderr=stderr
    )


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    daemon.terminate()
    try:
        daemon.wait(10)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(10)


def wait_for_unix_socket(path: Path, timeout: float = 30, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the daemon exited with {process.returncode} before listening on {path}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the daemon exited with {process.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")
