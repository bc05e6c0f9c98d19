"""The node's side of the fleet: one real daemon under an ID-token storm from 100 local users, its IAM
upstream's clock 15 minutes ahead. Run by bench/fleet.py after the 10,000-node simulation.

Setup: the emulated upstreams in this process (STS over mTLS, IAM with `clock_skew` = +900 s, so every
`expireTime` and ID-token `exp` it sends is 15 minutes in the future of the real one), a daemon process
with an x509-sts source impersonating a service account (`impersonate.lifetime = "10m"`) and the
metadata listener, and 100 caller processes, each its own uid (setpriv), each asking the metadata
listener for ID tokens of random new audiences for `--storm-seconds`.

Measured:
  - skew: the access token's expiry as served (`expires_in` at the answer) against its real expiry (the
    emulator's own record on the local clock); baseline: what a client trusting `expireTime` would get
    (the token's apparent lifetime). Target: served never past the real expiry (≤ 0 s beyond).
  - storm: upstream ID-token mints against the requests made (baseline: one mint per new audience, what
    an unguarded server would do) and against the bound of the guards (the source's budget of new
    audiences: a burst of 60, then 60 a minute). Target: mints ≤ the bound; every refusal is a 429 with
    Retry-After (counted) or served from the cache.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.from_thread
from _common import ROOT, Figure, bench_env, free_port, stop_daemon, wait_port

sys.path.insert(0, str(ROOT))

from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams

SA = "app@demo-project.iam.gserviceaccount.com"
X509_AUDIENCE = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/x509"
NEW_AUDIENCES_BURST, NEW_AUDIENCES_PER_MINUTE = 60, 60.0  # wlidd.tokens.limits.IdTokenLimits defaults
CALLERS = 100
FIRST_UID = 41000

CALLER = r"""
import random, socket, sys, time
port, seconds, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
counts = {}
deadline = time.monotonic() + seconds
sock = None
while time.monotonic() < deadline:
    audience = f"https://svc-{rng.getrandbits(40):x}.example"
    request = (f"GET /computeMetadata/v1/instance/service-accounts/default/identity?audience={audience} HTTP/1.1\r\n"
               "Host: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n").encode()
    try:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += sock.recv(65536)
        status = int(head.split()[1])
        retry_after = b"retry-after:" in head.lower()
        key = f"{status}{'+retry-after' if retry_after else ''}"
        counts[key] = counts.get(key, 0) + 1
        if b"connection: close" in head.lower():
            sock.close(); sock = None
    except OSError:
        counts["error"] = counts.get("error", 0) + 1
        if sock is not None:
            sock.close()
        sock = None
        time.sleep(0.05)
print(repr(counts))
"""


def _request(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def run(storm_seconds: float) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="wlidd-bench-node-"))
    work.chmod(0o755)
    ca = CertificateAuthority("example.org")
    svid = ca.issue_svid("/ns/bench/sa/node", ttl=dt.timedelta(hours=2))
    for name, data in (("chain.pem", svid.chain_pem), ("key.pem", svid.key_pem), ("bundle.pem", ca.bundle_pem)):
        (work / name).write_bytes(data)
    (work / "key.pem").chmod(0o600)
    mints: list[str] = []
    with anyio.from_thread.start_blocking_portal() as portal:
        upstreams = Upstreams(work / "emulator", spiffe_bundle_pem=ca.bundle_pem, seed=5, service_accounts=[SA])
        upstreams.register_x509_provider(X509_AUDIENCE)
        upstreams.clock_skew = 900.0
        real_mint = upstreams.id_token

        def counted(email: str, audience: str) -> str:
            mints.append(audience)
            return real_mint(email, audience)

        upstreams.id_token = counted  # type: ignore[method-assign]
        done, _ = portal.start_task(upstreams.run)
        port = free_port()
        users = ", ".join(str(FIRST_UID + i) for i in range(CALLERS))
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
[tokens.gcp]
flow = "x509-sts"
identity = "default"
ca_file = "{upstreams.ca_file}"
start_delay = 0
require_at_start = true
min_interval = 0
sts.url = "{upstreams.sts_mtls_url}"
sts.audience = "{X509_AUDIENCE}"
impersonate.service_account = "{SA}"
impersonate.url = "{upstreams.iam_mtls_url}"
impersonate.lifetime = "10m"
[listeners.unix]
path = "{work / "wlidd.sock"}"
[listeners.metadata]
address = "127.0.0.1:{port}"
token = "gcp"
max_connections = 512
[policy]
tokens = {{ users = ["root", {users}] }}
"""
        )
        log = (work / "wlidd.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "wlidd", "run", "--config", str(config)], env=bench_env(), stderr=log
        )
        try:
            wait_port(port, process=daemon)
            # skew: the served token's expiry against the real one
            status, body = _request(port, "/computeMetadata/v1/instance/service-accounts/default/token")
            answered = dt.datetime.now(dt.UTC)
            assert status == 200, body
            document = json.loads(body)
            real_expiry, _ = upstreams.issued[document["access_token"]]
            served_expiry = answered + dt.timedelta(seconds=document["expires_in"])
            beyond = (served_expiry - real_expiry).total_seconds()
            apparent = (real_expiry - answered).total_seconds() + upstreams.clock_skew  # expireTime - now
            # storm
            mints.clear()
            started = time.monotonic()
            callers = [
                subprocess.Popen(
                    [
                        "setpriv",
                        f"--reuid={FIRST_UID + i}",
                        f"--regid={FIRST_UID + i}",
                        "--clear-groups",
                        sys.executable,
                        "-c",
                        CALLER,
                        str(port),
                        str(storm_seconds),
                        str(i),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
                for i in range(CALLERS)
            ]
            totals: dict[str, int] = {}
            for caller in callers:
                out, _ = caller.communicate(timeout=storm_seconds + 60)
                for key, value in eval(out.strip() or "{}").items():
                    totals[key] = totals.get(key, 0) + value
            elapsed = time.monotonic() - started
            minted = len(mints)
        finally:
            stop_daemon(daemon)
            log.close()
            upstreams.stop()
            done.result(timeout=10)
    requests = sum(totals.values())
    bound = NEW_AUDIENCES_BURST + NEW_AUDIENCES_PER_MINUTE * elapsed / 60 + 1
    refused_429 = totals.get("429+retry-after", 0)
    bare_429 = totals.get("429", 0)
    print(f"\nnode: IAM clock +{upstreams.clock_skew:.0f} s; token lifetime asked 600 s")
    print(f"  a client trusting expireTime: {apparent:.0f} s left; wlidd served {beyond:+.1f} s vs the real expiry")
    print(f"node: {CALLERS} local users, {elapsed:.1f} s of new audiences: {requests} requests {totals}")
    print(f"  upstream ID-token mints {minted} (unguarded: {requests}); guard bound {bound:.0f}")
    return [
        Figure(
            "skewed IAM clock (+15 min): served expiry beyond the real one (a client trusting expireTime "
            f"would see {apparent:.0f} s of a 600 s token)",
            f"{beyond:+.1f} s",
            "≤ 0 s",
            beyond <= 0,
        ),
        Figure(
            f"ID-token storm, {CALLERS} local users × random audiences: upstream mints vs requests (unguarded)",
            f"{minted} / {requests} ({minted / max(1, requests):.3f}×)",
            f"≤ guard bound {bound:.0f}",
            minted <= bound,
        ),
        Figure(
            "ID-token storm: every 429 carries Retry-After",
            f"{refused_429} with, {bare_429} without",
            "0 without",
            bare_429 == 0,
        ),
    ]


def main() -> int:
    from _common import report

    return report("fleet_node", run(float(os.environ.get("STORM_SECONDS", "15"))))


if __name__ == "__main__":
    raise SystemExit(main())
