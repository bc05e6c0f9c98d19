"""The SPIFFE Workload API, judged by py-spiffe (and raw grpcio) in separate processes.

py-spiffe's generated module registers the same global protobuf names as ours (the proto has no
package), so its clients run in child processes, as real clients do anyway.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import FileSet, in_background, wait_until
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, spiffe_bundle

FETCH = """
import json, sys
from spiffe import WorkloadApiClient
from cryptography.hazmat.primitives import serialization
client = WorkloadApiClient(sys.argv[1])
svid = client.fetch_x509_svid()
ctx = client.fetch_x509_context()
key = svid.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
print(json.dumps({"spiffe_id": str(svid.spiffe_id), "serial": format(svid.leaf.serial_number, "x"), "chain": len(svid.cert_chain),
                  "key": key.hex(), "bundles": sorted(str(b.trust_domain) for b in ctx.x509_bundle_set.bundles)}))
client.close()
"""

STREAM = """
import sys, time
from spiffe import WorkloadApiClient
client = WorkloadApiClient(sys.argv[1])
def seen(ctx):
    print("serial", format(ctx.default_svid.leaf.serial_number, "x"), flush=True)
def failed(exc):
    print("error", exc, flush=True)
handle = client.stream_x509_contexts(on_success=seen, on_error=failed, retry_connect=False)
time.sleep(float(sys.argv[2]))
"""

RAW_CALL = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=lambda _: b"", response_deserializer=lambda b: b)
metadata = [("workload.spiffe.io", "true")] if sys.argv[2] == "with-header" else []
try:
    next(iter(call(None, metadata=metadata, timeout=5)))
    print("OK")
except grpc.RpcError as exc:
    print(exc.code().name, exc.details())
"""


@pytest.fixture
async def daemon(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    federated = tmp_path / "partner.json"
    federated.write_text(json.dumps(spiffe_bundle(foreign_ca.root)))
    d = make_daemon(tmp_path, files, bundles={"other.org": federated})
    async with in_background(d.run, d.stop):
        yield d


def make_daemon(tmp_path: Path, files: FileSet, policy: dict[str, Any] | None = None, **identity: Any) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config(**identity)},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "workload_api": {"path": str(tmp_path / "workload.sock")},
                },
                "policy": policy or {},
            }
        )
    )


def endpoint(d: Daemon) -> str:
    assert d.config.listeners.workload_api is not None
    return f"unix://{d.config.listeners.workload_api.path}"


async def read_lines(process: anyio.abc.Process, lines: list[str]) -> None:
    """Append each line the child prints to `lines`, as it comes."""
    assert process.stdout is not None
    buffer = b""
    async for chunk in process.stdout:
        buffer += chunk
        *done, buffer = buffer.split(b"\n")
        lines.extend(line.decode() for line in done)


async def run(code: str, *args: str) -> str:
    result = await anyio.run_process([sys.executable, "-c", code, *args], check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result.stdout.decode()


async def test_py_spiffe_fetches_the_current_svid_with_its_key_and_bundles(daemon: Daemon) -> None:
    seen = json.loads(await run(FETCH, endpoint(daemon)))
    svid = daemon.watchers["default"].current.identity.svid  # type: ignore[union-attr]
    assert seen["spiffe_id"] == str(svid.spiffe_id) and seen["serial"] == svid.serial and seen["chain"] == 2
    assert bytes.fromhex(seen["key"]) == svid.key_der()
    assert seen["bundles"] == ["example.org", "other.org"]


async def test_a_stream_gets_the_new_svid_within_a_second_of_a_gce_symlink_swap(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files

    writer = GceCredentialWriter(tmp_path / "secrets")
    first = ca.issue_svid()
    writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
    d = Daemon(
        Config.model_validate(
            {
                "identities": {"default": {"source": "gce", "dir": str(writer.link), "debounce": 0.02}},
                "listeners": {
                    "unix": {"path": str(tmp_path / "wlidd.sock")},
                    "workload_api": {"path": str(tmp_path / "workload.sock")},
                },
            }
        )
    )
    lines: list[str] = []
    async with in_background(d.run, d.stop):
        process = await anyio.open_process([sys.executable, "-c", STREAM, endpoint(d), "15"])
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_lines, process, lines)
                await wait_until(lambda: f"serial {first.leaf.serial_number:x}" in lines, what="the first push")
                new = ca.issue_svid()
                new_dir = writer.new_contents_dir()
                writer.write_files(new_dir, gce_files(new.chain_pem, new.key_pem, ca_pem=ca.bundle_pem))
                writer.swap_to(new_dir)  # unlink the live link, rename the temp link over it, rm -rf the old dir
                # seen by the watch, not by the periodic re-read (10 min); how fast: bench/rotation_latency.py
                await wait_until(lambda: f"serial {new.leaf.serial_number:x}" in lines, 10, "the rotation's push")
                tg.cancel_scope.cancel()
        finally:
            process.kill()
            await process.aclose()
    assert not [line for line in lines if line.startswith("error")]


async def test_before_any_valid_svid_callers_get_unavailable(tmp_path: Path, files: FileSet) -> None:
    d = make_daemon(tmp_path, files, mismatch_retries=1)  # no files written: nothing valid to serve
    async with in_background(d.run, d.stop):
        answer = await run(RAW_CALL, endpoint(d), "with-header")
    assert answer.startswith("UNAVAILABLE no valid X.509-SVID is available yet")


async def test_a_call_without_the_security_header_is_invalid_argument(daemon: Daemon) -> None:
    assert (await run(RAW_CALL, endpoint(daemon), "no-header")).startswith("INVALID_ARGUMENT security header missing")
    assert (await run(RAW_CALL, endpoint(daemon), "with-header")).strip() == "OK"


async def test_a_caller_the_policy_does_not_allow_gets_permission_denied(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = make_daemon(tmp_path, files, policy={"identity": {"default": {"users": ["nobody"]}}})
    async with in_background(d.run, d.stop):
        answer = await run(RAW_CALL, endpoint(d), "with-header")
    assert answer.startswith("PERMISSION_DENIED") and f"uid {os.getuid()}" in answer


async def test_jwt_methods_are_unimplemented_with_a_clear_message(daemon: Daemon) -> None:
    code = RAW_CALL.replace('"/SpiffeWorkloadAPI/FetchX509SVID"', '"/SpiffeWorkloadAPI/FetchJWTBundles"')
    answer = await run(code, endpoint(daemon), "with-header")
    assert answer.startswith("UNIMPLEMENTED") and "X.509-SVIDs" in answer


async def test_an_invalid_rotation_pushes_nothing(daemon: Daemon, files: FileSet, ca: CertificateAuthority) -> None:
    """The stream's client sees the first SVID, then the next valid one, and nothing between them for the
    refused set: the valid rotation after it is the barrier (a stream's pushes arrive in order)."""
    process = await anyio.open_process([sys.executable, "-c", STREAM, endpoint(daemon), "15"])
    lines: list[str] = []
    watcher = daemon.watchers["default"]
    first = watcher.current.identity.svid.serial  # type: ignore[union-attr]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines, process, lines)
            await wait_until(lambda: lines, 10, "the first push")
            files.write("chain.pem", ca.issue_svid().chain_pem[:100])  # a torn chain: refused
            await wait_until(lambda: watcher.stats.rejections >= 1, 10, "the refusal")
            assert watcher.current is not None and watcher.current.version == 1  # still the first set
            new = ca.issue_svid()
            files.put(new)
            await wait_until(
                lambda: any(line.startswith("serial " + format(new.leaf.serial_number, "x")) for line in lines),
                10,
                "the next valid push",
            )
            tg.cancel_scope.cancel()
    finally:
        process.kill()
        await process.aclose()
    assert lines == [f"serial {first}", f"serial {new.leaf.serial_number:x}"]
    assert daemon.workload_api is not None and daemon.workload_api.pushes == 2


def test_our_proto_is_the_one_py_spiffe_speaks() -> None:
    """Field names, numbers, types and the service's methods equal the reference client's."""
    from google.protobuf import descriptor_pb2

    def contract(path: Path) -> tuple[Any, Any]:
        literal = re.search(r"AddSerializedFile\((b'.*?')\)", path.read_text(), re.S)
        assert literal is not None
        proto = descriptor_pb2.FileDescriptorProto.FromString(eval(literal.group(1)))
        messages = {m.name: sorted((f.name, f.number, f.type, f.label) for f in m.field) for m in proto.message_type}
        methods = sorted(
            (m.name, m.input_type, m.output_type, m.server_streaming) for s in proto.service for m in s.method
        )
        return messages, methods

    reference = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, spiffe; print(os.path.join(os.path.dirname(spiffe.__file__), '_proto', 'workload_pb2.py'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = Path(__file__).resolve().parent.parent / "wlidd" / "workload_api" / "workload_pb2.py"
    assert contract(ours) == contract(Path(reference))


MANY = """
import sys, threading, time
from spiffe import WorkloadApiClient
lock = threading.Lock()
clients = []
for index in range(int(sys.argv[2])):
    client = WorkloadApiClient(sys.argv[1])
    def seen(ctx, index=index):
        with lock:  # callbacks run on one thread per stream: one whole line at a time
            sys.stdout.write(f"{index} {ctx.default_svid.leaf.serial_number:x}\\n")
            sys.stdout.flush()
    def failed(exc):
        with lock:
            sys.stdout.write(f"error {exc}\\n")
            sys.stdout.flush()
    client.stream_x509_contexts(on_success=seen, on_error=failed, retry_connect=False)
    clients.append(client)
time.sleep(float(sys.argv[3]))
"""


async def test_fifty_streaming_clients_all_get_the_rotation_and_status_counts_them(
    daemon: Daemon, files: FileSet, ca: CertificateAuthority
) -> None:
    import httpx

    process = await anyio.open_process([sys.executable, "-c", MANY, endpoint(daemon), "50", "20"])
    assert process.stdout is not None and daemon.workload_api is not None
    seen: dict[str, set[str]] = {}
    others: list[str] = []

    async def read() -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            for line in done:
                match = re.fullmatch(r"(\d+) ([0-9a-f]+)", line.decode().strip())
                if match is None:
                    others.append(line.decode())
                else:
                    seen.setdefault(match.group(2), set()).add(match.group(1))

    first = daemon.watchers["default"].current.identity.svid.serial  # type: ignore[union-attr]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with anyio.move_on_after(30):
                while len(seen.get(first, ())) < 50:
                    await anyio.sleep(0.05)
            assert len(seen.get(first, ())) == 50, ({k: len(v) for k, v in seen.items()}, others[:5], first)
            assert daemon.workload_api.streams == 50
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(daemon.socket_path))) as c:
                status = (await c.get("http://wlidd/v1/status")).json()["workload_api"]
                metrics = (await c.get("http://wlidd/metrics")).text
            assert status["streams"] == 50 and status["pushes"] >= 50 and "default" in status["last_push"]
            assert "wlidd_workload_api_streams 50.0" in metrics
            new = ca.issue_svid()
            files.put(new)
            await wait_until(lambda: len(seen.get(format(new.leaf.serial_number, "x"), ())) == 50, what="50 pushes")
            tg.cancel_scope.cancel()
    finally:
        process.kill()
        await process.aclose()
    assert not [line for line in others if line.startswith("error")], others
