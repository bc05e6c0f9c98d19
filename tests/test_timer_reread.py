"""An identity that never loaded is re-read by the timer every INVALID_REREAD_INTERVAL (30 s), the safety
net for a missed file event: its deadline counted from "now" at every tick, so it moved forward forever and
only a file event could load it."""

from __future__ import annotations

import datetime as dt

from tests.conftest import FileSet
from wlidd.watch import INVALID_REREAD_INTERVAL, CredentialWatcher

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


async def test_a_never_loaded_identity_is_due_for_a_reread_30_seconds_after_its_refused_read(files: FileSet) -> None:
    now = [T0]
    watcher = CredentialWatcher("default", files.source(mismatch_retries=1), clock=lambda: now[0])
    await watcher.reload("start")  # nothing on disk: refused
    assert watcher.current is None and watcher.stats.last_error_reason == "file_missing"
    later = T0 + dt.timedelta(seconds=INVALID_REREAD_INTERVAL + 1)
    deadline, why = watcher.next_timer_deadline(later)
    assert why == "timer" and deadline <= later  # due now, not 30 s after whenever the timer looks
