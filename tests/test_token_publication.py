"""Token sources publish tokens and sinks follow them; the refresh loop sleeps on the injected clock.

- A cold token's first caller gets the token as soon as it is cached, while the daemon's follower task
  writes the token's sinks and runs their on_change hooks.
- The follower writes the newest token: one superseded while a hook ran is never written.
- With a virtual clock, a source runs through refreshes and a backoff without waiting.
"""

from __future__ import annotations

import datetime as dt
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from tests.conftest import FileSet, in_background, wait_until
from tests.test_tokens import client, daemon_config, metadata_token_config
from wlidd.config import TokenConfig, parse_token_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.errors import UpstreamError
from wlidd.sinks.tokens import follow_token
from wlidd.tokens.manager import TokenSource
from wlidd.tokens.model import Token

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

# An on_change hook that says it started (argv[1]), appends a line to a log (argv[2]), then waits until the
# test releases it (argv[3] exists; at most a minute) and says it is done (argv[4]).
BLOCKING_HOOK = """
import os, sys, time
open(sys.argv[1], "w").close()
with open(sys.argv[2], "a") as log:
    log.write("ran\\n")
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.01)
open(sys.argv[4], "w").close()
"""


class Hook:
    """The files of one BLOCKING_HOOK: its argv and what the test reads of it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.started, self.log = directory / "started", directory / "runs"
        self.release, self.done = directory / "release", directory / "done"

    @property
    def argv(self) -> list[str]:
        paths = (self.started, self.log, self.release, self.done)
        return [sys.executable, "-c", BLOCKING_HOOK, *map(str, paths)]

    def runs(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


async def test_a_cold_tokens_first_caller_gets_it_while_the_sinks_on_change_hook_still_runs(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    """The first request for an on-demand token fetches it (cold) and is answered at once, while its sink's
    on_change hook is still running (the hook blocks until released); the sink file is written meanwhile."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    hook = Hook(tmp_path / "hook")
    sink = tmp_path / "out" / "mds.token"
    sinks = [{"path": str(sink), "on_change": hook.argv, "on_change_timeout": 60}]
    config = metadata_token_config(upstreams, on_demand=True, sinks=sinks)
    d = Daemon(daemon_config(tmp_path, files, {"mds": config}))
    async with in_background(d.run, d.stop), client(d) as c:
        try:
            with anyio.fail_after(10):  # before: the answer waited for the hook, which waits for the test
                response = await c.get("/v1/token/mds")
            assert response.status_code == 200
            await wait_until(hook.started.exists, what="the hook started")
            assert not hook.done.exists()  # the hook still runs: the caller did not wait for it
            assert sink.read_text() == response.json()["access_token"]
        finally:
            hook.release.touch()
        await wait_until(hook.done.exists, what="the hook finished")
    assert upstreams.calls["metadata"] == 1 and hook.runs() == 1


class CountingFlow:
    """A stand-in Flow: token number n is `tok-n`, valid for `lifetime` seconds; raises the errors in
    `failures` (by call number) instead. Records when each call came and when it was planned."""

    bound_to_svid = False  # a gce-metadata source's: no SVID to follow
    id_token_minter = "metadata"

    def __init__(self, clock: Callable[[], dt.datetime], lifetime: float = 600, failures: Any = None) -> None:
        self.clock, self.lifetime, self.failures = clock, lifetime, dict(failures or {})
        self.calls: list[tuple[dt.datetime, dt.datetime | None]] = []
        self.source: TokenSource | None = None
        self.enough = anyio.Event()
        self.wanted = 0

    async def fetch(self, now: dt.datetime) -> Token:
        planned = self.source.next_refresh if self.source is not None else None
        self.calls.append((self.clock(), planned))
        if len(self.calls) >= self.wanted:
            self.enough.set()
        if (error := self.failures.get(len(self.calls))) is not None:
            raise error
        return Token(f"tok-{len(self.calls)}", now + dt.timedelta(seconds=self.lifetime), now, "gcp")

    async def aclose(self) -> None:
        return None


def token_config(**values: Any) -> TokenConfig:
    return parse_token_config({"flow": "gce-metadata", "start_delay": 0, "min_interval": 0} | values)


async def test_a_token_superseded_while_a_sink_hook_runs_is_never_written_and_the_newest_stays(
    tmp_path: Path,
) -> None:
    """Tokens 2 and 3 are published while token 1's hook blocks the follower: once released, it writes token 3
    (the newest) and skips token 2, whose hook never runs."""
    hook = Hook(tmp_path / "hook")
    sink = tmp_path / "out" / "gcp.token"
    config = token_config(sinks=[{"path": str(sink), "on_change": hook.argv, "on_change_timeout": 60}])
    flow = CountingFlow(lambda: dt.datetime.now(dt.UTC))
    source = TokenSource("gcp", config, flow)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow_token, source, source.clock)
        try:
            await source.refresh("one")
            await wait_until(hook.started.exists)
            await source.refresh("two")
            await source.refresh("three")
            assert sink.read_text() == "tok-1" and not hook.done.exists()
        finally:
            hook.release.touch()
        await wait_until(lambda: hook.runs() == 2 and sink.read_text() == "tok-3")
        tg.cancel_scope.cancel()
    assert hook.runs() == 2 and source.published == 3


class VirtualClock:
    """Wall and monotonic time that move only when something sleeps on it: a sleep jumps time forward and
    returns at once (after a checkpoint), as trio's MockClock with autojump."""

    def __init__(self, start: dt.datetime) -> None:
        self.start, self.elapsed = start, 0.0

    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    async def sleep(self, seconds: float) -> None:
        self.elapsed += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


async def test_the_refresh_loop_runs_refreshes_and_a_backoff_on_the_virtual_clock() -> None:
    """Seven fetches of a 10-minute token, the third and fourth failing (503): each comes exactly when the
    source planned it, the retries after exponential backoff steps (5 s, then 5–10 s) — about twenty minutes
    of virtual time, with no real waiting (the loop's naps sleep on the injected clock)."""
    clock = VirtualClock(T0)
    failure = UpstreamError("metadata", "metadata answered 503", status=503, code="http_503")
    flow = CountingFlow(clock.now, lifetime=600, failures={3: failure, 4: failure})
    flow.wanted = 7
    config = token_config(backoff_min=5, backoff_max=20, skew=30)
    source = TokenSource(
        "gcp",
        config,
        flow,  # type: ignore[arg-type]
        clock=clock.now,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=random.Random(7),
    )
    flow.source = source
    async with anyio.create_task_group() as tg:
        await tg.start(source.run)
        with anyio.fail_after(10):  # before: the loop napped on the real clock, for up to 30 s at a time
            await flow.enough.wait()
        tg.cancel_scope.cancel()
    times = [when for when, _ in flow.calls]
    assert times[0] == T0  # start_delay 0: at once
    for when, planned in flow.calls[1:]:
        assert when == planned  # woken exactly when planned: the loop's sleeps are the clock's
    first_retry, second_retry = ((times[n + 1] - times[n]).total_seconds() for n in (2, 3))
    assert first_retry == 5 and 5 <= second_retry <= 10  # backoff_min, then up to twice that
    assert all(300 <= (b - a).total_seconds() <= 600 for a, b in [(times[1], times[2]), (times[5], times[6])])
    assert source.current is not None and source.current.value == "tok-7" and source.failures == 0
    assert clock.elapsed > 1000
