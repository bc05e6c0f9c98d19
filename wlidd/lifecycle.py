"""The daemon's lifecycle as a table: states, the allowed transitions, and the sd_notify lines each sends.

The shape of h11's `_state.py` and ghostunnel's `status.go`: the table below is the only way the daemon
sends READY=1, RELOADING=1, STOPPING=1 and STATUS= (sd_notify(3); `Type=notify-reload` wants
MONOTONIC_USEC= with RELOADING=1). A transition not in the table is refused: logged, nothing sent.

    starting ──▶ ready | degraded        READY=1 + STATUS=  (every first load tried, required tokens had)
    ready ◀──▶ degraded                  STATUS=            (health changed: a required identity or token,
                                                             or an accept loop)
    ready | degraded ──▶ reloading       RELOADING=1 + MONOTONIC_USEC=
    reloading ──▶ ready | degraded       READY=1 + STATUS=
    any but stopping ──▶ stopping        STOPPING=1 + STATUS=stopping
    a state to itself                    STATUS= when the text changed (stopping: nothing, it stays "stopping")

Invariants, by construction (tests/test_lifecycle.py walks every path):
  - READY=1 is sent only on leaving starting or reloading, so never after STOPPING=1 (a SIGHUP during
    the stop drain, or a stop during a reload, ends in a refused transition) and never twice in a row
    without a RELOADING=1 between;
  - STOPPING=1 is sent at most once; nothing but a STATUS-free self-transition is allowed after it;
  - RELOADING=1 is sent only from ready or degraded: a SIGHUP while starting is the daemon's to defer.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from wlidd.logs import get_logger

log = get_logger("wlidd.lifecycle")


class State(enum.StrEnum):
    STARTING = "starting"  # accept loops run; first loads and required tokens awaited; no READY=1 yet
    READY = "ready"  # READY=1 sent, healthy
    DEGRADED = "degraded"  # READY=1 sent, a required identity or token not valid, or an accept loop dead
    RELOADING = "reloading"  # RELOADING=1 sent, READY=1 not yet
    STOPPING = "stopping"  # STOPPING=1 sent: final


_S = State
_READY: Final = ("READY", "STATUS")
_RELOADING: Final = ("RELOADING", "MONOTONIC_USEC")
_STOPPING: Final = ("STOPPING", "STATUS")
_STATUS: Final = ("STATUS",)

# (from, to) → the sd_notify variables the transition sends, in this order; () sends nothing.
TRANSITIONS: Final[Mapping[tuple[State, State], tuple[str, ...]]] = {
    (_S.STARTING, _S.STARTING): _STATUS,  # the start moved on: what it still waits for
    (_S.STARTING, _S.READY): _READY,
    (_S.STARTING, _S.DEGRADED): _READY,  # started, degraded: READY=1 all the same (a restart fixes nothing)
    (_S.STARTING, _S.STOPPING): _STOPPING,  # a stop during the start: never READY=1
    (_S.READY, _S.READY): _STATUS,
    (_S.READY, _S.DEGRADED): _STATUS,
    (_S.READY, _S.RELOADING): _RELOADING,
    (_S.READY, _S.STOPPING): _STOPPING,
    (_S.DEGRADED, _S.DEGRADED): _STATUS,
    (_S.DEGRADED, _S.READY): _STATUS,
    (_S.DEGRADED, _S.RELOADING): _RELOADING,
    (_S.DEGRADED, _S.STOPPING): _STOPPING,
    (_S.RELOADING, _S.RELOADING): _STATUS,  # "reload refused: …"
    (_S.RELOADING, _S.READY): _READY,
    (_S.RELOADING, _S.DEGRADED): _READY,
    (_S.RELOADING, _S.STOPPING): _STOPPING,
    (_S.STOPPING, _S.STOPPING): (),  # status updates while draining: the status stays "stopping"
}

SERVING: Final = frozenset({State.READY, State.DEGRADED})  # READY=1 sent, no reload or stop under way


def step(state: State, to: State) -> tuple[str, ...] | None:
    """The sd_notify variables the transition `state` → `to` sends, or None when the table refuses it."""
    return TRANSITIONS.get((state, to))


def notify_fields(keys: tuple[str, ...], status: str, monotonic_usec: int) -> dict[str, str | int]:
    """The datagram's fields for `keys`: READY/RELOADING/STOPPING=1, STATUS= `status` on one line (the
    protocol's assignments are newline-separated), MONOTONIC_USEC= `monotonic_usec` (CLOCK_MONOTONIC, µs)."""
    values: dict[str, str | int] = {"STATUS": " ".join(status.split()), "MONOTONIC_USEC": monotonic_usec}
    return {key: values.get(key, 1) for key in keys}


class Send(Protocol):
    """Sends one sd_notify datagram of KEY=VALUE lines (wlidd.systemd.Notifier.send)."""

    def __call__(self, **fields: str | int) -> None: ...


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Lifecycle:
    """The current state, moved only through TRANSITIONS; the one sender of READY=1, RELOADING=1,
    STOPPING=1 and STATUS= (WATCHDOG=1 is the watchdog's: liveness, not a state)."""

    def __init__(self, send: Send, *, clock: Callable[[], int] = monotonic_usec) -> None:
        self.state = State.STARTING
        self._send = send
        self._clock = clock
        self.status_sent: str | None = None  # the STATUS= text sent last

    def move(self, to: State, status: str = "") -> bool:
        """Go to `to`, sending what the table says (`status` is the STATUS= text). False, with a log line
        and nothing sent, when the table refuses the transition. A self-transition whose STATUS= text did
        not change sends nothing."""
        keys = step(self.state, to)
        if keys is None:
            log.info("lifecycle transition refused: nothing sent", state=self.state.value, refused=to.value)
            return False
        fields = notify_fields(keys, status, self._clock()) if keys else {}
        self.state = to
        if keys == _STATUS and fields["STATUS"] == self.status_sent:
            return True
        if fields:
            if "STATUS" in fields:
                self.status_sent = str(fields["STATUS"])
            self._send(**fields)
        return True

    def status(self, text: str) -> bool:
        """STATUS= `text` without a change of state (nothing while stopping)."""
        return self.move(self.state, text)

    def report(self, serving: State, line: str) -> bool:
        """What the health says now: a started daemon (ready or degraded) moves to `serving` (ready or
        degraded) with STATUS= `line`; while starting or reloading only STATUS= `line` is sent (what the
        start waits for, the reload so far); while stopping nothing."""
        return self.move(serving, line) if self.state in SERVING else self.status(line)
