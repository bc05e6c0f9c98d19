"""SHA-256 of executables, hashed once per version of a file, off the event loop.

The caller hands over an open descriptor of the exact file a process runs (opened through /proc/PID/exe:
the file the kernel maps, even when its path now names another one; wlidd.workload.proc) and its fstat.
A file version is (st_dev, st_ino, st_mtime_ns, st_size, st_ctime_ns): the ctime is in the key because the
file's owner can set the mtime back after a rewrite (utimensat) but not the ctime, which any write or
utimensat moves. Timestamps come from a coarse clock (a few ms; finer since Linux 6.13's multigrain
timestamps on some filesystems), so a rewrite of the same size within that tick could keep every field:
a version is only remembered once its ctime is SETTLED_NS (2 s) old, and a younger file is hashed anew
each time.

  - bounded: at most `max_entries` versions remembered (256), the least recently used dropped first;
  - one hash per version at a time (single flight): concurrent callers for it wait for the one running;
  - at most `max_parallel` hashes run at once (2), in worker threads (hashlib releases the GIL), so a
    flood of distinct executables queues instead of taking every core or thread;
  - at most `max_per_owner` hashes (2) queued or running for one uid: more are refused (retry);
  - files over `max_bytes` (512 MiB) are not hashed: refused with that reason;
  - `clock` (the realtime clock ctimes count on, ns) is injected for tests;
  - a file that changed while it was read (its fstat differs after) is refused: the hash would mix two
    versions.
Results are `(hex digest, "")` or `(None, why)`; nothing here raises for a bad file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import anyio
import anyio.to_thread

FileVersion = tuple[int, int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size, st_ctime_ns
CHUNK = 1 << 20  # bytes per read
SETTLED_NS = 2 * 10**9  # a file version younger than this (its ctime) is hashed, not remembered
MiB = 1 << 20


def file_version(st: os.stat_result) -> FileVersion:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def hash_descriptor(fd: int, version: FileVersion) -> tuple[str | None, str]:
    """SHA-256 of the open file `fd`, which must be at `version` before and after it is read (with pread:
    the descriptor's offset is left alone); (None, why) when it could not be read whole or was not that
    version throughout. Blocks: run it in a thread."""
    digest = hashlib.sha256()
    offset, size = 0, version[3]
    try:
        before = file_version(os.fstat(fd))
        while offset < size:
            chunk = os.pread(fd, min(CHUNK, size - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        after = file_version(os.fstat(fd))
    except OSError as exc:
        return None, f"its executable could not be read: {os.strerror(exc.errno or 0)}"
    if offset != size or not before == after == version:
        return None, "its executable changed while it was hashed"
    return digest.hexdigest(), ""


class ExecutableDigests:
    """SHA-256 digests of executable file versions (module docstring): bounded, single flight, off-loop."""

    def __init__(
        self,
        max_entries: int = 256,
        max_bytes: int = 512 * MiB,
        max_parallel: int = 2,
        clock: Callable[[], int] = time.time_ns,
        max_per_owner: int = 2,
    ) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._done: OrderedDict[FileVersion, str] = OrderedDict()
        self.max_parallel = max_parallel
        self.max_per_owner = max_per_owner
        self._owners: dict[int, int] = {}  # uid -> hashes it started, queued or running
        self._running: dict[FileVersion, anyio.Event] = {}
        self._limiter: tuple[asyncio.AbstractEventLoop, anyio.CapacityLimiter] | None = None
        self.hashed = 0  # files read whole (for tests and metrics: a hit reads nothing)

    def __len__(self) -> int:
        return len(self._done)

    def cached(self, st: os.stat_result) -> str | None:
        """The digest of this file version if already known (no I/O), else None."""
        version = file_version(st)
        found = self._done.get(version)
        if found is not None:
            self._done.move_to_end(version)
        return found

    def _limiter_here(self) -> anyio.CapacityLimiter:
        """The hashing limiter of the running event loop (made in it: one instance may outlive a loop)."""
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter[0] is not loop:
            self._limiter = (loop, anyio.CapacityLimiter(self.max_parallel))
        return self._limiter[1]

    async def sha256(self, fd: int, st: os.stat_result, *, owner: int | None = None) -> tuple[str | None, str]:
        """(hex digest, "") of the file open at `fd` whose fstat is `st`, or (None, why not). The
        descriptor stays the caller's (used only while this runs). `owner` (the caller's uid) may have at
        most `max_per_owner` hashes queued or running (waiting for one already under way does not count):
        beyond, it is refused (retry), so one uid's distinct or ever-changing files cannot queue ahead of
        every other caller's first hash."""
        if st.st_size > self.max_bytes:
            return None, (
                f"its executable is {st.st_size / MiB:.0f} MiB, more than the {self.max_bytes // MiB} MiB wlidd hashes"
            )
        version = file_version(st)
        while True:
            found = self.cached(st)
            if found is not None:
                return found, ""
            running = self._running.get(version)
            if running is None:
                break
            await running.wait()  # the hash under way; if it failed, try again as the one hashing
        if owner is not None:
            if self._owners.get(owner, 0) >= self.max_per_owner:
                return None, (
                    f"wlidd is already hashing {self.max_per_owner} executables for uid {owner}; retry when they are done"
                )
            self._owners[owner] = self._owners.get(owner, 0) + 1
        done = anyio.Event()
        self._running[version] = done
        try:
            async with self._limiter_here():
                digest, problem = await anyio.to_thread.run_sync(hash_descriptor, fd, version)
            if digest is None:
                return None, problem
            self.hashed += 1
            if self.clock() - st.st_ctime_ns >= SETTLED_NS:  # else a same-tick rewrite could keep the key
                self._done[version] = digest
                while len(self._done) > self.max_entries:
                    self._done.popitem(last=False)
            return digest, ""
        finally:
            del self._running[version]
            done.set()
            if owner is not None:
                if self._owners[owner] <= 1:
                    del self._owners[owner]
                else:
                    self._owners[owner] -= 1
