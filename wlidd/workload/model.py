"""What the policy needs to know of a calling process, what was read of it, and the selector values. Pure.

Need            which facts a decision needs read: UNIT (its cgroup: /proc/PID/cgroup), EXE (the path
                of /proc/PID/exe), SHA256 (that file's hash; reading it needs EXE too)
ProcessFacts    what was read of one process while a pidfd named it alive (wlidd.workload.proc): each
                fact, or why it is unknown; a decision refuses a rule whose selector finds it unknown
ProcessSelectors
                a rule's units, executables and sha256, and why a process's facts do not match them
check_executable, check_sha256
                the config's `executables` (absolute, normalized paths: the kernel's name of the
                file, /proc/PID/exe, is one) and `sha256` (64 lowercase hex digits, as sha256sum(1)
                prints them) entries; InvalidValue otherwise
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass

from wlidd.errors import InvalidValue
from wlidd.workload.units import template_of

PATH_MAX = 4096  # include/uapi/linux/limits.h, the terminating NUL included
DELETED = " (deleted)"  # what /proc/PID/exe appends to a file unlinked since (fs/d_path.c d_path)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Need(enum.Flag):
    """Facts about a calling process a policy's rules select on (nothing: no /proc is read at all)."""

    NOTHING = 0
    UNIT = enum.auto()
    EXE = enum.auto()
    SHA256 = enum.auto()


@dataclass(frozen=True)
class ProcessFacts:
    """A calling process as read from /proc while its pidfd named it alive (so the pid was its own).

    `cgroup` is its unified cgroup path; `unit` its system unit and `user_unit` its user unit (systemd's
    names: wlidd.workload.units); `exe` the path it runs (/proc/PID/exe, never one ending " (deleted)");
    `sha256` that file's hash, lowercase hex. Each is None when unknown, with the reason in its
    `*_problem` ("" when known, or when not asked: `read` says what was asked)."""

    pid: int
    read: Need
    cgroup: str | None = None
    unit: str | None = None
    user_unit: str | None = None
    exe: str | None = None
    sha256: str | None = None
    unit_problem: str = ""
    exe_problem: str = ""
    sha256_problem: str = ""
    # the file itself, read off the event loop (wlidd.workload.proc): (st_dev, st_ino) of the file the
    # process runs (/proc/PID/exe) and of the file `exe` names in wlidd's own mount namespace; None with
    # `file_problem` saying why when it was not checked (a FUSE mount, a timeout, not needed)
    exe_id: tuple[int, int] | None = None
    path_id: tuple[int, int] | None = None
    file_problem: str = ""

    def fields(self) -> dict[str, str]:
        """The known facts that name the process in audit lines: unit, user_unit, exe (never a hash: long,
        and the same for every process of that file)."""
        found = {"unit": self.unit, "user_unit": self.user_unit, "exe": self.exe}
        return {key: value for key, value in found.items() if value is not None}


def check_executable(path: str) -> str:
    """An `executables` entry: an absolute, normalized path (no `.`, `..`, `//` or trailing `/`), as the
    kernel names a running file in /proc/PID/exe. InvalidValue ("executable_path") otherwise."""
    if not path.startswith("/") or path.startswith("//") or os.path.normpath(path) != path or path == "/":
        raise InvalidValue(
            "executable_path", f"{path!r} is not an absolute, normalized path to a file (e.g. '/usr/bin/app')"
        )
    if "\0" in path or "\n" in path or len(path.encode()) >= PATH_MAX or path.endswith(DELETED):
        raise InvalidValue("executable_path", f"{path!r} cannot be the path of a running executable")
    return path


def check_sha256(digest: str) -> str:
    """A `sha256` entry: 64 lowercase hex digits (sha256sum's output). InvalidValue ("sha256") otherwise."""
    if not _SHA256.fullmatch(digest):
        hint = " (lowercase)" if _SHA256.fullmatch(digest.lower()) else ""
        raise InvalidValue("sha256", f"{digest!r} is not a SHA-256 digest: 64 hex digits{hint}, as sha256sum prints")
    return digest


@dataclass(frozen=True)
class ProcessSelectors:
    """A rule's selectors on the calling process: its unit (a template entry matches every instance of
    it), its executable's path, that file's SHA-256. Each kind given must match; any entry of a kind may."""

    units: frozenset[str] = frozenset()
    executables: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()

    @property
    def need(self) -> Need:
        """The facts these selectors read (nothing: no /proc read at all)."""
        need = Need.UNIT if self.units else Need.NOTHING
        need |= Need.EXE if self.executables else Need.NOTHING
        return need | (Need.SHA256 if self.sha256 else Need.NOTHING)

    def describe(self) -> list[str]:
        """The selectors as a rule's text names them: "units a.service, b.service", …"""
        kinds = (("units", self.units), ("executables", self.executables), ("sha256", self.sha256))
        return [f"{kind} {', '.join(sorted(entries))}" for kind, entries in kinds if entries]

    def mismatch(self, facts: ProcessFacts, *, before_sha256: bool = False, before_file: bool = False) -> str | None:
        """None when every kind given matches `facts`, else why not, for the first kind that does not
        (units, executables, sha256; with `before_sha256` or `before_file` neither the hash nor the file's
        identity, only the names: what can be read without touching the
        file). An `executables` match is its path *and* its file: /proc/PID/exe names a path in the
        process's mount namespace, which another namespace may bind any file over, so the running file's
        (st_dev, st_ino) must be that of the path in wlidd's own namespace."""
        if self.units:
            if facts.unit is None:
                return facts.unit_problem or "its unit was not read"
            if facts.unit not in self.units and template_of(facts.unit) not in self.units:
                return f"its unit is {facts.unit}"
        if self.executables:
            if facts.exe is None:
                return facts.exe_problem or "its executable was not read"
            if facts.exe not in self.executables:
                return f"its executable is {facts.exe}"
            if not (before_file or before_sha256):
                if facts.exe_id is None or facts.path_id is None:
                    return facts.file_problem or "its executable's file was not checked"
                if facts.exe_id != facts.path_id:
                    return (
                        f"its executable is named {facts.exe} but is another file than {facts.exe} in wlidd's "
                        "mount namespace (a mount of its own over that path)"
                    )
        if self.sha256 and not (before_sha256 or before_file):
            if facts.sha256 is None:
                return facts.sha256_problem or facts.file_problem or "its executable was not hashed"
            if facts.sha256 not in self.sha256:
                return f"its executable's SHA-256 is {facts.sha256}"
        return None
