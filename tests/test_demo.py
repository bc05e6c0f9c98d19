"""The real `wlidd demo` process: one SIGINT or SIGTERM ends it all (daemon, emulated upstreams, rotation
loop), exits 0, and removes its scratch folder (which holds private keys) unless --dir was given; every
command it prints runs as printed, from anywhere, against it; its output through a pipe has no colours."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

WLIDD = [sys.executable, "-m", "wlidd"]
READY_LINE = "Press Ctrl-C to stop."
RUNNING_PREFIX = "wlidd demo is running in "
TRY_LINE = "Try, in another terminal:"
APP_ID = "spiffe://demo.global.123456789.workload.id.goog/ns/demo/sa/app"
ESC = "\x1b["


class Demo:
    """A `wlidd demo` in its own session (so its whole process group can be checked and cleaned up),
    with stdout read line by line on a thread and stderr collected for failure messages."""

    def __init__(self, *args: str, tmpdir: Path, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env, TMPDIR=str(tmpdir))
        self.proc = subprocess.Popen(
            [*WLIDD, "demo", "--rotate-every", "60", "--ttl", "120", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
        for line in stream:
            lines.put(line)

    @staticmethod
    def _collect(stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_serving(self, timeout: float = 60) -> Path:
        """Wait for the demo's banner (printed once the daemon is ready); return its work directory."""
        deadline = time.monotonic() + timeout
        base: Path | None = None
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"demo exited early: {self.proc.returncode}\n{''.join(self.stderr)}") from None
                continue
            self.stdout.append(line)
            if line.startswith(RUNNING_PREFIX):
                base = Path(line[len(RUNNING_PREFIX) :].strip())
            if line.strip() == READY_LINE:
                assert base is not None
                return base
        raise AssertionError(f"demo not serving after {timeout}s\n{''.join(self.stderr)}")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if the process is still running after `timeout` seconds (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (code := self.proc.poll()) is not None:
                return code
            time.sleep(0.02)
        return self.proc.poll()

    def group_alive(self) -> bool:
        """Whether any process of the demo's process group (the demo and anything it started) is left."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for reader in self.readers:
            reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def demos(tmp_path: Path) -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.kill()


def _start(demos: list[Demo], tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Demo:
    demo = Demo(*args, tmpdir=tmp_path, env=env)
    demos.append(demo)
    return demo


def _ended_cleanly(demo: Demo, sig: signal.Signals) -> None:
    demo.proc.send_signal(sig)
    code = demo.wait_exit(timeout=5)
    assert code is not None, f"demo still running after one {sig.name}\n{''.join(demo.stderr)}"
    assert code == 0, "".join(demo.stderr)
    deadline = time.monotonic() + 5
    while demo.group_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not demo.group_alive(), "a process of the demo is left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_signal_ends_the_demo_with_tokens_and_removes_its_scratch_folder(
    tmp_path: Path, demos: list[Demo], sig: signal.Signals
) -> None:
    demo = _start(demos, tmp_path)
    base = demo.wait_serving()
    assert base.parent == tmp_path and (base / "secrets").is_dir()
    _ended_cleanly(demo, sig)
    assert not base.exists(), "the scratch folder (with private keys) was left behind"
    assert not list(tmp_path.glob("wlidd-demo-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_signal_ends_the_identity_only_demo(tmp_path: Path, demos: list[Demo], sig: signal.Signals) -> None:
    demo = _start(demos, tmp_path, "--no-tokens")
    base = demo.wait_serving()
    _ended_cleanly(demo, sig)
    assert not base.exists()


def test_one_signal_keeps_the_folder_given_with_dir(tmp_path: Path, demos: list[Demo]) -> None:
    work = tmp_path / "kept"
    demo = _start(demos, tmp_path, "--no-tokens", "--dir", str(work))
    assert demo.wait_serving() == work
    _ended_cleanly(demo, signal.SIGINT)
    assert (work / "wlidd.toml").is_file() and (work / "secrets").is_dir()


def test_demo_with_a_duration_removes_its_scratch_folder(tmp_path: Path, demos: list[Demo]) -> None:
    demo = _start(demos, tmp_path, "--no-tokens", "--duration", "0.5")
    demo.wait_serving()
    code = demo.wait_exit(timeout=30)
    assert code == 0, "".join(demo.stderr)
    assert not list(tmp_path.glob("wlidd-demo-*"))


def _printed_commands(demo: Demo) -> list[str]:
    """The shell commands of the banner's "Try, in another terminal:" block (its `# ...` lines are headings)."""
    lines = [line.rstrip("\n") for line in demo.stdout]
    block = lines[lines.index(TRY_LINE) + 1 : lines.index(READY_LINE)]
    return [line.strip() for line in block if line.strip() and not line.strip().startswith("#")]


def _doc(out: str) -> dict[str, Any]:
    document = json.loads(out)
    assert isinstance(document, dict)
    return document


def _bearer(out: str) -> None:
    document = _doc(out)
    assert document["token_type"] == "Bearer" and document["access_token"], sorted(document)


def _one_word(out: str) -> None:
    assert len(out.split()) == 1, "expected one token, nothing else"


def _running(out: str) -> None:
    assert _doc(out)["daemon"]["state"] == "running"


def _identity(out: str) -> None:
    document = _doc(out)
    assert document["spiffe_id"] == APP_ID and "key_pem" not in document


def _mtls(out: str) -> None:
    document = _doc(out)
    if "access_token" in document:
        _bearer(out)
    else:
        _identity(out)


def _python_client(out: str) -> None:
    assert out.startswith(f"{APP_ID} until "), out


def _google_auth(out: str) -> None:
    assert out.startswith("demo-project app@demo-project.iam.gserviceaccount.com "), out


def _py_spiffe(out: str) -> None:
    assert out.strip() == APP_ID, out


def _creds(out: str) -> None:
    assert out.startswith(APP_ID) and "written to" in out, out


def _check(out: str) -> None:
    # indented: a warning under one; `warning:` lines are about the host (e.g. whether a `wlidd` user could read it)
    verdicts = [line for line in out.splitlines() if not line.startswith((" ", "warning:"))]
    assert verdicts and all(line.startswith("ok ") for line in verdicts), out


def _metrics(out: str) -> None:
    assert 'wlidd_identity_valid{identity="default"} 1.0' in out


def _healthy(out: str) -> None:
    assert _doc(out)["status"] == "ok"


# What each printed command is (the first needle found in it) and what its output must show. Order
# matters: the mTLS curl also names /v1/token/, the python one-liners all run python -c.
KINDS: list[tuple[str, str, Callable[[str], None]]] = [
    ("mtls", "https://localhost:", _mtls),
    ("google-auth", "GCE_METADATA_HOST=", _google_auth),
    ("py-spiffe", "SPIFFE_ENDPOINT_SOCKET=unix:///", _py_spiffe),
    ("python client", "from wlidd.client import Client", _python_client),
    ("status", "http://localhost/v1/status", _running),
    ("identity", "http://localhost/v1/identity/default", _identity),
    ("token", "http://localhost/v1/token/", _bearer),
    ("get_wif_token", "http://localhost/get_wif_token", _one_word),
    ("token file", "gcp.token", _one_word),
    ("metrics", "/metrics", _metrics),
    ("health", "/v1/health", _healthy),
    ("wlidd status", " status --socket /", _running),
    ("wlidd token", " token gcp --socket /", _one_word),
    ("wlidd creds", " creds default --out /", _creds),
    ("wlidd check", " check --config /", _check),
]
NEEDS_TOKENS = {"google-auth", "token", "get_wif_token", "token file", "wlidd token"}


def _kind(command: str) -> tuple[str, Callable[[str], None]]:
    for name, needle, check in KINDS:
        if needle in command:
            return name, check
    raise AssertionError(f"the demo printed a command this test does not know: {command}")


def _run_every_printed_command(demo: Demo, tmp_path: Path, *, tokens: bool) -> None:
    """Run each printed command as pasted into sh, from an unrelated directory with a bare PATH (no
    venv on it: absolute paths only), and check its exit status and output; every kind must be there."""
    commands = _printed_commands(demo)
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    skipped = {
        name for name, module in (("google-auth", "google.auth"), ("py-spiffe", "spiffe")) if not _importable(module)
    }
    expected = {name for name, _, _ in KINDS} - skipped - (set() if tokens else NEEDS_TOKENS)
    seen: set[str] = set()
    for command in commands:
        name, check = _kind(command)
        seen.add(name)
        if name in skipped:
            assert "# needs: " in command  # the demo says what to install
            continue
        done = subprocess.run(["sh", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
        # never the output in a message: it may hold a token
        assert done.returncode == 0, f"{command}\nexited {done.returncode}: {done.stderr[-800:]}"
        try:
            check(done.stdout)
        except (AssertionError, ValueError, KeyError) as exc:
            raise AssertionError(f"{command}\nprinted something unexpected ({type(exc).__name__})") from None
    assert seen == expected, f"missing: {sorted(expected - seen)}; unexpected: {sorted(seen - expected)}"
    for command in commands:
        absolute = shlex.split(command.split("#")[0])
        program = next(word for word in absolute if "=" not in word)  # after any VAR=value prefix
        assert program == "curl" or program == "cat" or Path(program).is_absolute(), command


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_every_printed_command_runs_as_printed_against_the_demo(tmp_path: Path, demos: list[Demo]) -> None:
    demo = _start(demos, tmp_path)
    base = demo.wait_serving()
    banner = "".join(demo.stdout)
    assert "workload API " in banner and "mTLS 127.0.0.1:" in banner and "metadata 127.0.0.1:" in banner
    _run_every_printed_command(demo, tmp_path, tokens=True)
    assert (base / "creds" / "svid.pem").is_file()
    _ended_cleanly(demo, signal.SIGINT)
    assert not base.exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_identity_only_demo_prints_no_token_or_metadata_commands_and_the_rest_run(
    tmp_path: Path, demos: list[Demo]
) -> None:
    demo = _start(demos, tmp_path, "--no-tokens")
    demo.wait_serving()
    banner = "".join(demo.stdout)
    assert "metadata 127.0.0.1:" not in banner and "GCE_METADATA_HOST" not in banner and "/v1/token/" not in banner
    _run_every_printed_command(demo, tmp_path, tokens=False)


def test_two_demos_run_side_by_side_on_their_own_ports(tmp_path: Path, demos: list[Demo]) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = _start(demos, tmp_path / "one", "--no-tokens")
    second = _start(demos, tmp_path / "two", "--no-tokens")
    assert first.wait_serving() != second.wait_serving()
    listeners = [next(line for line in d.stdout if line.strip().startswith("listeners:")) for d in (first, second)]
    assert listeners[0] != listeners[1] and "mTLS 127.0.0.1:" in listeners[0]


def test_demo_output_through_a_pipe_has_no_colour_codes(tmp_path: Path, demos: list[Demo]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    demo = _start(demos, tmp_path, "--duration", "1.5", "--rotate-every", "0.5", env={**env, "TERM": "xterm-256color"})
    demo.wait_serving()
    assert demo.wait_exit(timeout=30) == 0, "".join(demo.stderr)
    for reader in demo.readers:
        reader.join(timeout=10)
    while not demo.lines.empty():
        demo.stdout.append(demo.lines.get())
    stdout, stderr = "".join(demo.stdout), "".join(demo.stderr)
    assert "rotated: new SVID serial" in stdout and "credentials loaded" in stderr
    assert ESC not in stdout, "escape codes on stdout"
    assert ESC not in stderr, "escape codes in the logs"
