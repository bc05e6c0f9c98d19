"""The real daemon process under systemd's protocols: notify datagrams, watchdog, socket activation, stop."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FileSet, poll_until
from tests.test_cli import write_config as cli_config
from wlidd.emulator.ca import CertificateAuthority
from wlidd.systemd import Notifier, listen_fds, watchdog_period


class NotifySocket:
    """A NOTIFY_SOCKET the test owns: collects every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def read_until(self, key: str, value: str | None = None, timeout: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message
        raise AssertionError(f"no {key} datagram; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def write_config(tmp_path: Path, files: FileSet) -> Path:
    """test_cli's daemon config, re-reading credentials every second."""
    return cli_config(tmp_path, files, 'reload_interval = "1s"\n')


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def start(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wlidd", "run", "--config", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def health(sock: Path) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
        return client.get("http://wlidd/v1/health").status_code


def test_notify_sequence_ready_after_the_socket_answers_reload_and_stopping(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, notify: NotifySocket
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    proc = start(write_config(tmp_path, files), {"NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = notify.read_until("READY", "1")
        assert health(tmp_path / "wlidd.sock") == 200  # READY came only once the socket answers
        assert ready["STATUS"].startswith("serving 1 identities")
        proc.send_signal(signal.SIGHUP)
        reloading = notify.read_until("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert abs(int(reloading["MONOTONIC_USEC"]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
        notify.read_until("READY", "1")
        proc.send_signal(signal.SIGTERM)
        notify.read_until("STOPPING", "1")
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    keys = [next(iter(m)) for m in notify.messages]
    assert keys.index("STOPPING") > keys.index("RELOADING") > keys.index("READY")


def test_watchdog_keeps_pinging_while_degraded(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, notify: NotifySocket
) -> None:
    """The watchdog is liveness, not validity: an expired SVID makes the daemon degraded (503 health,
    STATUS= says so) but a restart would not fix it, so the pings go on."""
    files.put(ca.issue_svid(ttl=dt.timedelta(seconds=4)), ca.bundle_pem)
    proc = start(write_config(tmp_path, files), {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    try:
        notify.read_until("READY", "1")
        notify.read_until("WATCHDOG", "1", timeout=5)  # pinging while healthy
        status = notify.read_until("STATUS", timeout=20)  # the SVID expires: status turns degraded …
        assert status["STATUS"].startswith("degraded"), status
        poll_until(lambda: health(tmp_path / "wlidd.sock") == 503, 20, "/v1/health turned 503")
        notify.messages.clear()
        notify.read_until("WATCHDOG", "1", timeout=2)  # … and the pings go on
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_socket_activation_takes_the_passed_socket(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    activated = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(activated))
    listener.listen()
    config = write_config(tmp_path, files)

    fd = listener.fileno()

    def as_fd_3() -> None:
        os.dup2(fd, 3)  # systemd passes sockets from fd 3 on

    proc = subprocess.Popen(
        ["/bin/sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m wlidd run --config "{config}"'],
        env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "unix"},
        preexec_fn=as_fd_3,
        pass_fds=(fd, 3),  # fd 3 is the dup made in the child; keep it open
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def answers() -> bool:
        try:
            return health(activated) == 200
        except httpx.HTTPError:
            return False

    def never_answered() -> str:
        proc.kill()
        return "the activated socket never answered: " + proc.communicate()[1][-2000:]

    try:
        poll_until(answers, 20, never_answered)
        assert not (tmp_path / "wlidd.sock").exists()  # the configured path was not bound
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert activated.exists()  # systemd's socket is systemd's to remove
        assert "using the socket-activated Unix socket" in stderr
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()


def test_notifier_speaks_the_datagram_protocol_including_abstract_sockets() -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"wlidd-test-{os.getpid()}"
    server.bind(b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.send(READY=1, STATUS="serving")
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"
        notifier.close()
    finally:
        server.close()
    Notifier({}).send(READY=1, STATUS="nobody listens")  # without NOTIFY_SOCKET: a no-op, never an error


def test_watchdog_period_and_listen_fds_follow_the_pid_rules() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "4000000"}, pid=7) == 2.0
    assert watchdog_period({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_period({}, pid=7) is None
    env = {"LISTEN_PID": "8", "LISTEN_FDS": "1"}
    assert listen_fds(env, pid=7) == {} and env == {}  # not ours; and the variables are consumed


def credentials_status(sock: Path) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
        return client.get("http://wlidd/v1/credentials/default").status_code


def test_a_refused_reload_keeps_the_daemon_serving_and_a_good_one_applies_the_policy(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, notify: NotifySocket
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = write_config(tmp_path, files)
    good = config.read_text()
    proc = start(config, {"NOTIFY_SOCKET": str(notify.path)})
    sock = tmp_path / "wlidd.sock"
    try:
        notify.read_until("READY", "1")
        assert credentials_status(sock) == 200  # root, the default
        config.write_text(good + "\n[listeners.unix]\nbogus = 1\n")  # invalid (and a duplicate table)
        proc.send_signal(signal.SIGHUP)
        notify.read_until("RELOADING", "1")
        refused = notify.read_until("STATUS")
        assert refused["STATUS"].startswith("reload refused")
        notify.read_until("READY", "1")
        assert health(sock) == 200 and credentials_status(sock) == 200  # the old config still rules
        config.write_text(good + '\n[policy]\ncredentials = { users = ["nobody"] }\n')
        proc.send_signal(signal.SIGHUP)
        notify.read_until("RELOADING", "1")
        notify.read_until("READY", "1")
        assert credentials_status(sock) == 403  # the new policy is live
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "reload refused: the new configuration is invalid" in stderr and "policy reloaded" in stderr
