"""How sink failures are told and remembered: `reason` (an error for a log line, never a secret) and
FailingSinks, the process's record of the sinks whose last write failed (read by `/v1/status`, the metric
`wlidd_sink_write_failing` and `wlidd run --oneshot`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass


def reason(exc: BaseException) -> str:
    """An error for a log line: the message of a SinkRefused or KeyError, else `strerror: filename`."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else "unknown name"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


@dataclass(frozen=True)
class SinkProblem:
    """A sink whose last write failed: `kind` "identity" or "token", `owner` the identity's or token
    source's name, `place` the sink's dir or path, `error` as logged (no secret: strerror and a path, or
    an unknown user's or group's name)."""

    kind: str
    owner: str
    place: str
    error: str


class FailingSinks:
    """The sinks whose last write failed, one entry per place, gone once that sink is written or found
    current, or no longer configured (`keep_only`). Bounded: at most MAX_FAILING_SINKS entries (sinks come
    from the config, not from callers). Read by `/v1/status`, the metric `wlidd_sink_write_failing` and
    `wlidd run --oneshot`."""

    MAX_FAILING_SINKS = 1024

    def __init__(self) -> None:
        self._by_place: dict[str, SinkProblem] = {}
        self._lock = threading.Lock()

    def failed(self, problem: SinkProblem) -> None:
        with self._lock:
            self._by_place.pop(problem.place, None)
            if len(self._by_place) >= self.MAX_FAILING_SINKS:
                self._by_place.pop(next(iter(self._by_place)))
            self._by_place[problem.place] = problem

    def solved(self, place: str) -> None:
        with self._lock:
            self._by_place.pop(place, None)

    def keep_only(self, kind: str, owner: str, places: Sequence[str]) -> None:
        """Forget the owner's problems at places it no longer has (a reload removed or moved a sink)."""
        with self._lock:
            for place, problem in list(self._by_place.items()):
                if problem.kind == kind and problem.owner == owner and place not in places:
                    del self._by_place[place]

    def now(self) -> list[SinkProblem]:
        """Every failing sink, by kind, owner and place."""
        with self._lock:
            return sorted(self._by_place.values(), key=lambda p: (p.kind, p.owner, p.place))


_failing = FailingSinks()


def failing_sinks() -> FailingSinks:
    """The process's record of failing sinks (sinks are written by module functions shared by every daemon
    of the process, as the repeat limiter of the logs)."""
    return _failing
