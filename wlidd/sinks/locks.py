"""Serializing sink writers: one publication lock per token source or identity (a reload's rewrite and a
refresh never interleave), and one lock per sink directory across threads (by device and inode) and
processes (flock(2), waited for FLOCK_WAIT seconds only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio

from wlidd.logs import get_logger

log = get_logger("wlidd.sinks")

LOCKS_LIMIT = 1024  # idle publication locks kept (one per token source or identity: config-bounded)


@contextlib.asynccontextmanager
async def publication_lock(locks: dict[str, anyio.Lock], name: str) -> AsyncIterator[None]:
    """Hold the publication lock of `name` (made on first use; idle ones are dropped past LOCKS_LIMIT)."""
    if name not in locks and len(locks) >= LOCKS_LIMIT:
        for idle in [key for key, lock in locks.items() if not lock.locked()]:
            del locks[idle]
    lock = locks.setdefault(name, anyio.Lock())
    async with lock:
        yield


_DIRECTORY_LOCKS: dict[tuple[int, int], threading.Lock] = {}  # one per sink directory written (config-bounded)


_DIRECTORY_LOCKS_GUARD = threading.Lock()


FLOCK_WAIT = 2.0  # seconds a writer waits for another process's flock on a sink directory before going on


@contextlib.contextmanager
def directory_lock(dir_fd: int, directory: Path) -> Iterator[None]:
    """Serialize the writers of one sink directory: threads of this process by a lock per (device, inode)
    (two sinks reaching one directory through an alias such as /var/run -> /run), other processes (a
    second daemon, `wlidd creds --out` into a live sink) by flock(2) on the directory. Anyone who can open
    the directory can take that flock, so it is waited for FLOCK_WAIT seconds only, then the write goes on
    (logged): the steps are safe without it, the lock only keeps writers from undoing each other's work."""
    st = os.fstat(dir_fd)
    with _DIRECTORY_LOCKS_GUARD:
        if len(_DIRECTORY_LOCKS) >= LOCKS_LIMIT:
            _DIRECTORY_LOCKS.clear()
        lock = _DIRECTORY_LOCKS.setdefault((st.st_dev, st.st_ino), threading.Lock())
    with lock:
        deadline = time.monotonic() + FLOCK_WAIT
        locked = False
        while True:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.limited(
                        "warning",
                        "sink directory is locked by another process; writing anyway",
                        key={"dir": str(directory)},
                    )
                    break
                time.sleep(0.01)
            except OSError:
                break  # a file system without flock: the in-process lock is all there is
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    fcntl.flock(dir_fd, fcntl.LOCK_UN)
