"""wlidd.workload.digest: executables hashed once per file version, bounded, one hash per version at a time,
refusing files over the cap and files that change under it; real files, real threads."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from wlidd.workload.digest import SETTLED_NS, ExecutableDigests, MiB


def later() -> int:
    """A realtime clock well past every file's ctime: every version is settled."""
    return time.time_ns() + 10 * SETTLED_NS


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[list[int]]:
    """Descriptors the test opens, closed after it."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def open_file(path: Path, data: bytes, fds: list[int]) -> tuple[int, os.stat_result]:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    return fd, os.fstat(fd)


async def test_a_file_version_is_hashed_once_and_the_table_keeps_the_most_recent_versions(
    tmp_path: Path, opened: list[int]
) -> None:
    digests = ExecutableDigests(max_entries=2, clock=later)
    files = [open_file(tmp_path / f"app{i}", f"build {i}".encode(), opened) for i in range(3)]
    for _ in range(2):
        assert await digests.sha256(*files[0]) == (hashlib.sha256(b"build 0").hexdigest(), "")
    assert digests.hashed == 1
    await digests.sha256(*files[1])
    await digests.sha256(*files[2])  # the third version: the least recently used (app0) goes
    assert digests.hashed == 3 and len(digests) == 2 and digests.cached(files[0][1]) is None
    await digests.sha256(*files[0])
    assert digests.hashed == 4


async def test_a_rewritten_file_is_another_version(tmp_path: Path, opened: list[int]) -> None:
    digests = ExecutableDigests(clock=later)
    path = tmp_path / "app"
    fd, before = open_file(path, b"release 1", opened)
    assert (await digests.sha256(fd, before))[0] == hashlib.sha256(b"release 1").hexdigest()
    os.utime(path, ns=(before.st_atime_ns - 10**9, before.st_mtime_ns - 10**9))  # ctime moves all the same
    fd, after = open_file(path, b"release 2", opened)  # same inode, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the mtime set back: the ctime tells
    after = os.fstat(fd)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert (await digests.sha256(fd, after))[0] == hashlib.sha256(b"release 2").hexdigest()
    assert digests.hashed == 2


async def test_a_version_younger_than_its_settling_time_is_hashed_each_time_not_remembered(
    tmp_path: Path, opened: list[int]
) -> None:
    """Within one tick of the coarse clock files are stamped with, a same-size rewrite could keep every field."""
    digests = ExecutableDigests()  # the real clock: the file was written just now
    fd, st = open_file(tmp_path / "fresh", b"just built", opened)
    for _ in range(2):
        assert (await digests.sha256(fd, st))[0] == hashlib.sha256(b"just built").hexdigest()
    assert digests.hashed == 2 and len(digests) == 0


async def test_concurrent_callers_for_one_version_share_one_hash(tmp_path: Path, opened: list[int]) -> None:
    digests = ExecutableDigests(clock=later)
    fd, st = open_file(tmp_path / "big", os.urandom(8 * MiB), opened)
    results: list[tuple[str | None, str]] = []

    async def one() -> None:
        results.append(await digests.sha256(fd, st))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert digests.hashed == 1 and len(set(results)) == 1 and results[0][0] is not None


async def test_a_file_over_the_cap_is_refused_unread(tmp_path: Path, opened: list[int]) -> None:
    digests = ExecutableDigests(max_bytes=1 * MiB)
    fd, st = open_file(tmp_path / "huge", b"\0" * (2 * MiB), opened)
    assert await digests.sha256(fd, st) == (None, "its executable is 2 MiB, more than the 1 MiB wlidd hashes")
    assert digests.hashed == 0


async def test_a_file_that_is_not_the_version_it_was_opened_at_is_refused(tmp_path: Path, opened: list[int]) -> None:
    digests = ExecutableDigests()
    path = tmp_path / "app"
    fd, st = open_file(path, b"original", opened)
    with path.open("ab") as grow:
        grow.write(b" and more")  # written after the caller's fstat, before the hash
    assert await digests.sha256(fd, st) == (None, "its executable changed while it was hashed")
    assert digests.cached(st) is None
