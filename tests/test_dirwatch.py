"""Directory change events: inotify on the event loop (no polling), watchfiles as the fallback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.conftest import wait_until
from wlidd.dirwatch import _watchfiles_changes, directory_changes


async def _count(changes: AsyncIterator[None], seen: list[int]) -> None:
    async for _ in changes:
        seen.append(1)


async def test_a_rename_into_a_watched_directory_is_one_coalesced_change(tmp_path: Path) -> None:
    stop, seen = anyio.Event(), []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_count, directory_changes([str(tmp_path)], 0.05, stop), seen)
        await anyio.sleep(0.05)
        for name in ("chain.pem", "key.pem", "bundle.pem"):  # one rotation: a burst of events
            (tmp_path / f".{name}.tmp").write_text("x")
            os.replace(tmp_path / f".{name}.tmp", tmp_path / name)
        await wait_until(lambda: seen)
        await anyio.sleep(0.2)
        assert len(seen) == 1
        stop.set()


async def test_a_symlink_swap_is_seen_and_stop_ends_the_stream(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "current").symlink_to("a")
    stop, seen = anyio.Event(), []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_count, directory_changes([str(tmp_path)], 0.02, stop), seen)
            await anyio.sleep(0.05)
            (tmp_path / ".tmp-link").symlink_to("b")
            os.replace(tmp_path / ".tmp-link", tmp_path / "current")
            await wait_until(lambda: seen)
            stop.set()  # the task group only ends if the stream returns


async def test_a_removed_watched_directory_ends_the_stream_so_the_caller_resolves_again(tmp_path: Path) -> None:
    watched = tmp_path / "old-contents"
    watched.mkdir()
    seen: list[int] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_count, directory_changes([str(watched)], 0.02, anyio.Event()), seen)
            await anyio.sleep(0.05)
            watched.rmdir()
    assert seen


async def test_a_missing_directory_is_an_error_for_the_caller_to_retry(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async for _ in directory_changes([str(tmp_path / "absent")], 0.02, anyio.Event()):
            pass


async def test_the_watchfiles_fallback_reports_changes_too(tmp_path: Path) -> None:
    stop, seen = anyio.Event(), []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_count, _watchfiles_changes([str(tmp_path)], 0.05, stop), seen)
        await anyio.sleep(0.3)
        (tmp_path / "chain.pem").write_text("x")
        await wait_until(lambda: seen)
        stop.set()
