"""Shared fixtures and helpers: a clean environment per test, CAs, identity files in a tmp dir, the
upstream emulator (`upstreams`), services in the background, and waits on observable state.

One async runner: pytest-asyncio (asyncio_mode = auto). The one raw asyncio task of the suite is the
one `in_background` makes (see there); sync tests that need an event loop (Hypothesis examples, module
fixtures shared by them) use anyio's blocking portal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from wlidd.api.accept import AcceptLoop
from wlidd.config import IdentityConfig, parse_identity_config
from wlidd.emulator.ca import CertificateAuthority, IssuedSvid
from wlidd.emulator.produced import find_leak
from wlidd.emulator.upstreams import Upstreams
from wlidd.logs import reset_logging
from wlidd.svid.load.source import CredentialSource

TD = "example.org"
FUZZ_SCALE = int(os.environ.get("FUZZ_SCALE", "1"))  # `make fuzz` multiplies the example budgets

# What the upstream emulator of the token tests knows (token_emulator): the Workload Identity providers
# (an Entra one trusting APP_URI, an X.509 one), the Entra app's client ID and the service account.
AUDIENCE = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/entra"
X509_AUDIENCE = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/x509"
APP_URI = "api://wlidd-test"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SA = "app@demo-project.iam.gserviceaccount.com"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Fail any test whose captured output (stdout, stderr, log records; child processes included, as
    pytest captures file descriptors) contains a secret the emulator made or was handed: a private
    key, an access or ID token, a client assertion, a subject token. The secret itself is withheld."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    leaks = [
        (name, kind)
        for name, content in report.sections
        if name.endswith(report.when) and (kind := find_leak(content)) is not None  # this phase's output
    ]
    expected = item.get_closest_marker("leaks_a_secret_on_purpose") is not None
    if report.when != "call" and not leaks:
        return
    if expected and report.when == "call":
        if leaks:
            report.outcome, report.longrepr = "passed", None
        else:
            report.outcome, report.longrepr = "failed", "the leak check missed a secret printed on purpose"
    elif leaks:
        report.outcome = "failed"
        report.longrepr = "secret leaked into captured output: " + "; ".join(f"a {k} in '{n}'" for n, k in leaks)
    if leaks:
        report.sections = [(n, "[withheld: contains a secret]" if find_leak(c) else c) for n, c in report.sections]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_logging()  # every test starts from structlog's defaults: stdout, which pytest captures
    for name in list(os.environ):
        if name.startswith(("WLIDD_", "GOOGLE_", "GCE_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority(TD)


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    """Another root for the same trust domain (a chain to it must not verify against `ca`)."""
    return CertificateAuthority(TD)


@pytest.fixture(scope="session")
def foreign_ca() -> CertificateAuthority:
    """The CA of another trust domain."""
    return CertificateAuthority("other.org")


@pytest.fixture
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FileSet:
    """chain.pem / key.pem / bundle.pem in a directory, written by atomic rename."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = directory / "chain.pem"
        self.key = directory / "key.pem"
        self.bundle = directory / "bundle.pem"

    def write(self, name: str, data: bytes) -> None:
        target = self.dir / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def put(self, svid: IssuedSvid, bundle: bytes | None = None) -> None:
        self.write("chain.pem", svid.chain_pem)
        self.write("key.pem", svid.key_pem)
        if bundle is not None:
            self.write("bundle.pem", bundle)

    def config(self, **overrides: object) -> IdentityConfig:
        values: dict[str, object] = {
            "source": "files",
            "cert": self.cert,
            "key": self.key,
            "bundle": self.bundle,
            "mismatch_retries": 2,
            "mismatch_retry_delay": 0.01,
            "debounce": 0.02,
        }
        values.update(overrides)
        return parse_identity_config(values)

    def source(self, **overrides: object) -> CredentialSource:
        return CredentialSource("default", self.config(**overrides))


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileSet]:
    yield FileSet(tmp_path / "creds")


@asynccontextmanager
async def in_background(run: Callable[..., Awaitable[None]], stop: Callable[[], None]) -> AsyncIterator[None]:
    """Start an anyio service (`run(task_status=…)`) in its own task; stop it with `stop()` on exit and
    wait (30 s at most) for it to finish; a failure to start is raised here.

    The task is a raw asyncio task, the only one in the suite, on purpose: pytest-asyncio runs an async
    fixture's setup and its teardown in different tasks, and an anyio task group (its cancel scope) must be
    left in the task that entered it, so a service that outlives a fixture's `yield` needs a task of its
    own. Tests use it too, for the stop-on-exit."""
    started = asyncio.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(run)
                started.set()
        except BaseException as exc:
            failure.append(exc)
            started.set()
            raise

    task = asyncio.create_task(main())
    await asyncio.wait_for(started.wait(), 30)
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        stop()
        await asyncio.wait_for(task, 30)


def token_emulator(tmp_path: Path, ca: CertificateAuthority) -> Upstreams:
    """The upstream emulator (Entra, STS, IAM, the metadata server) every flow of the tests talks to, not
    yet running: it trusts `ca`'s SVIDs on mTLS and knows AUDIENCE, X509_AUDIENCE and SA. Start it with
    `in_background(emulator.run, emulator.stop)`, or use the `upstreams` fixture."""
    emulator = Upstreams(tmp_path / "emulator", spiffe_bundle_pem=ca.bundle_pem, seed=1, service_accounts=[SA])
    emulator.register_oidc_provider(AUDIENCE, allowed_audiences=[APP_URI])
    emulator.register_x509_provider(X509_AUDIENCE)
    return emulator


@pytest.fixture
async def upstreams(tmp_path: Path, ca: CertificateAuthority) -> AsyncIterator[Upstreams]:
    """The token emulator (`token_emulator`), serving on loopback for the test."""
    emulator = token_emulator(tmp_path, ca)
    async with in_background(emulator.run, emulator.stop):
        yield emulator


POLL = 0.01  # seconds between two looks at the state a wait is for


async def wait_until(condition: Callable[[], object], timeout: float = 15, what: str = "") -> None:
    """Return once `condition()` is true, looking every POLL seconds; TimeoutError (naming `what`) after
    `timeout` seconds. For waits on state the test can observe; never a fixed sleep."""
    try:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.sleep(POLL)
    except TimeoutError:
        raise TimeoutError(f"waited {timeout} s in vain{': ' + what if what else ''}") from None


def poll_until(condition: Callable[[], object], timeout: float = 10, what: str | Callable[[], str] = "") -> None:
    """`wait_until` for sync tests (a daemon in another process): AssertionError naming `what` (or what it
    returns, called at the time) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s in vain: {what() if callable(what) else what}")
        time.sleep(POLL * 5)


def as_user(uid: int, work: Callable[[], str], *, groups: Iterable[int] = ()) -> str:
    """Run `work()` in a forked child that dropped to uid/gid `uid` with exactly `groups` as its
    supplementary groups (none by default); what it returned, or "CHILD-ERROR <exception>". Needs root."""
    import encodings.idna  # noqa: F401  (loaded here: the child's uid may not be able to read it)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, work, report through the pipe, exit at once
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(uid)
            os.setuid(uid)
            result = work()
        except BaseException as exc:
            result = f"CHILD-ERROR {type(exc).__name__}: {exc}"
        try:
            os.write(write_end, result.encode("latin-1"))
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return data.decode("latin-1")


def request_as_user(uid: int, address: str | tuple[str, int], raw: bytes) -> tuple[int, bytes]:
    """Send `raw` (one HTTP request, Connection: close) from a forked child that dropped to uid/gid `uid`
    with no supplementary groups; (status, body) of the answer. Needs root."""
    import socket

    def ask() -> str:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        with socket.socket(family) as s:
            s.settimeout(10)
            s.connect(address)
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode("latin-1")

    data = as_user(uid, ask).encode("latin-1")
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid can reach (pytest's tmp dirs are private to root): for sockets that
    unprivileged test clients connect to."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="wlidd-shared-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def kill_accept_loop(loop: AcceptLoop, path: Path) -> None:
    """Make the Unix listener's accept() fail with an error no retry can fix, wake it, and wait until its
    loop has stopped (tests of the watchdog, /v1/health and /v1/live)."""
    real = loop.sock

    class Broken:
        """The listening socket, whose accept() fails with EINVAL."""

        def fileno(self) -> int:
            return real.fileno()

        def setblocking(self, flag: bool) -> None:
            real.setblocking(flag)

        def accept(self) -> tuple[socket.socket, object]:
            raise OSError(22, "Invalid argument")

        def close(self) -> None:
            real.close()

    loop.sock = Broken()  # type: ignore[assignment]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))  # wakes the loop: its accept() fails
    with anyio.fail_after(5):
        while loop.alive:
            await anyio.sleep(0.02)
