"""A hostile local user against the listeners of a real daemon process: descriptor floods, idle
connection lockout, silent connections, bare-LF requests, label floods in /metrics, and the watchdog
rule (liveness, not validity). The attacker is a forked child that dropped to uid 65534 (nobody)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import FileSet, in_background, kill_accept_loop
from tests.test_cli import wait_for_socket
from tests.test_cli import write_config as cli_config
from wlidd.api.accept import CallerKey, ConnectionCounter
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_config(tmp_path: Path, files: FileSet, listeners: str = "", unix: str = "") -> Path:
    """test_cli's config with the Unix socket open to every user (mode 0666) in a public directory
    (tmp_path/wlidd.sock is a symlink to it, so the test_cli helpers find it)."""
    path = cli_config(tmp_path, files)
    public = Path(tempfile.mkdtemp(prefix="wlidd-hostile-"))
    public.chmod(0o755)
    (tmp_path / "public").symlink_to(public)
    text = path.read_text().replace(str(tmp_path / "wlidd.sock"), str(public / "wlidd.sock"))
    path.write_text(text + 'mode = "0666"\n' + unix + listeners)
    (tmp_path / "wlidd.sock").symlink_to(public / "wlidd.sock")
    return path


@contextlib.contextmanager
def running(config: Path, tmp_path: Path, nofile: int | None = None) -> Iterator[subprocess.Popen[str]]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wlidd", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=limit,
        )
    try:
        wait_for_socket(tmp_path / "wlidd.sock", proc)
        yield proc
    finally:
        shutil.rmtree(tmp_path / "public", ignore_errors=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class Holder:
    """A child process, dropped to `uid`, holding `count` connections open until told to stop; it reports
    how many it connected and, at the end, how many the daemon had already answered or closed (a silent
    connection the daemon admitted has nothing to read)."""

    def __init__(self, uid: int, address: str | tuple[str, int], count: int, send: bytes = b"") -> None:
        self.read_end, write_end = os.pipe()
        go_read, self.go_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.read_end)
                os.close(self.go_write)
                resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
                held = []
                for _ in range(count):
                    s = socket.socket(family)  # blocking connect: a full backlog waits for the daemon
                    try:
                        s.connect(address)
                        if send:
                            s.sendall(send)
                    except OSError:
                        s.close()
                        continue
                    held.append(s)
                os.write(write_end, f"{len(held)}\n".encode())
                os.read(go_read, 1)  # hold until told
                closed = 0
                for s in held:
                    s.setblocking(False)
                    try:
                        s.recv(65536)  # b"" (closed) or a refusal (503) then close: the daemon let go of it
                        closed += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed += 1
                os.write(write_end, f"{closed}\n".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.close(go_read)
        self._buffer = b""
        self.connected = int(self._line())

    def _line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = os.read(self.read_end, 64)
            assert chunk, "holder child died"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def release(self) -> int:
        """Let go of every connection; how many the daemon had closed by then."""
        os.write(self.go_write, b"x")
        closed = int(self._line())
        os.waitpid(self.pid, 0)
        os.close(self.read_end)
        os.close(self.go_write)
        return closed


def get(sock: Path, path: str = "/v1/status") -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as client:
        return client.get(f"http://wlidd{path}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@needs_root
def test_silent_tcp_flood_on_the_mtls_listener_is_capped_at_accept_and_the_daemon_lives(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Plain TCP connections that never start a handshake are counted from accept: beyond the caps they
    are closed at once, the daemon's descriptors stay bounded, and every other caller is served."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    port = free_port()
    listeners = (
        f'[listeners.mtls]\naddress = "127.0.0.1:{port}"\nidentity = "default"\nallow = ["spiffe://example.org"]\n'
        "max_connections = 64\nmax_connections_per_caller = 16\n"
    )
    with running(daemon_config(tmp_path, files, listeners), tmp_path) as proc:
        baseline = open_fds(proc.pid)
        holder = Holder(NOBODY, ("127.0.0.1", port), 400)
        try:
            assert holder.connected > 16
            deadline = time.monotonic() + 10
            while True:  # every connection accepted: admitted (nobody's share) or refused
                mtls = get(tmp_path / "wlidd.sock").json()["listeners"]["mtls"]
                if mtls["accepted"] + mtls["refused"] >= holder.connected:
                    break
                assert time.monotonic() < deadline, mtls
                time.sleep(0.05)
            assert mtls["open"] <= 16
            assert open_fds(proc.pid) <= baseline + 16 + 4  # nobody's share, not 400
        finally:
            closed = holder.release()
        assert closed >= holder.connected - 16  # the excess was closed by the daemon at once
        assert proc.poll() is None
        status = get(tmp_path / "wlidd.sock").json()
        assert status["listeners"]["mtls"]["alive"] is True
        assert status["listeners"]["mtls"]["refused"] >= holder.connected - 16


@needs_root
def test_emfile_in_accept_is_transient_on_every_listener(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """With a descriptor limit below the connection caps, accept() fails with EMFILE: the daemon logs it
    once, backs off and accepts again once descriptors are free — it neither exits nor stops a listener."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    port = free_port()
    listeners = (
        f'[listeners.mtls]\naddress = "127.0.0.1:{port}"\nidentity = "default"\nallow = ["spiffe://example.org"]\n'
        "max_connections = 1000\nmax_connections_per_caller = 1000\n"
    )
    unix = "max_connections = 1000\nmax_connections_per_caller = 1000\n"
    with running(daemon_config(tmp_path, files, listeners, unix), tmp_path, nofile=96) as proc:
        tcp = Holder(NOBODY, ("127.0.0.1", port), 150)
        local = Holder(NOBODY, str((tmp_path / "wlidd.sock").resolve()), 150)
        time.sleep(0.5)  # let the daemon run into the limit  (observable only in the log)
        assert proc.poll() is None
        tcp.release()
        local.release()
        deadline = time.monotonic() + 10
        while True:  # served again once the flood is gone
            try:
                if get(tmp_path / "wlidd.sock").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Unix API never accepted again"
            time.sleep(0.05)
        status = get(tmp_path / "wlidd.sock").json()
        assert all(listener["alive"] for listener in status["listeners"].values())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # mTLS accepts again too
            s.sendall(b"\x16\x03\x01\x00\x05hello")
            s.settimeout(5)
            s.recv(100)
    log = (tmp_path / "daemon.log").read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "Traceback" not in log
    assert log.count("cannot accept connections: out of resources") <= 6  # once per episode, not per accept()
    assert "accepting connections again" in log


@needs_root
def test_one_users_idle_connections_do_not_lock_out_other_users(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """256 idle connections of one unprivileged user fill only that user's share: root is still served,
    and nobody's connections beyond its share get a 503 that says why."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    with running(daemon_config(tmp_path, files), tmp_path):
        holder = Holder(NOBODY, str((tmp_path / "wlidd.sock").resolve()), 256)
        try:
            assert get(tmp_path / "wlidd.sock").status_code == 200  # root, while nobody holds its share
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(tmp_path / "wlidd.sock"))
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(200).startswith(b"HTTP/1.1 200")
        finally:
            closed = holder.release()
        assert holder.connected == 256
        assert closed >= 256 - 64  # beyond max_connections_per_caller (64): refused at once


def test_connection_counter_caps_callers_below_the_listener() -> None:
    counter = ConnectionCounter(max_connections=4, max_per_caller=2)
    a, b, c = CallerKey(1), CallerKey(2), CallerKey(3)
    assert counter.admit(a) is None and counter.admit(a) is None
    refusal = counter.admit(a)
    assert refusal is not None and refusal.reason == "caller_full" and "uid 1" in refusal.message
    assert counter.admit(b) is None and counter.admit(b) is None
    refusal = counter.admit(c)
    assert refusal is not None and refusal.reason == "listener_full"
    counter.release(a)
    assert counter.admit(c) is None
    for key in (a, b, b, c):
        counter.release(key)
    assert counter.total == 0 and counter.per_caller == {}  # bounded: no entry without a connection


@needs_root
def test_a_silent_connection_is_closed_after_the_first_byte_deadline(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    unix = 'first_byte_timeout = "300ms"\n'
    with running(daemon_config(tmp_path, files, unix=unix), tmp_path), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp_path / "wlidd.sock"))
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by the daemon, long before the 60 s idle timeout
        assert time.monotonic() - started < 5


@needs_root
def test_a_bare_lf_request_gets_400_at_once(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    with running(daemon_config(tmp_path, files), tmp_path):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(3)  # the request timeout is 10 s: an answer within 3 s is "at once"
            s.connect(str(tmp_path / "wlidd.sock"))
            s.sendall(b"GET /v1/health HTTP/1.1\nHost: x\n\n")
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
        assert b"bare LF" in answer


@needs_root
def test_random_paths_do_not_grow_the_metrics_label_set(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Request metrics are labelled by route template: random long paths on the Unix socket (404s) and
    403s on the metadata listener fall under "other", so /metrics stays small."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    port = free_port()
    listeners = (
        f'[tokens.gcp]\nflow = "gce-metadata"\n[tokens.gcp.metadata]\nurl = "http://127.0.0.1:9"\n'
        f'[listeners.metadata]\naddress = "127.0.0.1:{port}"\ntoken = "gcp"\nemail = "sa@example.iam.gserviceaccount.com"\n'
    )
    with (
        running(daemon_config(tmp_path, files, listeners), tmp_path),
        httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "wlidd.sock"))) as unix,
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as metadata,
    ):
        for i in range(300):
            junk = f"/{i}-" + "x" * 200
            assert unix.get(f"http://wlidd/v1/token{junk}").status_code == 404
            assert unix.get(f"http://wlidd{junk}").status_code == 404
            assert metadata.get(f"/computeMetadata/v1{junk}").status_code == 403  # no Metadata-Flavor
        exposition = unix.get("http://wlidd/metrics").text
    routes = set(re.findall(r'wlidd_http_requests_total\{[^}]*route="([^"]*)"', exposition))
    assert routes <= {"other", "/v1/token/{name}", "/v1/status", "/v1/health", "/metrics"}, routes
    assert len(exposition) < 64 * 1024


async def test_the_watchdog_stops_pinging_when_an_accept_loop_dies(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """An accept loop that dies on an unexpected error is a liveness failure: /v1/health says so and the
    WATCHDOG=1 pings stop (a degraded daemon keeps pinging: test_systemd)."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    config = Config.model_validate(
        {"identities": {"default": files.config()}, "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}}}
    )
    daemon = Daemon(config, environ={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000"})

    def pings() -> int:
        count = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                count += notify.recv(4096).count(b"WATCHDOG=1")
        return count

    async with in_background(daemon.run, daemon.stop):
        with anyio.fail_after(5):
            while pings() == 0:
                await anyio.sleep(0.02)
        await kill_accept_loop(daemon.listeners.accept_loops[0], tmp_path / "wlidd.sock")
        health = await daemon.api(_request("/v1/health"))
        assert health.status == 503 and b"listener/unix" in health.body
        pings()
        await anyio.sleep(0.5)
        assert pings() == 0
    notify.close()


def _request(path: str) -> object:
    from wlidd.api.messages import Request
    from wlidd.api.peers import Peer

    return Request("GET", path, {}, (), b"", Peer(), "unix")


def test_the_unit_raises_the_open_files_limit() -> None:
    unit = (Path(__file__).parent.parent / "systemd" / "wlidd.service").read_text()
    assert re.search(r"^LimitNOFILE=\d+", unit, re.M)


def test_the_daemon_raises_its_soft_open_files_limit_to_the_hard_limit(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("the hard limit here is too low to tell")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "wlidd", "run", "--config", str(cli_config(tmp_path, files))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=low_soft_limit,
    )
    try:
        wait_for_socket(tmp_path / "wlidd.sock", proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == str(hard), line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


@needs_root
def test_a_connection_flood_on_the_workload_api_leaves_it_and_the_unix_api_accepting(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """~300 silent connections of one user to the Workload API (mode 0666): the excess beyond that
    user's share is closed at accept, root's FetchX509SVID is served during the flood, and both Unix
    listeners accept again afterwards (once, asyncio's own accept loop logged thousands of EMFILE
    tracebacks and the Unix API's accept loop ended for good)."""
    from tests.test_hostile_workload_api import workload_call

    files.put(ca.issue_svid(), ca.bundle_pem)
    config = daemon_config(tmp_path, files)
    workload = (tmp_path / "public").resolve() / "workload.sock"
    config.write_text(
        config.read_text()
        + f'[listeners.workload_api]\npath = "{workload}"\nmax_connections = 128\nmax_connections_per_caller = 32\n'
    )
    with running(config, tmp_path, nofile=160) as proc:
        holder = Holder(NOBODY, str(workload), 300)
        try:
            deadline = time.monotonic() + 10
            while True:
                listener = get(tmp_path / "wlidd.sock").json()["listeners"]["workload_api"]
                if listener["accepted"] + listener["refused"] >= holder.connected:
                    break
                assert time.monotonic() < deadline, listener
                time.sleep(0.05)
            assert listener["open"] <= 32
            assert workload_call(workload) == "served"  # root, during the flood
        finally:
            holder.release()
        assert proc.poll() is None
        assert workload_call(workload) == "served"
        status = get(tmp_path / "wlidd.sock").json()
        assert all(loop["alive"] for loop in status["listeners"].values())
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_binding_the_unix_socket_sets_its_mode_through_the_inode_not_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chmod and chown go through an O_PATH descriptor of the socket just bound (/proc/self/fd/N), never
    through its name: a link swapped in at the name cannot steer them."""
    from wlidd.api import listeners

    touched: list[str] = []
    real_chmod, real_chown = os.chmod, os.chown

    def chmod(target: object, *args: object, **kwargs: object) -> None:
        touched.append(str(target))
        real_chmod(target, *args, **kwargs)  # type: ignore[arg-type]

    def chown(target: object, *args: object, **kwargs: object) -> None:
        touched.append(str(target))
        real_chown(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(listeners.os, "chmod", chmod)
    monkeypatch.setattr(listeners.os, "chown", chown)
    path = tmp_path / "api.sock"
    sock = listeners.bind_unix_socket(path, 0o660, owner=str(os.getuid()))
    try:
        assert touched and all(t.startswith("/proc/self/fd/") for t in touched), touched
        assert oct(os.lstat(path).st_mode & 0o777) == oct(0o660)
        assert sock.getsockname() == str(path)
    finally:
        sock.close()


@needs_root
def test_a_socket_directory_another_user_controls_is_refused(tmp_path: Path) -> None:
    """Another user who owns the socket's directory could move the socket aside and put their own in its
    place (clients would then talk to them): binding there is refused, with the reason."""
    from wlidd.api.listeners import ListenerError, bind_unix_socket

    evil = tmp_path / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    with pytest.raises(ListenerError, match="belongs to uid 65534"):
        bind_unix_socket(evil / "workload.sock", 0o666)
    assert list(evil.iterdir()) == []


def test_a_failed_start_removes_the_socket_it_bound(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> None:
    """The Unix socket is bound first; when a later listener cannot start (its port is taken), the
    daemon exits with the reason and leaves no socket behind."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = cli_config(tmp_path, files)
        config.write_text(
            config.read_text()
            + f'[listeners.mtls]\naddress = "127.0.0.1:{port}"\nidentity = "default"\nallow = ["spiffe://example.org"]\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "wlidd", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode != 0 and "cannot listen on" in result.stderr + result.stdout
    assert not (tmp_path / "wlidd.sock").exists()


def test_the_unix_sockets_accept_queue_is_deep(tmp_path: Path) -> None:
    """The kernel's accept queue is shared by every caller, before any per-caller cap: a user connecting
    in a tight loop must not fill a 128-deep queue for everyone (a non-blocking connect then fails with
    EAGAIN). The socket listens with SOMAXCONN (the unit's wlidd.socket with Backlog=4096)."""
    from wlidd.api.listeners import bind_unix_socket

    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read a listening socket's backlog")
    path = tmp_path / "q.sock"
    sock = bind_unix_socket(path, 0o600)
    try:
        listed = subprocess.run(["ss", "-xlH", "src", str(path)], capture_output=True, text=True, check=True).stdout
        backlog = int(listed.split()[3])
    finally:
        sock.close()
    assert backlog >= min(socket.SOMAXCONN, int(Path("/proc/sys/net/core/somaxconn").read_text())) >= 1024
    unit = (Path(__file__).parent.parent / "systemd" / "wlidd.socket").read_text()
    assert re.search(r"^Backlog=4096$", unit, re.M)


@needs_root
def test_a_client_that_pipelines_and_never_reads_is_cut_at_the_idle_timeout(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Pipelined requests whose answers are never read fill the socket buffers and block the daemon's
    send: the connection is closed once idle_timeout passes, not held forever."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    unix = 'idle_timeout = "1s"\n'
    with running(daemon_config(tmp_path, files, unix=unix), tmp_path), socket.socket(socket.AF_UNIX) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(tmp_path / "wlidd.sock"))
        s.setblocking(False)
        request = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"
        with contextlib.suppress(BlockingIOError):
            for _ in range(20000):
                s.send(request)
        deadline = time.monotonic() + 15
        while get(tmp_path / "wlidd.sock").json()["listeners"]["unix"]["open"] > 1:  # ours: the status call
            assert time.monotonic() < deadline, "the non-reading connection was never closed"
            time.sleep(0.1)


async def test_a_peer_that_resets_right_after_accept_is_dropped_quietly(tmp_path: Path) -> None:
    """A client that connects and resets at once (SO_LINGER 0) leaves a socket whose getpeername()
    fails: serving it ends quietly instead of raising out to the accept loop (once one warning line per
    connection, thousands a minute under a flood)."""
    import struct

    from wlidd.api.messages import Response
    from wlidd.api.server import HttpServer

    async def handler(request: object) -> Response:
        return Response.text(200, "ok")

    server = HttpServer(handler, name="metadata")  # type: ignore[arg-type]
    for tls in (None, "tls"):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            client = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST: the accepted socket is no longer connected
            deadline = time.monotonic() + 5
            while True:  # wait until the kernel has taken the reset
                try:
                    conn.getpeername()
                except OSError:
                    break
                assert time.monotonic() < deadline
                await anyio.sleep(0.01)
            context = None
            if tls:
                import ssl

                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            with anyio.fail_after(5):
                await server.serve_socket(conn, tls=context)  # returns; raises nothing
            assert conn.fileno() < 0  # and the socket is closed
