"""Every source follows every real writer: a real `wlidd run` process, files written as the tools write them.

Issue 14, sources side: items 1 (gce on a plain directory), 2 (a re-pointed parent link whose old
target survives), 3 (a set caught mid-write is retried quietly, never counted or logged as a
rejection) and 7 (a files source reads one generation, never a mix). Writers: tests/writers.py.

Each case starts one daemon (reload_interval 10m, so only file events can explain a prompt
reload), rotates three times and waits (by polling /v1/status) for the new serial within
ROTATION_DEADLINE. Afterwards no rejection may have been counted (wlidd_identity_rejections_total),
logged ("credential set rejected") or left in status (last_error).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_cli import WLIDD, wait_for_socket
from tests.writers import (
    GceSymlinkSwapWriter,
    InPlaceWriter,
    KubernetesAtomicWriter,
    RenameIntoDirWriter,
    RepointedParentWriter,
    Writer,
)
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid

ROTATION_DEADLINE = 10.0  # seconds for a rotation to be served ("the usual latency" is well below)
ROTATIONS = 3
REPO = Path(__file__).resolve().parent.parent

GCE_NAMES = ("certificates.pem", "private_key.pem", "ca_certificates.pem")  # SPECS.md §1.2
TLS_NAMES = ("tls.crt", "tls.key", "ca.crt")  # kubernetes.io/tls Secrets, cert-manager csi-driver(-spiffe)

SOURCES = ("gce", "files", "certificate_config")
WRITERS = ("kubernetes-atomic", "rename-into-dir", "in-place-rewrite", "gce-symlink-swap", "repointed-parent")


def make_writer(kind: str, root: Path) -> Writer:
    if kind == "kubernetes-atomic":
        return KubernetesAtomicWriter(root / "mount")
    if kind == "rename-into-dir":
        return RenameIntoDirWriter(root / "certs")
    if kind == "in-place-rewrite":
        return InPlaceWriter(root / "certs")
    if kind == "gce-symlink-swap":
        return GceSymlinkSwapWriter(root / "secrets")
    if kind == "repointed-parent":
        return RepointedParentWriter(root / "releases")
    raise AssertionError(kind)


@dataclass
class Case:
    """One source reading what one writer publishes; `names` are chain, key, bundle file names."""

    source: str
    writer: Writer
    names: tuple[str, str, str]
    root: Path

    def payload(self, svid: IssuedSvid, bundle_pem: bytes) -> dict[str, bytes]:
        chain, key, bundle = self.names
        files = {chain: svid.chain_pem, key: svid.key_pem, bundle: bundle_pem}
        if isinstance(self.writer, GceSymlinkSwapWriter):
            files["config_status"] = b'{"status":"Ok"}'  # the agent writes it beside the MDS-source files
        return files

    def identity_toml(self) -> str:
        visible = self.writer.visible_dir
        chain, key, bundle = (visible / name for name in self.names)
        if self.source == "gce":
            return f'source = "gce"\ndir = "{visible}"\n'
        if self.source == "files":
            return f'source = "files"\ncert = "{chain}"\nkey = "{key}"\nbundle = "{bundle}"\n'
        gcloud = self.root / "gcloud"
        gcloud.mkdir(exist_ok=True)
        document = {"version": 1, "cert_configs": {"workload": {"cert_path": str(chain), "key_path": str(key)}}}
        (gcloud / "certificate_config.json").write_text(json.dumps(document))
        return (
            f'source = "certificate_config"\ncertificate_config = "{gcloud / "certificate_config.json"}"\n'
            f'bundle = "{bundle}"\n'
        )


def make_case(source: str, kind: str, root: Path) -> Case:
    # The layout gets its own directory, apart from the daemon's log and socket: a gce source watches
    # the parent of its dir, and a log written there would wake the daemon's retries on every line.
    writer = make_writer(kind, root / "layout")
    names = GCE_NAMES if source == "gce" or kind == "gce-symlink-swap" else TLS_NAMES
    return Case(source, writer, names, root)


def write_config(case: Case) -> Path:
    path = case.root / "daemon" / "wlidd.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"""
[daemon]
log_format = "json"
log_level = "info"

[identities.default]
{case.identity_toml()}reload_interval = "10m"
debounce = "50ms"
mismatch_retries = 10
mismatch_retry_delay = "200ms"

[listeners.unix]
path = "{case.root / "daemon" / "wlidd.sock"}"
"""
    )
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path
    client: httpx.Client

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = self.client.get("http://wlidd/v1/status").json()["identities"]["default"]
        return document

    def rejections_counted(self) -> float:
        """Sum of wlidd_identity_rejections_total{identity="default",…} in /metrics (0 when absent)."""
        text = self.client.get("http://wlidd/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("wlidd_identity_rejections_total{") and 'identity="default"' in line
        )

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def wait_for_serial(self, serial: str, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + ROTATION_DEADLINE
        while True:
            document = self.status()
            if document["serial"] == serial:
                return document
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(
                    f"{what}: serial {serial} not served within {ROTATION_DEADLINE:.0f}s; the daemon serves "
                    f"{document['serial']} (reloads={document['reloads']}, last_error={document['last_error']})"
                )
            time.sleep(0.02)

    def assert_no_rejection(self) -> None:
        document = self.status()
        rejected = [e for e in self.log_events() if e.get("event") == "credential set rejected"]
        assert not rejected, f"rejections logged: {[(e.get('reason'), e.get('detail')) for e in rejected]}"
        assert self.rejections_counted() == 0, "wlidd_identity_rejections_total counted a mid-rotation set"
        assert document["rejections"] == 0 and document["last_error"] is None, (
            f"status after a good set: rejections={document['rejections']}, last_error={document['last_error']}"
        )


@contextmanager
def running_daemon(root: Path, command: list[str]) -> Iterator[Daemon]:
    sock, log = root / "daemon" / "wlidd.sock", root / "daemon" / "wlidd.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
    try:
        try:
            wait_for_socket(sock, proc)  # type: ignore[arg-type]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from None
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as client:
            yield Daemon(proc, sock, log, client)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def serial(svid: IssuedSvid) -> str:
    return format(svid.leaf.serial_number, "x")


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_serves_each_rotation_by_a_real_writer_without_a_rejection(
    tmp_path: Path, ca: CertificateAuthority, source: str, kind: str
) -> None:
    """Three rotations by `kind` are each served within the deadline; mid-write sets are not rejections."""
    case = make_case(source, kind, tmp_path)
    first = ca.issue_svid()
    case.writer.write(case.payload(first, ca.bundle_pem))
    with running_daemon(tmp_path, [*WLIDD, "run", "--config", str(write_config(case))]) as daemon:
        daemon.wait_for_serial(serial(first), "start")
        for rotation in range(1, ROTATIONS + 1):
            svid = ca.issue_svid()
            case.writer.write(case.payload(svid, ca.bundle_pem))
            daemon.wait_for_serial(serial(svid), f"rotation {rotation} by {kind}")
        daemon.assert_no_rejection()


@pytest.mark.parametrize("source", SOURCES)
def test_a_kubernetes_swap_between_two_file_reads_is_not_a_mixed_set(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority, source: str
) -> None:
    """A ..data swap that lands between the daemon's reads of one set (with a CA rotation, so the
    generations' chain and bundle do not verify across) is served as the new set and never rejected."""
    case = make_case(source, "kubernetes-atomic", tmp_path)
    first = ca.issue_svid()
    case.writer.write(case.payload(first, ca.bundle_pem))
    stage = tmp_path / "stage"
    command = [sys.executable, "-m", "tests.writers", "swap-mid-read", str(case.writer.visible_dir), str(stage)]
    with running_daemon(tmp_path, [*command, "--", "run", "--config", str(write_config(case))]) as daemon:
        daemon.wait_for_serial(serial(first), "start")
        second = other_ca.issue_svid()  # the new CA; the new bundle carries both roots (a rollover)
        staging = tmp_path / "stage.tmp"
        staging.mkdir()
        for name, data in case.payload(second, other_ca.bundle_pem + ca.bundle_pem).items():
            (staging / name).write_bytes(data)
        os.rename(staging, stage)  # armed: the daemon's next read is cut by the swap
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for_serial(serial(second), "swap between two reads")
        assert not stage.exists(), "the swap was never made during a read"
        daemon.assert_no_rejection()
