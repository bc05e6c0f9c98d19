"""One health decision, read by everything that reports it: /v1/health, /v1/status's daemon state, the
STATUS= line, the watchdog's liveness and the metrics.

`health(now, …)` is a pure function over the published states (each identity's current set, each token
source's current token, each accept loop's liveness) and the lifecycle state; it reads, never waits or
writes. What it decides:
  - problems: what makes the daemon unhealthy — a required identity without a valid SVID now, a
    `require_at_start` token not servable now, a listener whose accept loop stopped
    ({"identity/<name>" | "token/<name>" | "listener/<name>": why});
  - state: "starting" until READY=1, then "degraded" with any problem, else "running";
  - live: no accept loop stopped (the watchdog adds the event loop's own lag: it is the one measuring it);
  - not valid: every identity and every token that is kept fresh (not `on_demand`) without a valid value
    now, and every stopped accept loop — what the STATUS= line names, also when it is not a problem.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from wlidd.clock import iso_z
from wlidd.lifecycle import State
from wlidd.status import DaemonState, WaitingFor, to_json
from wlidd.watch import CredentialWatcher

if TYPE_CHECKING:  # the token machinery (httpx, PyJWT) is imported only when a config names a token
    from wlidd.tokens.manager import TokenSource


class Listener(Protocol):
    """An accept loop's liveness (wlidd.api.accept.AcceptLoop)."""

    name: str
    alive: bool
    failure: str | None


def identity_problem(watcher: CredentialWatcher, now: dt.datetime) -> str | None:
    """Why `watcher` has no SVID valid at `now` to serve, or None when it has one."""
    state = watcher.current
    if state is None:
        last = watcher.stats.last_error
        return f"no valid SVID loaded yet{': ' + last if last else ''}"
    svid = state.identity.svid
    if not svid.is_valid_at(now):
        return f"SVID {svid.serial} is outside its validity window (not_after {iso_z(svid.not_after)})"
    return None


@dataclasses.dataclass(frozen=True)
class Health:
    """The daemon's health at one instant (see the module docstring)."""

    lifecycle: State
    identities: Mapping[str, str | None]  # every identity: why it is not valid now, None when valid
    tokens: Mapping[str, str | None]  # every token source: why it is not servable now, None when servable
    problems: Mapping[str, str]  # "identity/<n>", "token/<n>", "listener/<n>" → why (module docstring)
    not_valid: tuple[str, ...]  # "identity <n>", "token <n>", "listener <n> (accept loop stopped)"
    waiting_for: WaitingFor | None  # while starting: the identities loading, the required tokens not had

    @property
    def state(self) -> DaemonState:
        if self.lifecycle is State.STARTING:
            return "starting"
        return "degraded" if self.problems else "running"

    @property
    def serving(self) -> State:
        """The lifecycle state this health makes a started daemon: ready, or degraded with problems."""
        return State.DEGRADED if self.problems else State.READY

    @property
    def liveness_problems(self) -> dict[str, str]:
        """{"listener/<name>": why} for every stopped accept loop."""
        return {key: why for key, why in self.problems.items() if key.startswith("listener/")}

    @property
    def live(self) -> bool:
        return not self.liveness_problems

    def status_line(self) -> str:
        """The STATUS= text: while starting, what the start waits for; then "serving N identities, M tokens"
        (with "; not valid: …" naming what is not valid but no problem), or "degraded (…): not valid: …"."""
        if self.lifecycle is State.STARTING:
            waiting = self.waiting_for or WaitingFor()
            parts = [f"identity {n} (first load)" for n in waiting.identities]
            parts += [f"token {n} (required at start)" for n in waiting.tokens]
            return "starting: waiting for " + ", ".join(parts) if parts else "starting"
        return self.serving_line()

    def serving_line(self) -> str:
        """The STATUS= text of a started daemon (what READY=1 carries at the end of a start or reload)."""
        head = f"{len(self.identities)} identities, {len(self.tokens)} tokens"
        if self.problems:
            return f"degraded ({head}): not valid: {', '.join(self.not_valid)}"
        return f"serving {head}; not valid: {', '.join(self.not_valid)}" if self.not_valid else f"serving {head}"

    def answer(self) -> tuple[int, dict[str, Any]]:
        """/v1/health: (HTTP status, JSON document). 503 "starting" until READY=1 (never "ok" before, even
        if what is loaded so far is good), 503 "unhealthy" with the problems, else 200 "ok"."""
        if self.lifecycle is State.STARTING:
            return 503, {
                "status": "starting",
                "waiting_for": to_json(self.waiting_for),
                "problems": dict(self.problems),
            }
        if self.problems:
            return 503, {"status": "unhealthy", "problems": dict(self.problems)}
        return 200, {"status": "ok"}


def health(
    now: dt.datetime,
    lifecycle: State,
    watchers: Mapping[str, CredentialWatcher],
    tokens: Mapping[str, TokenSource],
    listeners: Iterable[Listener],
    *,
    loading: Collection[str] = (),
    awaiting: Collection[str] = (),
) -> Health:
    """The daemon's health at `now`. `loading`: identities whose first load has not ended; `awaiting`:
    `require_at_start` tokens the start has not had yet (both only matter while `lifecycle` is starting)."""
    identities = {name: identity_problem(watcher, now) for name, watcher in watchers.items()}
    servable = {name: source.servable(now) is not None for name, source in tokens.items()}
    token_reasons = {name: None if ok else tokens[name].not_servable_reason(now) for name, ok in servable.items()}
    dead = {loop.name: f"accept loop stopped: {loop.failure or 'not running'}" for loop in listeners if not loop.alive}
    problems: dict[str, str] = {
        f"identity/{name}": why
        for name, why in sorted(identities.items())
        if why is not None and watchers[name].source.config.required
    }
    problems.update(
        {
            f"token/{name}": why
            for name, why in token_reasons.items()
            if why is not None and tokens[name].config.require_at_start
        }
    )
    problems.update({f"listener/{name}": why for name, why in dead.items()})
    not_valid = [f"identity {name}" for name, why in identities.items() if why is not None]
    not_valid += [f"token {name}" for name, ok in servable.items() if not ok and not tokens[name].config.on_demand]
    not_valid += [f"listener {name} (accept loop stopped)" for name in dead]
    waiting = None
    if lifecycle is State.STARTING:
        waiting = WaitingFor(
            identities=tuple(sorted(loading)),
            tokens=tuple(name for name in tokens if name in awaiting and not servable[name]),
        )
    return Health(lifecycle, identities, token_reasons, problems, tuple(not_valid), waiting)
