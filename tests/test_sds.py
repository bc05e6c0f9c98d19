"""Envoy's Secret Discovery Service on the Workload API socket, judged by an Envoy stand-in: grpcio and the
xds-protos messages in a child process (tests.sds_envoy), sending what Envoy's SDS client sends (a node
with id, cluster, metadata and build version; resource names; ACKs with version_info and response_nonce;
NACKs with error_detail; reconnects) against a real daemon on a real Unix socket.

"Nothing was sent in between" is checked with a barrier, never a sleep: a stream's responses arrive in
order, so when the next response is the one a later action caused, nothing came before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.conftest import FileSet, in_background, wait_until
from wlidd.config import Config, PolicyConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, spiffe_bundle
from wlidd.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
VALIDATOR_CONFIG = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Envoy:
    """The client process and the events it printed, per stream."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.events: dict[Any, list[dict[str, Any]]] = {}
        self.taken: dict[Any, int] = {}
        self.ready = anyio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                if event.get("event") == "ready":
                    self.ready.set()
                else:
                    self.events.setdefault(event["stream"], []).append(event)

    async def __call__(self, op: str, stream: Any = None, **fields: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps({"op": op, "stream": stream, **fields}).encode() + b"\n")

    async def next(self, stream: Any, timeout: float = 10) -> dict[str, Any]:
        """The stream's next event (a response or its end), waiting for it."""
        index = self.taken.get(stream, 0)
        await wait_until(lambda: len(self.events.get(stream, ())) > index, timeout, f"event {index} of {stream}")
        self.taken[stream] = index + 1
        return self.events[stream][index]

    def pending(self, stream: Any) -> list[dict[str, Any]]:
        return self.events.get(stream, [])[self.taken.get(stream, 0) :]


@asynccontextmanager
async def envoy(socket: Path, uid: int | None = None) -> AsyncIterator[Envoy]:
    command = [sys.executable, "-m", "tests.sds_envoy", str(socket)] + (["--uid", str(uid)] if uid is not None else [])
    process = await anyio.open_process(command, cwd=ROOT, stderr=None)
    client = Envoy(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.read)
            with anyio.fail_after(30):
                await client.ready.wait()
            yield client
            tg.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.aclose()


def make_daemon(
    socket: Path,
    identities: dict[str, Any],
    policy: dict[str, Any] | None = None,
    unix: Path | None = None,
    sds: dict[str, Any] | None = None,
) -> Daemon:
    return Daemon(
        Config.model_validate(
            {
                "identities": identities,
                "listeners": {
                    "unix": {"path": str(unix or socket.with_name("wlidd.sock"))},
                    "workload_api": {"path": str(socket), "sds": sds or {}},
                },
                "policy": policy or {},
            }
        )
    )


def tls(daemon: Daemon, identity: str = "default") -> tuple[str, str]:
    """(chain digest, key digest) of the identity's current SVID as served."""
    state = daemon.watchers[identity].current
    assert state is not None
    return sha(state.identity.svid.chain_pem), sha(state.identity.svid.key_pem())


def served(resource: dict[str, Any]) -> tuple[str, str]:
    return resource["chain_sha256"], resource["key_sha256"]


@pytest.fixture
async def daemon(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> AsyncIterator[Daemon]:
    """One identity (spiffe://example.org/ns/default/sa/app) with a federated bundle for other.org."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    federated = tmp_path / "partner.json"
    federated.write_text(json.dumps(spiffe_bundle(foreign_ca.root)))
    d = make_daemon(tmp_path / "workload.sock", {"default": files.config(bundles={"other.org": federated})})
    async with in_background(d.run, d.stop):
        yield d


def socket_of(d: Daemon) -> Path:
    assert d.config.listeners.workload_api is not None
    return Path(d.config.listeners.workload_api.path)


async def test_a_gce_symlink_swap_reaches_an_open_stream_secrets_stream(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files

    writer = GceCredentialWriter(tmp_path / "secrets")
    first = ca.issue_svid()
    writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
    d = make_daemon(
        tmp_path / "workload.sock", {"default": {"source": "gce", "dir": str(writer.link), "debounce": 0.02}}
    )
    async with in_background(d.run, d.stop), envoy(socket_of(d)) as client:
        await client("open", "tls", kind="sotw")
        await client("send", "tls", names=["default"])
        response = await client.next("tls")
        assert response["type_url"] == SECRET and response["version"] and response["nonce"]
        [secret] = response["resources"]
        assert secret["name"] == "default" and secret["type"] == "tls_certificate"
        assert served(secret) == tls(d)
        await client("ack", "tls")

        new = ca.issue_svid()
        new_dir = writer.new_contents_dir()
        writer.write_files(new_dir, gce_files(new.chain_pem, new.key_pem, ca_pem=ca.bundle_pem))
        writer.swap_to(new_dir)  # unlink the live link, rename the temp link over it, rm -rf the old dir
        pushed = await client.next("tls")
        [secret] = pushed["resources"]
        assert secret["chain_sha256"] == sha(new.chain_pem) and served(secret) == tls(d)
        assert pushed["version"] != response["version"] and pushed["nonce"] != response["nonce"]

        # Envoy reconnects (a new stream, its last accepted version in the first request): answered at once
        await client("ack", "tls")
        await client("close", "tls")
        assert (await client.next("tls"))["event"] == "end"
        await client("open", "again", kind="sotw")
        await client("send", "again", names=["default"], version=pushed["version"])
        [secret] = (await client.next("again"))["resources"]
        assert secret["chain_sha256"] == sha(new.chain_pem)


async def test_after_a_nack_nothing_is_resent_until_a_rotation_which_is_pushed(
    daemon: Daemon, files: FileSet, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        first = await client.next("s")
        await client("nack", "s", error="Failed to load certificate chain from <inline>")
        await wait_until(
            lambda: (
                daemon.workload_api is not None
                and daemon.workload_api.sds is not None
                and daemon.workload_api.sds.nacks == 1
            ),
            what="the NACK",
        )
        new = ca.issue_svid()
        files.put(new)
        pushed = await client.next("s")
        [secret] = pushed["resources"]
        assert secret["chain_sha256"] == sha(new.chain_pem) and pushed["version"] != first["version"]
    assert not client.pending("s")


async def test_a_nacked_version_is_not_resent_on_unrelated_events(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stream asks for `default`; another identity rotates and the policy is reloaded (to the same
    rules), and the stream is sent nothing; then `default` rotates and that is the next response."""
    mine, other = FileSet(tmp_path / "mine"), FileSet(tmp_path / "other")
    mine.put(ca.issue_svid(), ca.bundle_pem)
    other.put(ca.issue_svid("/ns/default/sa/other"), ca.bundle_pem)
    d = make_daemon(tmp_path / "workload.sock", {"default": mine.config(), "other": other.config()})
    async with in_background(d.run, d.stop), envoy(socket_of(d)) as client:
        assert d.workload_api is not None and d.workload_api.sds is not None
        sds = d.workload_api.sds
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"], node={"id": "sidecar-7", "cluster": "payments"})
        first = await client.next("s")
        await client("nack", "s", error="certificate rejected by the test")
        await wait_until(lambda: sds.nacks == 1, what="the NACK")
        pushes = sds.pushes

        other_version = d.watchers["other"].current.version  # type: ignore[union-attr]
        other.put(ca.issue_svid("/ns/default/sa/other"))
        watcher = d.watchers["other"]
        await wait_until(
            lambda: watcher.current is not None and watcher.current.version > other_version, what="rotated"
        )
        d.workload_api.set_policy(Policy.from_config(d.config.policy))
        new = ca.issue_svid()
        mine.put(new)
        pushed = await client.next("s")
        assert pushed["resources"][0]["chain_sha256"] == sha(new.chain_pem) and pushed["version"] != first["version"]
        assert sds.pushes == pushes + 1  # the rotation of `default` only
    logged = capsys.readouterr().out
    assert "Envoy rejected the secrets sent" in logged and "certificate rejected by the test" in logged
    line = logged.split("Envoy rejected the secrets sent", 1)[1].splitlines()[0]
    assert "default" in line and "sidecar-7" in line and "payments" in line


async def test_an_unknown_name_is_left_out_and_the_stream_goes_on(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["spiffe://example.org/not-mine"])
        await wait_until(lambda: "no secret for" in capsys.readouterr().out, what="the warning")
        await client("send", "s", names=["spiffe://example.org/not-mine", "default"])
        response = await client.next("s")  # the first response: nothing was sent for the unknown name alone
        assert [r["name"] for r in response["resources"]] == ["default"]
        await client(
            "send",
            "s",
            names=["default", "spiffe://example.org/ns/default/sa/app"],
            version=response["version"],
            nonce=response["nonce"],
        )
        response = await client.next("s")
        assert [r["name"] for r in response["resources"]] == ["default", "spiffe://example.org/ns/default/sa/app"]
        assert served(response["resources"][0]) == served(response["resources"][1]) == tls(daemon)


async def test_a_caller_without_credentials_rights_gets_permission_denied_on_every_method(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = make_daemon(
        tmp_path / "workload.sock", {"default": files.config()}, {"identity": {"default": {"users": ["nobody"]}}}
    )
    async with in_background(d.run, d.stop), envoy(socket_of(d)) as client:
        # The streams are refused on their headers, before any request is read (a caller with no rights has
        # nothing read): the client sends none, as grpcio may report a request written into the refusal
        # as its own INTERNAL error.
        await client("open", "s", kind="sotw")
        await client("open", "d", kind="delta")
        await client("fetch", "f", names=["ROOTCA"])
        for stream in ("s", "d", "f"):
            end = await client.next(stream)
            assert end["event"] == "end" and end["code"] == "PERMISSION_DENIED", end
            assert f"uid {os.getuid()}" in end["details"]


async def test_a_reload_that_revokes_the_caller_ends_its_stream_with_permission_denied(daemon: Daemon) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        await client.next("s")
        assert daemon.workload_api is not None
        daemon.workload_api.set_policy(
            Policy.from_config(PolicyConfig.model_validate({"credentials": {"users": ["nobody"]}}))
        )
        end = await client.next("s")
        assert end["event"] == "end" and end["code"] == "PERMISSION_DENIED"


async def test_all_holds_every_trust_domain_for_the_spiffe_validator_and_each_domain_has_its_own_name(
    daemon: Daemon, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    bundles = {"example.org": sha(ca.bundle_pem), "other.org": sha(foreign_ca.bundle_pem)}
    async with envoy(socket_of(daemon)) as client:
        await client("open", "all", kind="sotw")
        await client("send", "all", names=["ALL"])
        [secret] = (await client.next("all"))["resources"]
        assert secret["name"] == "ALL" and secret["type"] == "validation_context"
        assert secret["validator"] == SPIFFE_VALIDATOR and secret["typed_config"] == VALIDATOR_CONFIG
        assert secret["trust_domains"] == bundles and secret["trust_domain_order"] == ["example.org", "other.org"]

        await client("open", "each", kind="sotw")
        await client("send", "each", names=["ROOTCA", "spiffe://other.org", "spiffe://example.org"])
        resources = (await client.next("each"))["resources"]
        assert [(r["name"], r["trust_domains"]) for r in resources] == [
            ("ROOTCA", {"example.org": bundles["example.org"]}),
            ("spiffe://other.org", {"other.org": bundles["other.org"]}),
            ("spiffe://example.org", {"example.org": bundles["example.org"]}),
        ]
        # an Envoy that turns SPIFFE validation off in its node metadata gets trusted_ca, as from SPIRE
        await client("open", "plain", kind="sotw")
        await client("send", "plain", names=["ROOTCA"], node={"metadata": {"disable_spiffe_cert_validation": True}})
        [secret] = (await client.next("plain"))["resources"]
        assert secret["trusted_ca_sha256"] == bundles["example.org"] and "validator" not in secret


async def test_delta_secrets_sends_what_is_subscribed_and_removes_what_is_unknown(
    daemon: Daemon, files: FileSet, ca: CertificateAuthority
) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("open", "d", kind="delta")
        await client("send", "d", subscribe=["default", "ROOTCA", "nothing-here"])
        first = await client.next("d")
        assert sorted(r["name"] for r in first["resources"]) == ["ROOTCA", "default"]
        assert first["removed"] == ["nothing-here"] and all(r["version"] for r in first["resources"])
        versions = {r["name"]: r["version"] for r in first["resources"]}
        await client("ack", "d")

        await client("send", "d", unsubscribe=["ROOTCA"], subscribe=["spiffe://other.org"], node=False)
        second = await client.next("d")
        assert [r["name"] for r in second["resources"]] == ["spiffe://other.org"] and second["removed"] == []
        await client("ack", "d")

        new = ca.issue_svid()
        files.put(new)  # only `default` changed: only it is sent, not the bundles the client has
        third = await client.next("d")
        [secret] = third["resources"]
        assert secret["name"] == "default" and secret["chain_sha256"] == sha(new.chain_pem)
        assert secret["version"] != versions["default"]

        # a reconnecting client that has the current versions is sent nothing for them, only what it lacks
        await client("open", "again", kind="delta")
        await client("send", "again", subscribe=["default", "ROOTCA"], initial={"default": secret["version"]})
        [only] = (await client.next("again"))["resources"]
        assert only["name"] == "ROOTCA"


async def test_fetch_secrets_answers_once_without_version_or_nonce(daemon: Daemon) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("fetch", "f", names=["default", "ROOTCA", "unknown"])
        response = await client.next("f")
    assert response["version"] == "" and response["nonce"] == ""
    assert [r["name"] for r in response["resources"]] == ["default", "ROOTCA"]
    assert served(response["resources"][0]) == tls(daemon)


@pytest.mark.skipif(os.geteuid() != 0, reason="clients of two other uids need root to start them")
async def test_a_hundred_concurrent_streams_of_two_callers_all_get_the_rotation(
    shared_dir: Path, tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """100 StreamSecrets streams, 50 from each of two uids (one uid may hold 64 calls), every one acking."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    uids = (61001, 61002)
    d = make_daemon(
        shared_dir / "workload.sock",
        {"default": files.config()},
        {"identity": {"default": {"users": [str(u) for u in uids]}}},
        unix=tmp_path / "wlidd.sock",
    )
    async with in_background(d.run, d.stop), envoy(socket_of(d), uids[0]) as one, envoy(socket_of(d), uids[1]) as two:
        for client in (one, two):
            await client("many", count=50, first=0, names=["default"])
        for client in (one, two):
            for stream in range(50):
                assert served((await client.next(stream, 30))["resources"][0]) == tls(d)
        assert d.workload_api is not None and d.workload_api.sds is not None
        assert d.workload_api.sds.streams == 100
        new = ca.issue_svid()
        files.put(new)
        for client in (one, two):
            for stream in range(50):
                response = await client.next(stream, 30)
                assert response["resources"][0]["chain_sha256"] == sha(new.chain_pem)


async def test_a_request_for_another_resource_type_ends_the_stream_with_invalid_argument(daemon: Daemon) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"], type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
        end = await client.next("s")
    assert end["event"] == "end" and end["code"] == "INVALID_ARGUMENT" and "is not served here" in end["details"]


async def test_a_request_over_a_mebibyte_is_refused_before_it_is_read(daemon: Daemon) -> None:
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"], pad=[600, 2000])
        end = await client.next("s")
    assert end["event"] == "end" and end["code"] == "RESOURCE_EXHAUSTED" and "at most 1048576" in end["details"]


def test_sds_switched_off_registers_no_method_and_imports_no_envoy_module() -> None:
    code = """
import sys
from wlidd.clock import utc_now
from wlidd.config import PolicyConfig
from wlidd.policy import Policy
from wlidd.workload_api.sds_settings import SdsSettings
from wlidd.workload_api.server import WorkloadApi
policy = Policy.from_config(PolicyConfig(), log_unknown=False)
off = WorkloadApi({}, policy, utc_now, sds=SdsSettings(enabled=False))
assert not [m for m in off.__mapping__() if "envoy" in m] and "envoy" not in sys.modules
on = WorkloadApi({}, policy, utc_now)
print(sorted(m for m in on.__mapping__() if "envoy" in m))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        "['/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets',",
        "'/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets',",
        "'/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets']",
    ]


async def test_the_config_names_the_resources_and_can_switch_sds_off(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """`[listeners.workload_api.sds]` as SPIRE's agent `sds` block: the names Envoy asks for are the
    configured ones (the defaults are then unknown names), and `enabled = false` serves no SDS method."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    names = {"default_svid_name": "svid", "default_bundle_name": "roots", "default_all_bundles_name": "everything"}
    d = make_daemon(tmp_path / "workload.sock", {"default": files.config()}, sds=names)
    async with in_background(d.run, d.stop), envoy(socket_of(d)) as client:
        await client("fetch", "f", names=["svid", "roots", "everything", "default", "ROOTCA", "ALL"])
        response = await client.next("f")
        assert [r["name"] for r in response["resources"]] == ["svid", "roots", "everything"]
        assert served(response["resources"][0]) == tls(d)
    off = make_daemon(tmp_path / "off.sock", {"default": files.config()}, sds={"enabled": False})
    async with in_background(off.run, off.stop), envoy(socket_of(off)) as client:
        await client("fetch", "f", names=["default"])
        end = await client.next("f")
    assert end["event"] == "end" and end["code"] == "UNIMPLEMENTED"
