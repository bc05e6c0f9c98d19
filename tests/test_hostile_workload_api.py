"""A hostile local user against the SPIFFE Workload API, and kernel groups on the Unix sockets (issue 13,
items 2, 3 and 9), tried on a real daemon process (`wlidd run`) with real clients: a raw HTTP/2 client
that breaks the rules, py-spiffe, and forked children that changed their groups and dropped to nobody.

The raw client never prints what it received: the daemon hands it a private key.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import pytest
from hyperframe.frame import DataFrame, PingFrame

from tests.conftest import FileSet, as_user, in_background
from tests.test_workload_api import make_daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.workload_api.server import build_server, serve_accepted

NOBODY = 65534
MB = 1024 * 1024
GRPC_STATUS = {"3": "INVALID_ARGUMENT", "4": "DEADLINE_EXCEEDED", "7": "PERMISSION_DENIED", "8": "RESOURCE_EXHAUSTED"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid and groups in a child needs root")


# ---- a raw HTTP/2 gRPC client: obeys the protocol only as far as a test wants ----------------------


@dataclass
class CallResult:
    """What came back on one stream (counts only: a response carries a private key)."""

    status: str | None = None  # grpc-status, by name when known
    message: str = ""
    data_bytes: int = 0
    reset: bool = False
    ended: bool = False

    @property
    def done(self) -> bool:
        return self.status is not None or self.reset or self.ended


class RawGrpc:
    """A synchronous HTTP/2 client over a Unix socket, built on h2 (usable in a forked child): connects
    to `path`, or speaks over `sock`, a connected socket."""

    def __init__(self, path: str | Path | None = None, sock: socket.socket | None = None) -> None:
        if sock is None:
            assert path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(path))
        self.sock = sock
        self.calls: dict[int, CallResult] = {}
        self.closed = False  # the server closed the connection (EOF, reset or GOAWAY)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def call(self, *, security_header: bool = True, method: str = "/SpiffeWorkloadAPI/FetchX509SVID") -> int:
        """Open a stream for `method` (headers only); its id."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if security_header:
            headers.append(("workload.spiffe.io", "true"))
        self.h2.send_headers(stream_id, headers)
        self.flush()
        self.calls[stream_id] = CallResult()
        return stream_id

    def request(self, stream_id: int, message: bytes = b"") -> None:
        """Send one whole gRPC message and end the stream (a well-behaved unary request)."""
        self.h2.send_data(stream_id, struct.pack(">?I", False, len(message)) + message, end_stream=True)
        self.flush()

    def receive(self, timeout: float) -> bool:
        """Read once (up to `timeout` seconds) and process what came; False once the connection is gone."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return True  # nothing yet
        except OSError:
            data = b""
        finally:
            self.sock.settimeout(10)  # writes block again (a non-blocking sendall could write half a frame)
        if not data:
            self.closed = True
            return False
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for event in events:
            self._event(event)
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            self.flush()
        return not self.closed

    def _event(self, event: h2.events.Event) -> None:
        call = self.calls.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and call is not None:
            headers: dict[str, str] = {str(k): str(v) for k, v in event.headers or []}  # str: header_encoding
            if "grpc-status" in headers:
                call.status = GRPC_STATUS.get(headers["grpc-status"], headers["grpc-status"])
                call.message = headers.get("grpc-message", "")
        elif isinstance(event, h2.events.DataReceived) and call is not None:
            call.data_bytes += len(event.data or b"")
            if event.stream_id is not None and event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamReset) and call is not None:
            call.reset = True
        elif isinstance(event, h2.events.StreamEnded) and call is not None:
            call.ended = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    def wait(self, stream_id: int, until: Any = lambda call: call.done, timeout: float = 10.0) -> CallResult:
        """Read until `until(call)` (by default: the call has an outcome: status, reset or end), the
        connection closed, or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        call = self.calls[stream_id]
        while not until(call) and not self.closed and time.monotonic() < deadline:
            self.receive(max(0.01, deadline - time.monotonic()))
        return call

    def wait_for_data(self, stream_id: int, timeout: float = 10.0) -> CallResult:
        return self.wait(stream_id, lambda call: call.data_bytes > 0 or call.done, timeout)

    def push(self, stream_id: int, declared: int, budget: int, stall: float = 2.0) -> int:
        """Send a gRPC message prefix declaring `declared` bytes, then up to `budget` bytes of its body as
        fast as the server's flow-control windows allow. Stops when the call has an outcome, the
        connection closes, or the server opened no window for `stall` seconds. The body bytes sent."""
        self.h2.send_data(stream_id, struct.pack(">?I", False, declared))
        self.flush()
        chunk = b"\0" * 16384
        sent = 0
        call = self.calls[stream_id]
        while sent < budget and not call.done and not self.closed:
            try:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                break
            if window <= 0:
                waited = time.monotonic()
                while not self.closed and not call.done and self.h2.local_flow_control_window(stream_id) <= 0:
                    if time.monotonic() - waited > stall:
                        return sent
                    self.receive(0.1)
                continue
            size = min(window, len(chunk), budget - sent)
            try:
                self.h2.send_data(stream_id, chunk[:size])
                self.flush()
            except (h2.exceptions.StreamClosedError, OSError):
                break
            sent += size
            self.receive(0)  # let RST_STREAM, trailers and WINDOW_UPDATEs in as they come
        return sent

    def blast(self, frames: bytes) -> bool:
        """Write raw frames without regard to flow control; False if the server cut the connection first."""
        try:
            self.sock.settimeout(10)
            self.sock.sendall(frames)
            return True
        except OSError:
            self.closed = True
            return False


# ---- a real daemon process ------------------------------------------------------------------------


class DaemonProcess:
    """`wlidd run` with a Unix API socket and a Workload API socket in `shared_dir`, mode 0666."""

    def __init__(self, tmp_path: Path, shared_dir: Path, identities: dict[str, FileSet]) -> None:
        self.config = tmp_path / "wlidd.toml"
        self.log = tmp_path / "wlidd.log"
        self.socket = shared_dir / "wlidd.sock"
        self.workload = shared_dir / "workload.sock"
        self.identities = identities
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, policy: dict[str, dict[str, list[str | int]]]) -> None:
        """Write the config; `policy` maps identity names to their rule (users/groups)."""
        lines = []
        for name, files in self.identities.items():
            lines += [
                f"[identities.{name}]",
                'source = "files"',
                f'cert = "{files.cert}"',
                f'key = "{files.key}"',
                f'bundle = "{files.bundle}"',
                'debounce = "20ms"',
            ]
        lines += ["[listeners.unix]", f'path = "{self.socket}"', 'mode = "0666"']
        lines += ["[listeners.workload_api]", f'path = "{self.workload}"']
        for name, rule in policy.items():
            lines += [f"[policy.identity.{name}]"] + [f"{key} = {json.dumps(value)}" for key, value in rule.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "wlidd", "run", "--config", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the daemon never served both sockets"
            if self.workload.exists() and self.socket.exists():
                with contextlib.suppress(httpx.HTTPError):
                    status = self.status()  # the socket answers while starting: wait for READY's state
                    if status["identities"] and status["daemon"]["state"] != "starting":
                        return
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=10) as client:
            document: dict[str, Any] = client.get("http://wlidd/v1/status").json()
        return document

    def rss_kb(self) -> int:
        """The daemon's resident set (VmRSS, KiB)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> str:
        """Stop it; its log, which must hold no traceback."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        logged = self.log.read_text() if self.log.exists() else ""
        assert "Traceback" not in logged, logged[-3000:]
        return logged


@pytest.fixture
def one_identity(tmp_path: Path, ca: CertificateAuthority) -> dict[str, FileSet]:
    files = FileSet(tmp_path / "creds")
    files.put(ca.issue_svid(), ca.bundle_pem)
    return {"default": files}


@pytest.fixture
def daemon(tmp_path: Path, shared_dir: Path, one_identity: dict[str, FileSet]) -> Iterator[DaemonProcess]:
    """A daemon whose only identity is handed to root alone (the default policy)."""
    node = DaemonProcess(tmp_path, shared_dir, one_identity)
    node.write({})
    node.start()
    try:
        yield node
    finally:
        node.stop()


def warm_up(node: DaemonProcess) -> int:
    """One ordinary call (so the first call's imports and caches are not counted), then the RSS."""
    client = RawGrpc(str(node.workload))
    try:
        stream_id = client.call()
        client.request(stream_id)
        assert client.wait_for_data(stream_id).data_bytes > 0
    finally:
        client.close()
    node.status()
    return node.rss_kb()


# ---- item 2: nothing big is read before the caller is authorized, and nothing big after ------------


def test_a_call_without_the_security_header_is_refused_before_its_body_is_read(daemon: DaemonProcess) -> None:
    before = warm_up(daemon)
    client = RawGrpc(str(daemon.workload))
    try:
        stream_id = client.call(security_header=False)
        pushed = client.push(stream_id, declared=0xFFFFFFFF, budget=50 * MB)  # declares 4 GiB
        call = client.wait(stream_id)
    finally:
        client.close()
    daemon.status()  # the daemon has handled everything sent before this answer
    grown = daemon.rss_kb() - before
    assert pushed < 1 * MB, f"the daemon let {pushed} bytes of an unauthenticated body in"
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"
    assert call.status == "INVALID_ARGUMENT" and "security header" in call.message


def test_a_request_declared_larger_than_the_cap_is_refused_without_buffering(daemon: DaemonProcess) -> None:
    before = warm_up(daemon)
    client = RawGrpc(str(daemon.workload))
    try:
        stream_id = client.call()  # with the header, as root: an authorized caller
        pushed = client.push(stream_id, declared=0xFFFFFFFF, budget=50 * MB)
        call = client.wait(stream_id, lambda call: call.reset)
    finally:
        client.close()
    daemon.status()
    grown = daemon.rss_kb() - before
    assert pushed < 1 * MB, f"the daemon let {pushed} bytes of an oversized request in"
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"
    assert call.status == "RESOURCE_EXHAUSTED" and "4294967295 bytes" in call.message
    assert call.reset, "the stream must be reset, not left for the client to keep sending"


def test_a_peer_sending_past_the_flow_control_window_is_cut_off(daemon: DaemonProcess) -> None:
    before = warm_up(daemon)
    client = RawGrpc(str(daemon.workload))
    try:
        stream_id = client.call()
        client.h2.send_data(stream_id, struct.pack(">?I", False, 0))  # a valid empty request, stream left open
        client.flush()
        client.wait_for_data(stream_id)  # served: the daemon reads nothing more of this stream
        frame = DataFrame(stream_id, data=b"\0" * 16384).serialize()
        client.blast(frame * 128)  # 2 MiB that the daemon never opened a window for
        deadline = time.monotonic() + 10
        while client.receive(1.0) and time.monotonic() < deadline:
            pass
    finally:
        client.close()
    daemon.status()
    grown = daemon.rss_kb() - before
    assert client.closed, "a peer ignoring flow control must lose its connection (FLOW_CONTROL_ERROR)"
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"


def test_a_flood_of_empty_data_frames_ends_the_connection_with_enhance_your_calm(daemon: DaemonProcess) -> None:
    """Empty DATA frames take no flow-control window, and grpclib queued an object for each: 2,000,000 of
    them (18 MB on the wire) grew the daemon by 171 MB, without bound (CVE-2019-9518's "empty frames
    flood"). Past a budget the connection ends with GOAWAY ENHANCE_YOUR_CALM, as nghttp2 does."""
    before = warm_up(daemon)
    client = RawGrpc(str(daemon.workload))
    terminated: list[int] = []
    original = client._event

    def event(e: h2.events.Event) -> None:
        if isinstance(e, h2.events.ConnectionTerminated):
            terminated.append(int(e.error_code or 0))
        original(e)

    client._event = event  # type: ignore[method-assign]
    try:
        stream_id = client.call()
        frame = DataFrame(stream_id, data=b"").serialize()
        client.blast(frame * 200_000)  # 1.8 MB of empty frames on one open stream
        deadline = time.monotonic() + 10
        while client.receive(1.0) and time.monotonic() < deadline:
            pass
    finally:
        client.close()
    daemon.status()  # still serving
    grown = daemon.rss_kb() - before
    assert client.closed, "the daemon must end a connection flooding it with empty DATA frames"
    # the GOAWAY is read when it arrives before the reset of the frames still in flight
    assert terminated in ([], [int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)]), terminated
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"


def test_a_flood_of_one_byte_frames_a_stream_never_reads_ends_the_connection(daemon: DaemonProcess) -> None:
    """Within the stream's 64 KiB window, one-byte DATA frames the handler never reads were each kept as an
    object by grpclib (~11 MB per connection, ~180 MB per uid over its connections); past 64 small frames
    unread on one stream the connection ends (ENHANCE_YOUR_CALM)."""
    before = warm_up(daemon)
    client = RawGrpc(str(daemon.workload))
    try:
        stream_id = client.call()
        client.h2.send_data(stream_id, struct.pack(">?I", False, 0))  # a valid empty request, stream left open
        client.flush()
        client.wait_for_data(stream_id)  # served: the daemon reads nothing more of this stream
        client.blast(DataFrame(stream_id, data=b"\0").serialize() * 60_000)  # inside the 64 KiB window
        deadline = time.monotonic() + 10
        while client.receive(1.0) and time.monotonic() < deadline:
            pass
    finally:
        client.close()
    daemon.status()  # still serving
    grown = daemon.rss_kb() - before
    assert client.closed, "a stream flooded with small unread frames must lose its connection"
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"  # the frames read before the end, not all 60,000


def test_a_client_that_never_reads_cannot_grow_the_daemons_write_buffer(daemon: DaemonProcess) -> None:
    before = warm_up(daemon)
    client = RawGrpc(str(daemon.workload))
    flood = PingFrame(0, opaque_data=b"\0" * 8).serialize() * (30 * MB // 17)  # each PING asks for an ACK
    sent = 0
    try:
        client.sock.settimeout(1)  # a send blocked this long: the daemon stopped reading
        view = memoryview(flood)
        while sent < len(flood):
            try:
                sent += client.sock.send(view[sent : sent + 65536])
            except TimeoutError:
                break  # the daemon stopped reading: the point
    finally:
        client.close()
    daemon.status()
    grown = daemon.rss_kb() - before
    assert sent < 4 * MB, f"the daemon read {sent} bytes of PINGs while their ACKs went unread"
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"


def test_a_connection_opening_stream_after_stream_is_closed_after_a_thousand(daemon: DaemonProcess) -> None:
    """h2 remembers every closed stream of a connection up to 65,536 (~15 MB): a connection may open
    1,000 streams in its life, then it gets GOAWAY and is closed (clients reconnect)."""
    client = RawGrpc(str(daemon.workload))
    opened = 0
    try:
        while not client.closed and opened < 3000:
            try:
                for _ in range(50):
                    stream_id = client.call(security_header=False)
                    client.h2.end_stream(stream_id)
                    client.flush()
                    opened += 1
            except (OSError, h2.exceptions.ProtocolError):
                client.closed = True  # the daemon said GOAWAY and closed
            while not client.closed and not all(call.done for call in client.calls.values()):
                client.receive(5.0)
            client.calls.clear()
    finally:
        client.close()
    assert client.closed and 1000 <= opened <= 1100, opened


def test_a_request_without_a_method_ends_the_connection_without_a_traceback(daemon: DaemonProcess) -> None:
    client = RawGrpc(str(daemon.workload))
    try:
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.config.validate_outbound_headers = False
        headers = [(":path", "/SpiffeWorkloadAPI/FetchX509SVID"), (":scheme", "http"), ("te", "trailers")]
        client.h2.send_headers(stream_id, headers, end_stream=True)  # no :method, no :authority
        client.flush()
        deadline = time.monotonic() + 10
        while client.receive(1.0) and time.monotonic() < deadline:
            pass
    finally:
        client.close()
    daemon.status()
    assert client.closed, "a malformed request must end its connection (RFC 9113 §8.3), not hang"
    assert "Traceback" not in daemon.log.read_text()


# ---- serve_accepted: the Workload API on sockets accepted by the daemon's own accept loop -----------


async def test_serve_accepted_serves_a_call_and_returns_when_the_connection_closes(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = make_daemon(tmp_path, files)
    async with in_background(d.run, d.stop):
        assert d.workload_api is not None
        server = build_server(d.workload_api)
        ours, theirs = socket.socketpair()  # the peer: this process (root), allowed by the default policy
        ours.setblocking(False)
        returned = anyio.Event()

        async def serve() -> None:
            await serve_accepted(server, ours)
            returned.set()

        def call() -> tuple[str, bool]:
            client = RawGrpc(sock=theirs)
            stream_id = client.call()
            client.request(stream_id)
            outcome = client.wait_for_data(stream_id)
            client.close()
            return ("served" if outcome.data_bytes else str(outcome.status)), returned.is_set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            answer, returned_early = await anyio.to_thread.run_sync(call)
            with anyio.fail_after(5):
                await returned.wait()
    assert answer == "served" and not returned_early
    assert ours.fileno() == -1  # the transport owned and closed it


async def test_serve_accepted_drops_a_connection_that_sends_no_preface_in_time(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = make_daemon(tmp_path, files)
    async with in_background(d.run, d.stop):
        assert d.workload_api is not None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with anyio.fail_after(5):
            await serve_accepted(build_server(d.workload_api), ours, first_byte_timeout=0.2)
        theirs.settimeout(5)
        received = b""
        while chunk := theirs.recv(65536):  # the server's SETTINGS, then EOF
            received += chunk
        theirs.close()
    assert received.startswith(b"\0")  # an HTTP/2 frame header (SETTINGS), then nothing more


# ---- item 3: the policy is checked on every push and every reload ---------------------------------

STREAM = """
import sys, time
from spiffe import WorkloadApiClient
client = WorkloadApiClient(sys.argv[1])
def seen(ctx):
    print("svids", ",".join(sorted(str(s.spiffe_id) for s in ctx.x509_svids)), flush=True)
def failed(exc):
    print("error", exc, flush=True)
handle = client.stream_x509_contexts(on_success=seen, on_error=failed, retry_connect=False)
time.sleep(float(sys.argv[2]))
"""


class StreamClient:
    """py-spiffe's stream_x509_contexts in a child process, its lines collected."""

    def __init__(self, endpoint: Path, out: Path) -> None:
        self.out = out
        self._file = open(out, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", STREAM, f"unix://{endpoint}", "60"], stdout=self._file, stderr=subprocess.STDOUT
        )

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines()):
            assert time.monotonic() < deadline, self.lines()
            time.sleep(0.02)
        return self.lines()

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self._file.close()


def test_a_revoked_callers_stream_ends_with_permission_denied_at_the_reload(
    tmp_path: Path, shared_dir: Path, ca: CertificateAuthority, one_identity: dict[str, FileSet]
) -> None:
    node = DaemonProcess(tmp_path, shared_dir, one_identity)
    node.write({"default": {"users": ["root"]}})
    node.start()
    client = StreamClient(node.workload, tmp_path / "stream.out")
    try:
        client.wait_for(lambda lines: any(line.startswith("svids ") for line in lines))
        node.write({"default": {"users": ["nobody"]}})  # root is no longer allowed
        node.reload()
        started = time.monotonic()
        lines = client.wait_for(lambda lines: any(line.startswith("error") for line in lines))
        assert time.monotonic() - started < 5, "the stream must end at the reload, not at the next rotation"
        assert "PERMISSION_DENIED" in next(line for line in lines if line.startswith("error"))
        pushes = node.status()["workload_api"]["pushes"]
        new = ca.issue_svid()
        one_identity["default"].put(new)
        deadline = time.monotonic() + 15
        while node.status()["identities"]["default"]["serial"] != format(new.leaf.serial_number, "x"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        served = node.status()["workload_api"]
        assert served["pushes"] == pushes and served["streams"] == 0
        assert len([line for line in client.lines() if line.startswith("svids ")]) == 1
    finally:
        client.close()
        logged = node.stop()
    assert "access revoked" in logged


def test_a_caller_that_lost_one_identity_gets_a_response_without_it_at_the_reload(
    tmp_path: Path, shared_dir: Path, ca: CertificateAuthority
) -> None:
    identities = {"a": FileSet(tmp_path / "a"), "b": FileSet(tmp_path / "b")}
    identities["a"].put(ca.issue_svid("/ns/a/sa/app"), ca.bundle_pem)
    identities["b"].put(ca.issue_svid("/ns/b/sa/app"), ca.bundle_pem)
    node = DaemonProcess(tmp_path, shared_dir, identities)
    node.write({"a": {"users": ["root"]}, "b": {"users": ["root"]}})
    node.start()
    both = "svids spiffe://example.org/ns/a/sa/app,spiffe://example.org/ns/b/sa/app"
    client = StreamClient(node.workload, tmp_path / "stream.out")
    try:
        client.wait_for(lambda lines: both in lines)
        node.write({"a": {"users": ["root"]}, "b": {"users": ["nobody"]}})
        node.reload()
        lines = client.wait_for(lambda lines: "svids spiffe://example.org/ns/a/sa/app" in lines, timeout=5)
        assert not [line for line in lines if line.startswith("error")]
        assert node.status()["workload_api"]["streams"] == 1
    finally:
        client.close()
        node.stop()


# ---- item 9: group rights come from the kernel (SO_PEERGROUPS), not from /etc/group ----------------


def free_gid() -> int:
    """A gid no group in the group database has."""
    gid = 47000 + secrets.randbelow(10000)
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
        gid += 1


@pytest.fixture
def nobodys_nss_group() -> Iterator[int]:
    """A throw-away group in /etc/group that lists nobody as a member (removed afterwards)."""
    name = f"wlidd-t{secrets.token_hex(4)}"
    subprocess.run(["groupadd", "--users", "nobody", name], check=True, capture_output=True)
    try:
        gid = grp.getgrnam(name).gr_gid
        assert gid in os.getgrouplist("nobody", NOBODY)
        yield gid
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def in_child(groups: list[int], work: Any) -> str:
    """Run `work()` as nobody with exactly `groups` as its supplementary groups (conftest.as_user);
    what it returned (a short string)."""
    return as_user(NOBODY, lambda: str(work()), groups=groups)


def workload_call(path: Path) -> str:
    """One FetchX509SVID call: "served" or the status it ended with (never the response itself)."""
    client = RawGrpc(str(path))
    try:
        stream_id = client.call()
        client.request(stream_id)
        call = client.wait_for_data(stream_id)
    finally:
        client.close()
    return "served" if call.data_bytes > 0 else f"{call.status} {call.message}"


def credentials_status(sock: Path) -> str:
    """GET /v1/credentials/default on the Unix API as this process: the status code."""
    raw = b"GET /v1/credentials/default HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b" ", 2)[1].decode()


@pytest.fixture
def group_daemon(tmp_path: Path, shared_dir: Path, one_identity: dict[str, FileSet]) -> Iterator[DaemonProcess]:
    """A daemon whose identity is handed to members of the group named by the test (via `write`)."""
    node = DaemonProcess(tmp_path, shared_dir, one_identity)
    yield node
    node.stop()


def test_a_group_given_by_the_kernel_alone_grants_its_rights(group_daemon: DaemonProcess) -> None:
    gid = free_gid()  # in no /etc/group entry: only the kernel says the child has it
    group_daemon.write({"default": {"groups": [gid]}})
    group_daemon.start()
    assert in_child([gid], lambda: credentials_status(group_daemon.socket)) == "200"
    assert in_child([gid], lambda: workload_call(group_daemon.workload)) == "served"
    assert in_child([], lambda: credentials_status(group_daemon.socket)) == "403"  # and without it, nothing
    assert in_child([], lambda: workload_call(group_daemon.workload)).startswith("PERMISSION_DENIED")


def test_a_group_dropped_from_the_process_grants_nothing_even_if_etc_group_lists_the_user(
    group_daemon: DaemonProcess, nobodys_nss_group: int
) -> None:
    group_daemon.write({"default": {"groups": [nobodys_nss_group]}})
    group_daemon.start()
    assert in_child([], lambda: credentials_status(group_daemon.socket)) == "403"
    assert in_child([], lambda: workload_call(group_daemon.workload)).startswith("PERMISSION_DENIED")
    assert in_child([nobodys_nss_group], lambda: credentials_status(group_daemon.socket)) == "200"
    assert in_child([nobodys_nss_group], lambda: workload_call(group_daemon.workload)) == "served"


def test_peer_groups_reads_more_than_256_groups(tmp_path: Path) -> None:
    """SO_PEERGROUPS past Python's 1024-byte getsockopt buffer (the libc path)."""
    from wlidd.api.peer_credentials import peer_groups

    path = str(tmp_path / "many.sock")
    wanted = list(range(50000, 50300))
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        os.chmod(path, 0o666)
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups(wanted)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    s.recv(1)
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        with conn:
            groups = peer_groups(conn)
            conn.send(b"x")
        os.waitpid(pid, 0)
    assert groups == frozenset(wanted)


async def test_the_caller_cache_tells_apart_one_process_with_different_kernel_groups() -> None:
    """A process may connect, setgroups, and connect again: same pid, uid and gid, other groups."""
    from wlidd.api.callers import CallerCache

    cache = CallerCache()
    gid = free_gid()
    with_group = await cache.get(4242, NOBODY, NOBODY, frozenset({gid}))
    without = await cache.get(4242, NOBODY, NOBODY, frozenset())
    assert gid in with_group.groups and gid not in without.groups
    assert without.groups == {NOBODY} and without.user == "nobody"


async def test_the_caller_cache_stays_bounded() -> None:
    from wlidd.api.callers import CallerCache

    cache = CallerCache(max_entries=64)
    for pid in range(1000):
        await cache.get(pid, NOBODY, NOBODY, frozenset({pid}))
        await cache.get(pid, pid, None)  # NSS-resolved (TCP) callers
    assert all(len(table) <= 64 for table in (cache._callers, cache._nss, cache._names))


class StallingGrpc(RawGrpc):
    """A client that never opens its flow-control windows: a push larger than its window stalls."""

    def _event(self, event: h2.events.Event) -> None:
        call = self.calls.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived) and call is not None:
            call.data_bytes += len(event.data or b"")  # counted, never acknowledged
            return
        super()._event(event)


def test_a_push_held_back_by_a_closed_window_is_not_delivered_after_a_revocation(
    tmp_path: Path, shared_dir: Path, ca: CertificateAuthority, one_identity: dict[str, FileSet]
) -> None:
    """A caller can stall a push (the new key) by not opening its HTTP/2 window, then be revoked: the
    stalled push must end with PERMISSION_DENIED at the reload, and nothing more of it may arrive when
    the caller opens its window afterwards."""
    node = DaemonProcess(tmp_path, shared_dir, one_identity)
    node.write({"default": {"users": ["root"]}})
    node.start()
    client = StallingGrpc(node.workload)
    try:
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 200})
        client.flush()
        stream_id = client.call()
        client.request(stream_id)
        call = client.wait(stream_id, lambda call: call.data_bytes >= 200, timeout=10)
        assert call.data_bytes == 200 and not call.done  # the push is stalled at the window
        node.write({"default": {"users": ["nobody"]}})
        node.reload()
        call = client.wait(stream_id, timeout=5)
        assert call.status == "PERMISSION_DENIED", call
        client.h2.increment_flow_control_window(1 << 20)  # open every window now
        with contextlib.suppress(h2.exceptions.ProtocolError):
            client.h2.increment_flow_control_window(1 << 20, stream_id=stream_id)
        client.flush()
        client.receive(1.0)
        assert call.data_bytes == 200  # not one byte more of the stalled message (its key)
    finally:
        client.close()
        logged = node.stop()
    assert "access revoked" in logged


def test_one_caller_may_hold_only_so_many_open_calls(
    tmp_path: Path, shared_dir: Path, one_identity: dict[str, FileSet]
) -> None:
    """Each open call holds memory in the daemon: one uid's calls beyond MAX_CALLS_PER_CALLER (across its
    connections) are refused with RESOURCE_EXHAUSTED at once, and its earlier calls keep their SVIDs."""
    from wlidd.workload_api.server import MAX_CALLS_PER_CALLER

    node = DaemonProcess(tmp_path, shared_dir, one_identity)
    node.write({"default": {"users": ["root"]}})
    node.start()
    client = RawGrpc(node.workload)
    try:
        held = []
        for _ in range(MAX_CALLS_PER_CALLER):
            stream_id = client.call()
            client.request(stream_id)
            held.append(stream_id)
        for stream_id in held:
            assert client.wait_for_data(stream_id).data_bytes > 0
        extra = client.call()
        client.request(extra)
        call = client.wait(extra)
        assert call.status == "RESOURCE_EXHAUSTED" and f"at most {MAX_CALLS_PER_CALLER}" in call.message
        assert not any(client.calls[stream_id].done for stream_id in held)
    finally:
        client.close()
        node.stop()
