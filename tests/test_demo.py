"""The real `wlidd demo` process: one SIGINT or SIGTERM ends it all (daemon, emulated upstreams, rotation
loop), exits 0, and removes its scratch folder (which holds private keys) unless --dir was given."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

WLIDD = [sys.executable, "-m", "wlidd"]
READY_LINE = "Press Ctrl-C to stop."
RUNNING_PREFIX = "wlidd demo is running in "


class Demo:
    """A `wlidd demo` in its own session (so its whole process group can be checked and cleaned up),
    with stdout read line by line on a thread and stderr collected for failure messages."""

    def __init__(self, *args: str, tmpdir: Path) -> None:
        env = dict(os.environ, TMPDIR=str(tmpdir))
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


def _start(demos: list[Demo], tmp_path: Path, *args: str) -> Demo:
    demo = Demo(*args, tmpdir=tmp_path)
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
