"""The one table `make bench` ends with, from the figures each benchmark recorded.

    python bench/report.py RESULTS_JSONL [--write bench/RESULTS.md] [--log FULL_OUTPUT]

A benchmark that crashed before recording shows as "did not run". With --write, the table goes to
RESULTS.md together with the machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _common import ROOT

EXPECTED = ("rotation_latency", "token_serve", "fleet", "mtls_handshake", "workload_api", "sds", "idle", "startup")


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs (shared, noisy: compare ratios, not absolute times)",
        f"- Memory: {mem_kb / 1024 / 1024:.1f} GiB",
        f"- Kernel: {platform.system()} {platform.release()}",
        f"- Python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"- wlidd commit: {commit or 'unknown'}",
    ]


def table(rows: list[dict[str, object]]) -> list[str]:
    lines = ["| figure | value | target | result |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['figure']} | {row['value']} | {row['target']} | {'pass' if row['passed'] else 'FAIL'} |")
    ran = {row["bench"] for row in rows}
    for bench in EXPECTED:
        if bench not in ran:
            lines.append(f"| bench/{bench}.py | did not run | | FAIL |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--write", type=Path, help="write RESULTS.md here")
    args = parser.parse_args()
    rows = (
        [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        if args.results.exists()
        else []
    )
    lines = table(rows)
    failed = sum(1 for line in lines[2:] if line.endswith("| FAIL |"))
    print("\n== wlidd benchmarks ==")
    print("\n".join(lines))
    print(f"\n{len(lines) - 2} figures, {failed} missed")
    if args.write:
        args.write.write_text(
            "# wlidd benchmark results\n\n"
            "The latest `make bench` output, summarised. Each figure is measured against a baseline run in the\n"
            "same process tree at the same time (see each script's docstring); the per-bench detail is in the\n"
            "`make bench` output.\n\n"
            "## Machine\n\n"
            + "\n".join(machine())
            + "\n\n## Figures\n\n"
            + "\n".join(lines)
            + "\n"
            + (
                f"\n{failed} target(s) missed: [PROFILES.md](PROFILES.md) says by how much and where the time goes.\n"
                if failed
                else ""
            )
        )
        print(f"wrote {args.write}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
