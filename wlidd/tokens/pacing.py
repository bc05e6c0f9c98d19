"""The pace of a token source's upstream calls: one turn each, `min_interval` seconds after the turn handed
out before it, in arrival order (so concurrent callers queue rather than slip through), waited for with the
injected `sleep` on the `monotonic` clock; a call a backoff holds gives its turn up (wlidd.tokens.source:
`_paced` wraps every upstream call in a turn)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from wlidd.errors import WlidError


class Pacer:
    """The turns of one source's upstream calls. `min_interval` is read at every turn (seconds: the source's
    config as it is then); `monotonic` and `sleep` are the source's injected clock and sleep."""

    def __init__(
        self,
        min_interval: Callable[[], float],
        monotonic: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.min_interval = min_interval
        self.monotonic = monotonic
        self._sleep = sleep
        self._last_call: float | None = None  # the latest turn handed out (taken or still waited for)
        self._turn_taken: float | None = None  # the latest turn taken by a call that went
        self._turns: list[float] = []  # turns handed out and still waited for
        self._hold_set = anyio.Event()  # set (and replaced) whenever a failure starts a backoff for mints

    async def take_turn(self, held: Callable[[], WlidError | None] | None) -> None:
        """Wait for this call's turn: `min_interval` seconds after the turn handed out before it (each
        caller takes its turn before waiting, so concurrent callers queue rather than slip through).
        `held` is asked on arrival, whenever a failure starts a backoff meanwhile (`signal_hold`) and
        when the turn comes: its error is raised, and the turn given back (the turns after it are not
        moved, but a new caller queues after the last turn still waited for, not after this one)."""
        if held is not None and (error := held()) is not None:
            raise error
        now = self.monotonic()
        turn = now if self._last_call is None else max(now, self._last_call + self.min_interval())
        self._last_call = turn
        self._turns.append(turn)
        went = False
        try:
            while (wait := turn - self.monotonic()) > 0:
                if held is None:
                    await self._sleep(wait)
                    break
                if not await self._sleep_unless_held(wait):
                    break  # slept its time (an injected sleep need not move the monotonic clock)
                if (error := held()) is not None:
                    raise error
            if held is not None and (error := held()) is not None:
                raise error
            went = True
        finally:
            self._turns.remove(turn)
            if went:
                self._turn_taken = turn if self._turn_taken is None else max(self._turn_taken, turn)
            else:
                handed = [t for t in (*self._turns, self._turn_taken) if t is not None]
                self._last_call = max(handed) if handed else None

    async def _sleep_unless_held(self, seconds: float) -> bool:
        """Sleep `seconds`, or until a failure starts a backoff (`signal_hold`): True when woken by one."""
        return await sleep_or_wake(self._sleep, seconds, self._hold_set)

    def signal_hold(self) -> None:
        """Wake the calls waiting for their turn: a backoff may hold them now."""
        event, self._hold_set = self._hold_set, anyio.Event()
        event.set()


async def sleep_or_wake(sleep: Callable[[float], Awaitable[None]], seconds: float, event: anyio.Event) -> bool:
    """Sleep `seconds` with `sleep` (an injected one), or until `event` is set: True when the event ended it."""
    woken = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal woken
            await event.wait()
            woken = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await sleep(seconds)
        tg.cancel_scope.cancel()
    return woken
