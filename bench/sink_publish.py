"""Cost of publishing a credential sink as one atomic generation, and of checking it is current.

Each rotation wlidd writes a sink's files into a fresh `..<generation>` directory and swaps `..data`
(wlidd.sinks.publish_generation, the Kubernetes atomic writer's steps); every SIGHUP and every
reload_interval it checks each sink and writes nothing when it is current. Baseline, in the same
process on the same file system: the same four files written one after the other the way token sinks
are (a temp file each, fsynced, renamed over its name, the directory fsynced: wlidd.sinks.write_atomic),
which can hand a reader a mismatched pair. Layout "files" (key, chain, bundle, certificate_config.json), EC P-256 SVID.

Targets: a rotation's publication at most 3× the baseline's p50 (the extra work is a directory, a
link and a directory fsync); a check of a current sink below 1 ms p50 (it runs on every SIGHUP).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, Figure, percentile, report

sys.path.insert(0, str(ROOT))

from wlidd.config import CredentialSinkConfig
from wlidd.emulator.ca import CertificateAuthority
from wlidd.sinks.credentials import write_credentials
from wlidd.sinks.files import write_atomic
from wlidd.sinks.layouts import Material, credential_files
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.tlsctx import TlsContexts
from wlidd.watch import IdentityState


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rotations", type=int, default=200)
    args = parser.parse_args()
    ca = CertificateAuthority("example.org")
    now = dt.datetime.now(dt.UTC)
    states = []
    for version in range(1, 9):
        svid = ca.issue_svid()
        identity = build_identity(CredentialFiles("bench", svid.chain_pem, svid.key_pem, own_bundle=ca.bundle_pem), now)
        states.append(IdentityState("default", identity, TlsContexts.build(identity), version, now))
    baseline: list[float] = []
    publish: list[float] = []
    check: list[float] = []
    with tempfile.TemporaryDirectory(prefix="wlidd-bench-sink-") as work:
        old_dir, new_dir = Path(work) / "old", Path(work) / "new"
        sink = CredentialSinkConfig(dir=new_dir)
        old_sink = CredentialSinkConfig(dir=old_dir)
        for index in range(args.rotations):  # interleaved, so noise hits both alike
            state = states[index % len(states)]
            files = [(old_dir / f.name, f.data, f.mode) for f in credential_files(old_sink, Material.of(state))]
            started = time.perf_counter()
            for path, data, mode in files:
                write_atomic(path, data, mode)
            baseline.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            assert write_credentials(sink, state)
            publish.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            assert not write_credentials(sink, state)
            check.append((time.perf_counter() - started) * 1000)
    base50, pub50, pub99, check50 = (
        percentile(baseline, 50),
        percentile(publish, 50),
        percentile(publish, 99),
        percentile(check, 50),
    )
    print(f"rotations: {args.rotations}")
    print(f"baseline write_atomic x4          p50 {base50:7.3f} ms  p99 {percentile(baseline, 99):7.3f} ms")
    print(f"wlidd generation + ..data swap    p50 {pub50:7.3f} ms  p99 {pub99:7.3f} ms")
    print(f"wlidd check of a current sink     p50 {check50:7.3f} ms  p99 {percentile(check, 99):7.3f} ms")
    print(f"ratio publish/baseline p50 {pub50 / base50:.2f}x")
    return report(
        "sink_publish",
        [
            Figure(
                f"sink rotation (generation + ..data swap) p50 vs per-file renames ({args.rotations} rotations)",
                f"{pub50 / base50:.2f}× ({pub50:.2f} ms vs {base50:.2f} ms)",
                "≤ 3×",
                pub50 / base50 <= 3.0,
            ),
            Figure(
                "sink check when current (every SIGHUP, every reload_interval) p50",
                f"{check50:.3f} ms",
                "< 1 ms",
                check50 < 1.0,
            ),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
