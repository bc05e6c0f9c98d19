"""How many bytes of Envoy's SDS requests and responses the daemon holds at once: per caller (uid) and in all.

What one SDS call holds (wlidd.workload_api.sds_service), each charged to the call's `Share`:
  - its protocol state: the client strings it keeps (the names it subscribed, the versions it says it has:
    `held_bytes` of wlidd.workload_api.sds_protocol's streams, at most MAX_STATE_BYTES), set after every
    request;
  - the request it is reading: its declared size (at most MAX_SDS_REQUEST_BYTES), from the moment its length
    prefix is read until it is parsed;
  - the response it is sending: the message and the client's names the answer refers to (a DeltaSecrets
    response names back subscribed names the caller has nothing for), charged at once as it is built,
    and its encoding (twice the message: grpclib keeps it with and without its prefix) once that fits,
    until it is written out or the call ends (a client can hold a push back by not opening its HTTP/2
    window, for SEND_TIMEOUT).

A request's body is read, and a response encoded, only once its bytes fit in its caller's budget
(`per_caller`, PER_CALLER_BYTES) and in all (`total`, TOTAL_BYTES); until then the call waits, holding no
more memory, while HTTP/2 flow control holds its client back (a push that waits longer than SEND_TIMEOUT
ends its call, as one its client does not read does). What exists already is charged at once (a state
once its request is parsed: it replaced that request's charge; a response as built), so a caller may end
up over its budget by that much; it reads and encodes nothing more until its calls shrink, send or end.

One call's state, one request and one response fit an empty budget (~4 MiB at most: MAX_STATE_BYTES, 1 MiB,
and a response with the names it refers to, which a DeltaSecrets answer limits to 64 KiB of them), so a call
never waits on itself alone: the calls of one caller wait on each other, and all callers on the total.
Healthy clients read their pushes at once (a push is charged for as long as it takes to write it out), so
their calls never wait. Waiting is fair to no one in particular: every release wakes every waiter, which
checks again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager

import anyio

PER_CALLER_BYTES = 16 * 2**20  # what one uid's SDS calls may hold (an Envoy's call: a few hundred bytes, and its push)
TOTAL_BYTES = 64 * 2**20  # what every caller's SDS calls may hold together


class RequestBudget:
    """The bytes SDS calls hold, per caller and in all (see the module docstring). `used` and `by_caller`
    are what is charged now (callers holding nothing are not listed)."""

    def __init__(self, per_caller: int = PER_CALLER_BYTES, total: int = TOTAL_BYTES) -> None:
        if per_caller < 1 or total < per_caller:
            raise ValueError("a RequestBudget needs 1 <= per_caller <= total")
        self.per_caller = per_caller
        self.total = total
        self.used = 0
        self.by_caller: dict[Hashable, int] = {}
        self._freed: anyio.Event | None = None  # made only while a call waits for room

    def __repr__(self) -> str:
        return f"RequestBudget(used={self.used}, callers={len(self.by_caller)}, per_caller={self.per_caller})"

    def fits(self, caller: Hashable, size: int) -> bool:
        """Whether `size` more bytes fit in `caller`'s budget and in the total now."""
        return self.by_caller.get(caller, 0) + size <= self.per_caller and self.used + size <= self.total

    def share(self, caller: Hashable) -> Share:
        """A new call's share (holding nothing yet); `close` it when the call ends."""
        return Share(self, caller)

    def _change(self, caller: Hashable, delta: int) -> None:
        self.used += delta
        held = self.by_caller.get(caller, 0) + delta
        if held > 0:
            self.by_caller[caller] = held
        else:
            self.by_caller.pop(caller, None)
        if delta < 0 and self._freed is not None:
            self._freed.set()
            self._freed = None

    async def room(self, caller: Hashable, size: int) -> None:
        """Return once `size` more bytes fit in `caller`'s budget and in the total (see `fits`)."""
        while not self.fits(caller, size):
            if self._freed is None:
                self._freed = anyio.Event()
            await self._freed.wait()

    @contextmanager
    def holding(self, caller: Hashable, size: int) -> Iterator[None]:
        """Charge `size` bytes to `caller` for the block (whether they fit or not: see `room`)."""
        self._change(caller, size)
        try:
            yield
        finally:
            self._change(caller, -size)


class Share:
    """One SDS call's charge against its caller's budget: its protocol state (`set_state`), the request it
    is reading (`reading`) and the response it is sending (`sending`)."""

    def __init__(self, budget: RequestBudget, caller: Hashable) -> None:
        self.budget = budget
        self.caller = caller
        self.state = 0

    def __repr__(self) -> str:
        return f"Share(caller={self.caller!r}, state={self.state})"

    def set_state(self, size: int) -> None:
        """Charge `size` bytes for the call's state instead of what it held before (at once: it is built)."""
        self.budget._change(self.caller, size - self.state)
        self.state = size

    @asynccontextmanager
    async def reading(self, size: int) -> AsyncIterator[None]:
        """Hold `size` bytes while a request of that declared size is read and parsed, once they fit."""
        await self.budget.room(self.caller, size)
        with self.budget.holding(self.caller, size):
            yield

    async def room(self, size: int) -> None:
        """Return once `size` more bytes fit (bound the wait with anyio.move_on_after, then check `fits`)."""
        await self.budget.room(self.caller, size)

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes fit in the caller's budget and in the total now."""
        return self.budget.fits(self.caller, size)

    def sending(self, size: int) -> AbstractContextManager[None]:
        """Hold `size` bytes while a response is written out (wait for `room` first)."""
        return self.budget.holding(self.caller, size)

    def close(self) -> None:
        """The call ended: release its state."""
        self.set_state(0)
