"""Counting a Flow's upstream calls: every HTTP request a Flow's clients send is counted in the `attempt()`
open in the calling task, so a caller counts an upstream call only when something was sent (a ca_file that
cannot be loaded, a missing SVID or signing key fail before that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import httpx


@dataclass
class Attempt:
    """What one upstream call (an access-token chain, one mint) did: `sent` HTTP requests went out over a
    Flow's clients; `reported` once a Flow ran it (a stand-in without HTTP clients reports nothing)."""

    sent: int = 0
    reported: bool = False

    @property
    def went_upstream(self) -> bool:
        """Whether to count it as an upstream call: something was sent, or its flow cannot tell."""
        return self.sent > 0 or not self.reported


_ATTEMPT: ContextVar[Attempt | None] = ContextVar("wlidd_upstream_attempt", default=None)


@contextlib.contextmanager
def attempt() -> Iterator[Attempt]:
    """Count what the calls made by this task inside the block send (httpx runs request hooks in the
    task that sends, so concurrent attempts in other tasks are counted apart)."""
    current = Attempt()
    token = _ATTEMPT.set(current)
    try:
        yield current
    finally:
        _ATTEMPT.reset(token)


def mark_reported() -> None:
    """A Flow runs the attempt open in this task: what it sends is counted (see `Attempt.reported`)."""
    current = _ATTEMPT.get()
    if current is not None:
        current.reported = True


async def count_request(request: httpx.Request) -> None:
    """The request hook of every client a Flow makes: one more request sent in this task's attempt."""
    current = _ATTEMPT.get()
    if current is not None:
        current.sent += 1
