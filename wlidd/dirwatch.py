"""Directory change events without polling: inotify on the event loop, watchfiles as the fallback.

watchfiles' Rust loop sleeps `step` ms and takes the GIL on every wake, whether or not anything
changed: at a 10 ms step that is 100 wake-ups a second per identity, about 0.4 % CPU on an idle
node. Here the inotify descriptor itself wakes the event loop, so an idle daemon does not wake for
its files at all. Where inotify cannot be had (the per-user instance or watch limit is exhausted,
a kernel without it), watchfiles takes over.

Only "something changed in one of these directories" is reported: the caller re-reads and decides
by content. A burst of events is coalesced as watchfiles does it: after the first, events are drained until
a step of debounce/5 passes with no new one, or `debounce` in all.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
from inotify_simple import INotify, flags

from wlidd.logs import get_logger

log = get_logger("wlidd.dirwatch")

WATCH_MASK = (
    flags.CREATE
    | flags.DELETE
    | flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.ATTRIB
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)
OUT_OF_INOTIFY = {errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOSYS}  # limits reached, or no inotify
GONE = flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT


async def directory_changes(
    dirs: Sequence[str], debounce: float, stop: anyio.Event, ready: Callable[[], None] | None = None
) -> AsyncIterator[None]:
    """Yield once per (coalesced) burst of changes in `dirs`; return when `stop` is set or a watched
    directory itself goes away (the caller then resolves its directories again). `ready` is called
    once every watch is in place (events from then on are seen), before the first wait."""
    try:
        inotify = INotify(nonblocking=True)
        try:
            for directory in dirs:
                inotify.add_watch(directory, WATCH_MASK)
        except BaseException:
            inotify.close()
            raise
    except OSError as exc:
        if exc.errno not in OUT_OF_INOTIFY:
            raise  # e.g. the directory vanished meanwhile: the caller logs and retries
        log.warning("inotify unavailable, falling back to watchfiles", error=errno.errorcode.get(exc.errno or 0, "?"))
        if ready is not None:
            ready()  # watchfiles snapshots the directories when it starts: near enough
        async for _ in _watchfiles_changes(dirs, debounce, stop):
            yield
        return
    with inotify:
        if ready is not None:
            ready()
        while await _readable_unless_stopped(inotify.fileno(), stop):
            _, gone = _drain(inotify)
            # Coalesce the rest of the burst: until a quiet step passes, at most `debounce` in all.
            deadline = anyio.current_time() + debounce
            while not gone and anyio.current_time() < deadline and not stop.is_set():
                await anyio.sleep(max(0.005, debounce / 5))
                arrived, gone = _drain(inotify)
                if not arrived:
                    break
            yield
            if gone:
                return


def _drain(inotify: INotify) -> tuple[bool, bool]:
    """Read what is queued: (anything arrived, a watched directory itself went away)."""
    events = inotify.read(timeout=0)
    return bool(events), any(e.mask & GONE for e in events)


async def _readable_unless_stopped(fd: int, stop: anyio.Event) -> bool:
    readable = False
    async with anyio.create_task_group() as tg:

        async def on_stop() -> None:
            await stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(on_stop)
        await anyio.wait_readable(fd)
        readable = True
        tg.cancel_scope.cancel()
    return readable and not stop.is_set()


async def _watchfiles_changes(dirs: Sequence[str], debounce: float, stop: anyio.Event) -> AsyncIterator[None]:
    from watchfiles import awatch  # the fallback only: ~0.8 MB a daemon with inotify does not load

    debounce_ms = max(1, int(debounce * 1000))
    async for _changes in awatch(
        *dirs,
        debounce=debounce_ms,
        step=max(1, min(50, debounce_ms // 5)),
        stop_event=stop,
        recursive=False,
        ignore_permission_denied=True,
    ):
        yield
