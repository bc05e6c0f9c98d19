"""Where one source's files are watched: the real directories its files depend on (`CredentialSource.watch_dirs`),
each watched with inotify (wlidd.dirwatch) where it exists and at its nearest existing ancestor where it does
not; the watches move when a link now leads elsewhere or a missing directory appears. Every event, and every
move of the watches, is reported to the watcher (`on_change(reason)`), which reloads (wlidd.watch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus
from structlog.typing import FilteringBoundLogger

from wlidd.dirwatch import directory_changes
from wlidd.svid.load.source import CredentialSource

MISSING_RECHECK = 2.0  # seconds between re-plans of the watches while a needed directory does not exist


class DirectoryWatches:
    """The inotify watches of one source, run by its CredentialWatcher until closed."""

    def __init__(self, source: CredentialSource, on_change: Callable[[str], None], log: FilteringBoundLogger) -> None:
        self.source = source
        self.on_change = on_change  # the watcher's request_reload
        self.log = log
        self.watching: list[str] | None = None  # the directories watched now (plan)
        self._stop = anyio.Event()
        self._closed = False

    def close(self) -> None:
        """Stop watching promptly: the watch thread ends (call before cancelling `run`)."""
        self._closed = True
        self._stop.set()

    def needed(self) -> list[Path]:
        """The real directories the source needs (CredentialSource.watch_dirs)."""
        return self.source.watch_dirs()

    def plan(self) -> list[str]:
        """The directories to watch now: each real directory the source needs (CredentialSource.watch_dirs)
        that exists, and for one that does not, its nearest existing ancestor — its creation, or a
        directory moved into place (`mv new certs`), shows there as an event."""
        return self.plan_for(self.needed())

    @staticmethod
    def plan_for(needed: list[Path]) -> list[str]:
        plan: list[str] = []
        for directory in needed:
            probe = directory
            while not probe.is_dir() and probe != probe.parent:
                probe = probe.parent
            if str(probe) not in plan:
                plan.append(str(probe))
        return plan

    async def check(self) -> None:
        """Plan the watches again (after an event burst, a reload, and every 2 s while a needed directory
        is missing): when a link now leads elsewhere (a re-pointed parent link whose old target
        survives, a swap the events missed) or a missing directory appeared, the watches move."""
        if self.watching is None:
            return
        plan = await anyio.to_thread.run_sync(self.plan)
        if plan != self.watching:
            self.log.debug("watched directories moved", dirs=plan)
            self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch the source's directories until closed; started once the first watches are in place.

        Each time the watches are set up again (a watched directory went away, links moved), events
        may have been missed meanwhile, so the set is read once more ("watch-changed"; cheap when
        nothing changed: the content fingerprint is compared before any parsing)."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        first = True
        while not self._closed:
            needed = await anyio.to_thread.run_sync(self.needed)
            plan = await anyio.to_thread.run_sync(self.plan_for, needed)
            if not first:
                self.on_change("watch-changed")
            first = False
            stop = self._stop = anyio.Event()
            self.watching = plan
            async with anyio.create_task_group() as tg:
                if not {str(d) for d in needed} <= set(plan):  # a needed directory is missing
                    tg.start_soon(self._recheck_while_missing, stop)
                try:
                    async for _ in directory_changes(plan, self.source.config.debounce, stop, ready):
                        self.on_change("file-event")
                        await self.check()
                except (OSError, RuntimeError) as exc:
                    self.log.warning("file watch failed, restarting", error=str(exc))
                    ready()  # the periodic re-read still runs; the watch is retried in a second
                    await anyio.sleep(1.0)
                tg.cancel_scope.cancel()

    async def _recheck_while_missing(self, stop: anyio.Event) -> None:
        """Every MISSING_RECHECK seconds while a needed directory does not exist: plan again (a safety
        net beside the ancestor's events, e.g. for a directory created by a chain of mkdirs)."""
        while not stop.is_set():
            await anyio.sleep(MISSING_RECHECK)
            await self.check()
