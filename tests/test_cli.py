"""The real `wlidd` process: check, run, status, signals, demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FileSet
from wlidd.emulator.ca import CertificateAuthority

WLIDD = [sys.executable, "-m", "wlidd"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WLIDD, *args], capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ))


def write_config(tmp_path: Path, files: FileSet, extra: str = "") -> Path:
    path = tmp_path / "wlidd.toml"
    path.write_text(
        f"""
[daemon]
log_format = "json"

[identities.default]
source = "files"
cert = "{files.cert}"
key = "{files.key}"
bundle = "{files.bundle}"
mismatch_retries = 1
{extra}
[listeners.unix]
path = "{tmp_path / "wlidd.sock"}"
"""
    )
    return path


def wait_for_socket(path: Path, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {proc.returncode}\n{proc.stderr.read() if proc.stderr else ''}")
        if path.exists():
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as client:
                    health = client.get("http://wlidd/v1/health")
                    # the socket answers while the daemon starts ("starting"): wait for READY's state
                    if health.status_code in (200, 503) and health.json().get("status") != "starting":
                        return
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise AssertionError("daemon socket did not come up")


def status(sock: Path) -> dict[str, object]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
        document: dict[str, object] = client.get("http://wlidd/v1/status").json()
        return document


@pytest.fixture
def daemon_process(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = write_config(tmp_path, files)
    proc = subprocess.Popen(
        [*WLIDD, "run", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sock = tmp_path / "wlidd.sock"
    try:
        wait_for_socket(sock, proc)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_check_passes_on_good_files(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    result = run_cli("check", "--config", str(write_config(tmp_path, files)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   default: spiffe://example.org/ns/default/sa/app" in result.stdout


def test_check_prints_each_problem_and_exits_non_zero(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    files.write("key.pem", ca.issue_svid().key_pem)
    extra = f'\n[identities.second]\nsource = "files"\ncert = "{tmp_path}/none.pem"\nkey = "{files.key}"\nbundle = "{files.bundle}"\nmismatch_retries = 1\n'
    result = run_cli("check", "--config", str(write_config(tmp_path, files, extra)))
    assert result.returncode == 1
    assert "FAIL default: key_mismatch: private key does not match the leaf certificate" in result.stdout
    assert "FAIL second: file_missing:" in result.stdout


def test_config_error_names_key_and_file_without_traceback(tmp_path: Path, files: FileSet) -> None:
    config = write_config(tmp_path, files, "colour = 'blue'\n")
    for command in ("check", "run"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2
        assert f"{config}: identities.default.colour: unknown key" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = run_cli("run", env={**os.environ, "WLIDD_CONFIG": str(tmp_path / "nope.toml")})
    assert result.returncode == 2 and "config file not found" in result.stderr and "Traceback" not in result.stderr


def test_run_serves_status_and_cli_status_reads_it(daemon_process: tuple[subprocess.Popen[str], Path]) -> None:
    _, sock = daemon_process
    result = run_cli("status", "--socket", str(sock), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["identities"]["default"]["valid"] is True


def test_sighup_rereads_credentials(daemon_process: tuple[subprocess.Popen[str], Path]) -> None:
    proc, sock = daemon_process
    before = status(sock)["identities"]["default"]["reloads"]  # type: ignore[index]
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while status(sock)["identities"]["default"]["reloads"] == before:  # type: ignore[index]
        assert time.monotonic() < deadline, "SIGHUP did not cause a reload"
        time.sleep(0.05)


def test_sigterm_stops_gracefully_with_exit_0_and_removes_the_socket(
    daemon_process: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, sock = daemon_process
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert not sock.exists()
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert events[-2:] == ["stopping", "stopped"]
    assert "Traceback" not in stderr


def test_logs_are_json_lines_without_key_material(daemon_process: tuple[subprocess.Popen[str], Path]) -> None:
    proc, _ = daemon_process
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(line["event"] == "credentials loaded" for line in lines)
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    assert "PRIVATE KEY" not in stderr


def test_demo_rotates_and_serves(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), "--rotate-every", "1.5", "--ttl", "30", "--duration", "5")
    assert result.returncode == 0, result.stderr
    assert "curl --unix-socket" in result.stdout
    assert result.stdout.count("rotated: new SVID serial") >= 2
    token_lines = [line for line in result.stdout.splitlines() if line.startswith("tokens:")]
    assert token_lines and all(f"{name}: " in token_lines[-1] for name in ("gcp", "x509", "mds"))
    assert "none" not in token_lines[-1]
    for line in result.stdout.splitlines():
        if line.startswith("rotated:"):
            new, served = line.split("serial ")[1].split(";")[0], line.rsplit("serial ", 1)[1]
            assert new == served


def test_status_table_is_readable(daemon_process: tuple[subprocess.Popen[str], Path]) -> None:
    from wlidd.cli.client_commands import fetch_status, render_status

    _, sock = daemon_process
    table = render_status(fetch_status(sock))
    lines = table.splitlines()
    assert lines[0].startswith("wlidd ") and lines[0].endswith("s") and ": running" in lines[0]
    assert lines[1].split() == ["IDENTITY", "VALID", "LEFT", "SERIAL", "SPIFFE", "ID"]
    assert lines[2].split()[:2] == ["default", "yes"] and "spiffe://example.org/ns/default/sa/app" in lines[2]


def test_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = run_cli("status", "--socket", str(tmp_path / "absent.sock"))
    assert result.returncode == 1
    assert "cannot reach wlidd at" in result.stderr and "is the daemon running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_required_token_that_cannot_be_had_fails_start_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "wlidd.toml"
    config.write_text(
        f"""
[tokens.mds]
flow = "gce-metadata"
require_at_start = true
require_timeout = "1s"
backoff_min = "0.1s"
backoff_max = "0.2s"
metadata.url = "http://127.0.0.1:1"
[listeners.unix]
path = "{tmp_path / "wlidd.sock"}"
"""
    )
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    assert "wlidd: error: token 'mds' could not be obtained within 1s: metadata unreachable" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "wlidd.sock").exists()


def test_a_socket_path_that_is_not_a_socket_fails_start_cleanly(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    occupied = tmp_path / "wlidd.sock"
    occupied.write_text("not a socket")
    result = run_cli("run", "--config", str(write_config(tmp_path, files)))
    assert result.returncode == 3
    assert f"wlidd: error: {occupied} exists and is not a socket; refusing to replace it" in result.stderr
    assert "Traceback" not in result.stderr and occupied.read_text() == "not a socket"
