"""Compressed soak (`make soak`): a day of a node's life in minutes, with a flaky upstream.

- Credentials: a GCE-style writer swaps the symlink every 5 s to a new SVID that lives 10 s.
- Upstreams: the emulator (Entra ID, STS, IAM, metadata). STS (plain and mTLS) fails about 30 % of
  requests: 15 % answer 503, 10 % answer after 2 s, 7 % hang (the daemon's 3 s upstream timeout cuts them).
- The real daemon (its own process) serves three tokens (entra-sts, x509-sts capped at the 10 s
  SVID, gce-metadata), the Unix socket, the mTLS listener and the Workload API.
- 64 clients in load processes: half fetch tokens over the Unix socket, a quarter make mTLS
  requests (a new handshake each), a quarter hold Workload API streams.

Counted: expired tokens served (checked against the emulator's own record of every token it
issued, and against expires_in), failed handshakes, expired leaves presented, expired SVIDs pushed,
errors other than the documented 503 ("no valid token right now"), and RSS drift. Exits 1 if a
must-be-zero count is not zero.

    SOAK_SECONDS=300 python bench/soak.py      (default 300; --seconds overrides)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import ssl
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
from _common import bench_env, free_port, read_response, rss_mb, start_daemon, stop_daemon, wait_for_unix_socket
from cryptography import x509

from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.demo import DEMO_PATH, DEMO_TRUST_DOMAIN, demo_upstreams, write_demo_config
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.emulator.produced import find_leak
from wlidd.emulator.upstreams import Fault

TOKENS = ("gcp", "x509", "mds")
STS_FAULT = Fault(error_rate=0.15, status=503, latency=2.0, latency_rate=0.10, hang=True, hang_rate=0.07)


# ---- the load processes ------------------------------------------------------------------------
class Load:
    def __init__(self, plan: dict[str, object]) -> None:
        self.plan = plan
        self.deadline = time.monotonic() + float(plan["seconds"])  # type: ignore[arg-type]
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.last_seen: dict[str, float] = {}  # token → last wall time it was served to us

    async def token_client(self, index: int) -> None:
        name = TOKENS[index % len(TOKENS)]
        request = f"GET /v1/token/{name} HTTP/1.1\r\nHost: wlidd\r\n\r\n".encode()
        while time.monotonic() < self.deadline:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.plan["socket"]))
                for _ in range(random.randint(20, 200)):
                    if time.monotonic() >= self.deadline:
                        break
                    writer.write(request)
                    head, body = await asyncio.wait_for(read_response(reader), 15)
                    self.token_answer(int(head.split()[1]), body, time.time())
                    await asyncio.sleep(0.01)
                writer.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.errors[f"token connection: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.1)

    def token_answer(self, status: int, body: bytes, now: float) -> None:
        self.counts["token requests"] += 1
        if status == 503:
            self.counts["token 503 (documented: no valid token now)"] += 1
            return
        if status != 200:
            self.errors[f"token status {status}"] += 1
            return
        answer = json.loads(body)
        if answer["expires_in"] <= 0:
            self.counts["expired tokens served"] += 1
        token = answer["access_token"]
        self.last_seen[token] = max(now, self.last_seen.get(token, 0.0))

    async def mtls_client(self, context: ssl.SSLContext) -> None:
        port = int(self.plan["mtls_port"])  # type: ignore[call-overload]
        request = b"GET /v1/token/mds HTTP/1.1\r\nHost: wlidd\r\nConnection: close\r\n\r\n"
        while time.monotonic() < self.deadline:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=None), 15
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.counts["failed handshakes"] += 1
                self.errors[f"handshake: {type(exc).__name__}: {exc}"[:120]] += 1
                await asyncio.sleep(0.1)
                continue
            self.counts["handshakes"] += 1
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if x509.load_der_x509_certificate(der).not_valid_after_utc <= dt.datetime.now(dt.UTC):
                self.counts["expired leaves presented"] += 1
            try:
                writer.write(request)
                data = await asyncio.wait_for(reader.read(), 15)
                status = int(data.split(b" ", 2)[1])
                body = data.partition(b"\r\n\r\n")[2]
                self.token_answer(status, body, time.time())
            except (OSError, ssl.SSLError, TimeoutError, IndexError, ValueError) as exc:
                self.errors[f"mTLS request: {type(exc).__name__}"] += 1
            writer.close()
            await asyncio.sleep(0.05)

    async def workload_stream(self) -> None:
        from grpclib.client import Channel
        from grpclib.const import Cardinality

        from wlidd.workload_api import workload_pb2

        while time.monotonic() < self.deadline:
            channel = Channel(path=str(self.plan["workload_socket"]))
            try:
                async with channel.request(
                    "/SpiffeWorkloadAPI/FetchX509SVID",
                    cardinality=Cardinality.UNARY_STREAM,
                    request_type=workload_pb2.X509SVIDRequest,
                    reply_type=workload_pb2.X509SVIDResponse,
                    metadata={"workload.spiffe.io": "true"},
                    timeout=max(1.0, self.deadline - time.monotonic()),
                ) as stream:
                    await stream.send_message(workload_pb2.X509SVIDRequest(), end=True)
                    async for message in stream:
                        self.counts["Workload API pushes"] += 1
                        chain = message.svids[0].x509_svid  # DER certificates back to back, the leaf first
                        leaf = x509.load_der_x509_certificate(chain[: 4 + int.from_bytes(chain[2:4], "big")])
                        if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
                            self.counts["expired SVIDs pushed"] += 1
            except Exception as exc:
                if time.monotonic() < self.deadline - 1:
                    self.errors[f"Workload API stream: {type(exc).__name__}"] += 1
            finally:
                channel.close()

    async def run(self) -> None:
        from wlidd.svid.credential_set import CredentialFiles, build_identity
        from wlidd.tlsctx import build_client_context

        client = json.loads(Path(str(self.plan["client"])).read_text())
        context = build_client_context(
            build_identity(
                CredentialFiles(
                    "c", client["chain"].encode(), client["key"].encode(), own_bundle=client["bundle"].encode()
                ),
                dt.datetime.now(dt.UTC),
            )
        )
        clients = int(self.plan["clients"])  # type: ignore[call-overload]
        tasks = []
        for index in range(clients):
            kind = index % 4
            if kind in (0, 1):
                tasks.append(self.token_client(index))
            elif kind == 2:
                tasks.append(self.mtls_client(context))
            else:
                tasks.append(self.workload_stream())
        await asyncio.gather(*tasks)


def run_load(plan_json: str) -> None:
    load = Load(json.loads(plan_json))
    asyncio.run(load.run())
    print(json.dumps({"counts": load.counts, "errors": load.errors, "last_seen": load.last_seen}))


# ---- the controller ----------------------------------------------------------------------------
async def soak(seconds: float, clients: int, processes: int) -> int:
    base = Path(tempfile.mkdtemp(prefix="wlidd-soak-"))
    secrets = base / "secrets"
    ca = CertificateAuthority(DEMO_TRUST_DOMAIN)
    writer = GceCredentialWriter(secrets)
    rotations = 0

    def rotate() -> None:
        nonlocal rotations
        svid = ca.issue_svid(DEMO_PATH, ttl=dt.timedelta(seconds=10))
        writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
        rotations += 1

    rotate()
    upstreams = demo_upstreams(base, ca, lifetime=60)
    client_svid = ca.issue_svid("/ns/soak/sa/client", ttl=dt.timedelta(hours=4))
    (base / "client.json").write_text(
        json.dumps(
            {
                "chain": client_svid.chain_pem.decode(),
                "key": client_svid.key_pem.decode(),
                "bundle": ca.bundle_pem.decode(),
            }
        )
    )
    (base / "client.json").chmod(0o600)
    samples: list[float] = []
    async with anyio.create_task_group() as tg:
        await tg.start(upstreams.run)
        config = write_demo_config(base, secrets, upstreams, token_lifetime=60)
        mtls_port = free_port()
        text = config.read_text().replace('backoff_max = "10s"', 'backoff_max = "10s"\ntimeout = "3s"')
        text = text.replace('start_delay = "2s"', "start_delay = 0").replace('skew = "10s"', 'skew = "2s"')
        text = text.replace(
            "tokens = {", f'tokens = {{ spiffe_ids = ["spiffe://{DEMO_TRUST_DOMAIN}/ns/soak/**"], '
        ).replace('log_level = "info"', 'log_level = "warning"\nlog_format = "json"')
        text += f"""
[listeners.mtls]
address = "127.0.0.1:{mtls_port}"
identity = "default"
allow = ["spiffe://{DEMO_TRUST_DOMAIN}/ns/soak/**"]
max_connections = 1024
max_connections_per_caller = 1024

[listeners.workload_api]
path = "{base / "workload.sock"}"
"""
        config.write_text(text)
        log_path = base / "wlidd.log"
        daemon = start_daemon(config, stderr=open(log_path, "wb"))  # noqa: SIM115
        try:
            wait_for_unix_socket(base / "wlidd.sock", process=daemon)
            await anyio.sleep(2)
            upstreams.inject("sts", STS_FAULT)
            upstreams.inject("sts_mtls", STS_FAULT)
            plan = {
                "seconds": seconds,
                "socket": str(base / "wlidd.sock"),
                "workload_socket": str(base / "workload.sock"),
                "mtls_port": mtls_port,
                "client": str(base / "client.json"),
            }
            loads = [
                await anyio.open_process(
                    [sys.executable, __file__, "--load", json.dumps({**plan, "clients": clients // processes})],
                    env=bench_env(),
                )
                for _ in range(processes)
            ]
            outputs: list[bytes] = [b""] * len(loads)

            async def collect(i: int) -> None:
                assert loads[i].stdout is not None
                async for chunk in loads[i].stdout:
                    outputs[i] += chunk

            for i in range(len(loads)):
                tg.start_soon(collect, i)
            started = time.monotonic()
            next_sample = started + 10
            while time.monotonic() - started < seconds:
                await anyio.sleep(5)
                rotate()
                if time.monotonic() >= next_sample:
                    samples.append(rss_mb(daemon.pid))
                    next_sample += 10
            for process in loads:
                await process.wait()
            await anyio.sleep(0.5)
            alive = daemon.poll() is None
        finally:
            stop_daemon(daemon)
            upstreams.stop()

    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    last_seen: dict[str, float] = {}
    for output in outputs:
        result = json.loads(output.decode().strip().splitlines()[-1])
        counts.update(result["counts"])
        errors.update(result["errors"])
        for token, seen in result["last_seen"].items():
            last_seen[token] = max(seen, last_seen.get(token, 0.0))
    for token, seen in last_seen.items():
        issued = upstreams.issued.get(token)
        if issued is None:
            errors["token not issued by the emulator"] += 1
        elif issued[0].timestamp() <= seen:
            counts["expired tokens served (emulator record)"] += 1
    log_lines = log_path.read_text(errors="replace").splitlines()
    crashes = [line for line in log_lines if "Traceback" in line or '"level": "critical"' in line]
    leaked = find_leak("\n".join(log_lines))
    drift = samples[-1] - samples[0] if len(samples) >= 2 else 0.0

    sts_calls = upstreams.calls["sts"] + upstreams.calls["sts_mtls"]
    print(f"\nsoak {seconds:g}s: {clients} clients in {processes} processes; {rotations} rotations (SVID TTL 10 s)")
    per_flow = Counter(upstreams.issued[t][1] for t in last_seen if t in upstreams.issued)
    print(f"STS calls {sts_calls} with ~30 % faults; distinct tokens served {len(last_seen)} {dict(per_flow)}")
    print(f"daemon log: {log_path}")
    for key in sorted(counts):
        print(f"  {key:<48} {counts[key]}")
    print(f"  {'errors other than documented 503s':<48} {sum(errors.values())}")
    for key, n in errors.most_common(10):
        print(f"      {n:>6}  {key}")
    print(f"  {'daemon tracebacks / critical log lines':<48} {len(crashes)}")
    rss_text = " ".join(f"{s:.0f}" for s in samples[:: max(1, len(samples) // 10)])
    print(f"  RSS MB every ~10 s: {rss_text}; drift first→last {drift:+.1f} MB")
    must_be_zero = {
        "expired tokens served": counts["expired tokens served"] + counts["expired tokens served (emulator record)"],
        "failed handshakes": counts["failed handshakes"],
        "expired leaves presented": counts["expired leaves presented"],
        "expired SVIDs pushed": counts["expired SVIDs pushed"],
        "errors other than documented 503s": sum(errors.values()),
        "daemon tracebacks": len(crashes),
        "daemon died": 0 if alive else 1,
        "secrets in the daemon's log": 0 if leaked is None else 1,
    }
    print("\n| must be zero | count |\n|---|---|")
    for key, value in must_be_zero.items():
        print(f"| {key} | {value} |")
    print(f"| (RSS drift, informational) | {drift:+.1f} MB |")
    worked = counts["token requests"] > 0 and counts["handshakes"] > 0 and counts["Workload API pushes"] > 0
    if not worked:
        print("FAIL: some kind of client never got an answer")
    return 0 if worked and not any(must_be_zero.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "300")))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        run_load(args.load)
        return 0
    return anyio.run(soak, args.seconds, args.clients, args.processes)


if __name__ == "__main__":
    raise SystemExit(main())
