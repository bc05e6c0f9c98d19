"""on_change commands: an argv list (never a shell) with a timeout, a minimal environment (COMMAND_ENV) and
bounded output (OUTPUT_LIMIT), whose logged tail is masked of anything that could be the secret the sink
just wrote (output_tail).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal as signals
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from wlidd.logs import REDACTED, get_logger, scrub

log = get_logger("wlidd.sinks")

COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # all an on_change command gets


OUTPUT_LIMIT = 64 * 1024  # bytes of a command's output (stdout and stderr together) kept; the rest is discarded


LOGGED_TAIL = 400  # characters of that output logged when the command fails


@dataclass(frozen=True)
class CommandResult:
    """How an on_change command ended. returncode None: it could not start or was killed at its timeout.
    `output` is the last OUTPUT_LIMIT bytes of stdout and stderr (merged); `output_bytes` counts all of it."""

    returncode: int | None
    output: bytes = b""
    output_bytes: int = 0
    timed_out: bool = False


async def run_command(argv: list[str], timeout: float, source: str, *, hide: Sequence[str] = ()) -> CommandResult:
    """Run `argv` (no shell) with COMMAND_ENV only, stdin from /dev/null, cwd /, in its own session, for
    at most `timeout` seconds (then its whole process group is killed). Its output is drained and only
    the last OUTPUT_LIMIT bytes kept. A failure is logged with a short tail of the output, scrubbed of
    `hide` (the secrets the sink just wrote) and of anything that looks like a key or token. Never raises
    (except cancellation)."""
    named = {"source": source, "command": argv[0]}  # the fields of every line about this command
    try:
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=COMMAND_ENV,
            start_new_session=True,
        )
    except OSError as exc:
        log.error("on_change command could not start", **named, error=exc.strerror)
        return CommandResult(None)
    tail, total, timed_out = bytearray(), 0, False
    try:
        with anyio.fail_after(timeout):
            assert process.stdout is not None
            async for chunk in process.stdout:
                total += len(chunk)
                tail += chunk
                if len(tail) > OUTPUT_LIMIT:
                    del tail[: len(tail) - OUTPUT_LIMIT]
            await process.wait()
    except TimeoutError:
        timed_out = True
    finally:
        # bounded: a child that became another user (sudo) may survive the EPERM of killpg
        with anyio.move_on_after(5, shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signals.SIGKILL)
                await process.wait()
            await process.aclose()
    output = bytes(tail)
    if timed_out:
        log.error("on_change command timed out", **named, timeout=timeout, output=output_tail(output, hide))
        return CommandResult(None, output, total, timed_out=True)
    returncode = process.returncode
    if returncode != 0:
        log.warning("on_change command failed", **named, returncode=returncode, output=output_tail(output, hide))
    return CommandResult(returncode, output, total)


def output_tail(output: bytes, hide: Sequence[str] = (), limit: int = LOGGED_TAIL) -> str:
    """The last whole lines of `output` (at most `limit` characters), safe to log whatever the command
    did with the secret (folded at any width, on one line, base64url, a hex dump with or without
    colons, `openssl pkey -text`, reversed, JSON-escaped). A partial first line is dropped, and every
    line that could carry secret material is replaced by REDACTED (runs of them by one):

    - a line holding a fragment of a `hide` secret: 12 characters of its base64 body (or base64url, or
      the secret as text), or 8 bytes of its DER in hex (SECRET_FRAGMENT_B64, SECRET_FRAGMENT_HEX);
    - a line with a run of 16 or more base64/base64url characters mixing letters and digits (a word
      such as FileNotFoundError or a path such as /usr/share/locale stays), or a run of 8 or more hex
      byte pairs, with or without colons or spaces between them;
    - a line that is one base64(url) word, or only hex digits, colons and spaces (the short end of a
      folded block, the last line of a hex dump), next to a redacted line;
    - private keys in PEM, JWTs and bearer tokens anywhere (wlidd.logs.scrub).
    """
    text = output.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[-limit:]
        text = text.partition("\n")[2]
    material = _SecretMaterial(hide)
    lines = scrub(text).splitlines()
    hidden = [line.strip() == REDACTED or material.found_in(line) or _secret_shaped(line) for line in lines]
    spreading = True
    while spreading:  # a fragment-like line next to a redacted one goes too, in both directions
        spreading = False
        for index, line in enumerate(lines):
            if hidden[index] or not _FRAGMENT_LINE.fullmatch(line.strip()):
                continue
            if (index > 0 and hidden[index - 1]) or (index + 1 < len(lines) and hidden[index + 1]):
                hidden[index] = spreading = True
    kept: list[str] = []
    for line, redacted in zip(lines, hidden, strict=True):
        if not redacted:
            kept.append(line)
        elif not kept or kept[-1] != REDACTED:
            kept.append(REDACTED)
    return "\n".join(kept).strip()


SECRET_FRAGMENT_B64 = 12  # characters of a secret's base64 (72 bits) that mark a line as carrying it


SECRET_FRAGMENT_HEX = 16  # hex digits (8 bytes) of a secret's DER that mark a line as carrying it


_B64_RUN = re.compile(r"[A-Za-z0-9+_-]{16,}")  # '/' splits runs, so path components are judged alone


_HEX_PAIRS = re.compile(r"(?:[0-9A-Fa-f]{2}[:\s-]?){8,}")


_FRAGMENT_LINE = re.compile(r"[A-Za-z0-9+/=_.-]+|[0-9A-Fa-f:\s]+")  # one base64(url) word (dots: tokens, JWTs), or hex


_NOT_B64 = re.compile(r"[^A-Za-z0-9+/]")


_NOT_HEX = re.compile(r"[^0-9a-f]")


_PEM_BODY = re.compile(r"-----BEGIN [^-]+-----(.*?)-----END [^-]+-----", re.S)


def _secret_shaped(line: str) -> bool:
    """A run that looks random (base64 with letters and digits) or binary (hex byte pairs)."""
    if _HEX_PAIRS.search(line):
        return True
    return any(any(c.isdigit() for c in run) and any(c.isalpha() for c in run) for run in _B64_RUN.findall(line))


def _b64_normal(text: str) -> str:
    """`text` as plain base64 characters only (base64url's - and _ mapped to + and /)."""
    return _NOT_B64.sub("", text.replace("-", "+").replace("_", "/"))


class _SecretMaterial:
    """Fragments of the secrets a sink wrote, to recognize them in a command's output however it was
    formatted: every SECRET_FRAGMENT_B64-character window of each secret (as text, and of each PEM
    block's base64 body), and every SECRET_FRAGMENT_HEX-digit window of each PEM block's DER in hex.
    Sizes: a few thousand windows for an RSA-4096 key."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.b64: set[str] = set()
        self.hex: set[str] = set()
        for secret in secrets:
            bodies = [match.group(1) for match in _PEM_BODY.finditer(secret)]
            for body in bodies:
                normal = _b64_normal(body)
                self._add(self.b64, normal, SECRET_FRAGMENT_B64)
                with contextlib.suppress(ValueError):
                    self._add(self.hex, base64.b64decode(normal + "=" * (-len(normal) % 4)).hex(), SECRET_FRAGMENT_HEX)
            if not bodies:
                self._add(self.b64, _b64_normal(secret), SECRET_FRAGMENT_B64)

    @staticmethod
    def _add(windows: set[str], text: str, size: int) -> None:
        windows.update(text[i : i + size] for i in range(len(text) - size + 1))

    def found_in(self, line: str) -> bool:
        return self._search(self.b64, _b64_normal(line), SECRET_FRAGMENT_B64) or self._search(
            self.hex, _NOT_HEX.sub("", line.lower()), SECRET_FRAGMENT_HEX
        )

    @staticmethod
    def _search(windows: set[str], text: str, size: int) -> bool:
        return bool(windows) and any(text[i : i + size] in windows for i in range(len(text) - size + 1))
