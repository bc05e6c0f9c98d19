"""The real daemon process: a SIGHUP while the stop drains in-flight requests sends no READY=1 after
STOPPING=1 (issue 17: `_signals` kept running while draining and every reload ended with READY=1)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FileSet
from tests.test_cli import write_config
from tests.test_systemd import NotifySocket, start
from wlidd.emulator.ca import CertificateAuthority


class HangingUpstream:
    """A TCP server that accepts connections and never answers until `release()` closes them: a token
    fetch against it stays in flight, and so does the request that waits for it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._thread.join(timeout=5)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def upstream() -> Iterator[HangingUpstream]:
    server = HangingUpstream()
    yield server
    server.release()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def wait_for(condition: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_sighup_during_the_stop_drain_sends_no_ready_after_stopping(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, notify: NotifySocket, upstream: HangingUpstream
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    token = (
        '[tokens.gcp]\nflow = "gce-metadata"\non_demand = true\n'
        f'[tokens.gcp.metadata]\nurl = "http://127.0.0.1:{upstream.port}"\n'
    )
    proc = start(write_config(tmp_path, files, token), {"NOTIFY_SOCKET": str(notify.path)})
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr or ()), daemon=True)
    reader.start()
    answers: list[int] = []

    def ask_for_the_token() -> None:  # held in the daemon until the upstream is released
        transport = httpx.HTTPTransport(uds=str(tmp_path / "wlidd.sock"))
        with httpx.Client(transport=transport, timeout=60) as client:
            answers.append(client.get("http://wlidd/v1/token/gcp").status_code)

    asker = threading.Thread(target=ask_for_the_token, daemon=True)
    try:
        notify.read_until("READY", "1")
        asker.start()
        wait_for(lambda: upstream.accepted, "the on-demand fetch never reached the upstream")  # request in flight
        proc.send_signal(signal.SIGTERM)
        notify.read_until("STOPPING", "1")
        proc.send_signal(signal.SIGHUP)  # while the drain waits for the request
        wait_for(lambda: any("SIGHUP" in line for line in stderr), "the SIGHUP was never handled")
        assert proc.poll() is None, "the drain was over before the SIGHUP"
        upstream.release()  # the fetch fails, the request is answered, the drain ends
        assert proc.wait(timeout=30) == 0, "".join(stderr)
        notify.sock.settimeout(0.5)
        while True:  # every datagram the daemon sent
            try:
                data = notify.sock.recv(65536)
            except TimeoutError:
                break
            notify.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
        asker.join(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
    keys = [key for m in notify.messages for key in m if key in ("READY", "RELOADING", "STOPPING")]
    assert keys == ["READY", "STOPPING"], (keys, notify.messages)
    assert notify.messages[-1] == {"STOPPING": "1", "STATUS": "stopping"}  # no STATUS= after it either
    assert answers == [503]  # the request in flight was answered before the daemon exited
