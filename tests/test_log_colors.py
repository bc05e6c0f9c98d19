"""Console logs carry ANSI colours only on a terminal: never through a pipe or into a file, never with
NO_COLOR (https://no-color.org), always with FORCE_COLOR (NO_COLOR wins, as in structlog's defaults)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from tests.conftest import FileSet
from tests.test_cli import wait_for_socket
from wlidd.emulator.ca import CertificateAuthority
from wlidd.logs import configure_logging, use_colors

ESC = "\x1b["


@pytest.fixture
def terminal() -> Iterator[TextIO]:
    """A stream that is a terminal (the writing end of a pseudo-terminal)."""
    leader, follower = os.openpty()
    try:
        with open(follower, "w") as stream:
            yield stream
    finally:
        os.close(leader)


def test_a_pipe_or_file_gets_no_colours() -> None:
    assert use_colors(io.StringIO(), {}) is False


def test_a_terminal_gets_colours(terminal: TextIO) -> None:
    assert use_colors(terminal, {"TERM": "xterm-256color"}) is True


@pytest.mark.parametrize("value", ["1", "true", "0"])
def test_no_color_set_to_anything_turns_colours_off_on_a_terminal(terminal: TextIO, value: str) -> None:
    assert use_colors(terminal, {"NO_COLOR": value}) is False


def test_an_empty_no_color_is_ignored(terminal: TextIO) -> None:
    assert use_colors(terminal, {"NO_COLOR": ""}) is True


def test_force_color_colours_a_pipe() -> None:
    assert use_colors(io.StringIO(), {"FORCE_COLOR": "1"}) is True


def test_no_color_wins_over_force_color(terminal: TextIO) -> None:
    assert use_colors(terminal, {"NO_COLOR": "1", "FORCE_COLOR": "1"}) is False


def test_a_dumb_terminal_gets_no_colours(terminal: TextIO) -> None:
    assert use_colors(terminal, {"TERM": "dumb"}) is False


def test_a_closed_stream_gets_no_colours() -> None:
    stream = io.StringIO()
    stream.close()
    assert use_colors(stream, {}) is False


def _rendered(event: str) -> str:
    """What the configured console renderer makes of one event."""
    renderer = structlog.get_config()["processors"][-1]
    assert isinstance(renderer, structlog.dev.ConsoleRenderer)
    line = renderer(None, "warning", {"event": event, "level": "warning"})
    assert isinstance(line, str)
    return line


def test_console_lines_into_a_pipe_are_plain_unless_force_color_is_set() -> None:
    out = io.StringIO()
    configure_logging("info", "console", out, journald=False, environ={"TERM": "xterm-256color"})
    structlog.get_logger("t").warning("careful", path="/x")
    assert "careful" in out.getvalue() and ESC not in out.getvalue()
    configure_logging("info", "console", out, journald=False, environ={"FORCE_COLOR": "1"})
    assert ESC in _rendered("careful")


def test_console_lines_on_a_terminal_are_coloured_unless_no_color_is_set(terminal: TextIO) -> None:
    configure_logging("info", "console", terminal, journald=False, environ={"TERM": "xterm-256color"})
    assert ESC in _rendered("hello")
    configure_logging("info", "console", terminal, journald=False, environ={"NO_COLOR": "1"})
    line = _rendered("hello")
    assert "hello" in line and ESC not in line


def test_wlidd_run_with_console_logs_writes_no_escape_codes_into_a_pipe(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = tmp_path / "wlidd.toml"
    config.write_text(
        f"""
[daemon]
log_format = "console"

[identities.default]
source = "files"
cert = "{files.cert}"
key = "{files.key}"
bundle = "{files.bundle}"

[listeners.unix]
path = "{tmp_path / "wlidd.sock"}"
"""
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")} | {"TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wlidd", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_socket(tmp_path / "wlidd.sock", proc)
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert "credentials loaded" in stderr and "stopped" in stderr
    assert ESC not in stderr + stdout
