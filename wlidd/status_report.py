"""The /v1/status document (wlidd.status) made from the published states, at one instant `now`.

Each part reads what its owner publishes and writes nothing: an identity's watcher (its current set and
its stats), a token source (its current token, schedule and last error), the record of failing sinks
(wlidd.sinks.problems), and the daemon's `Health` (wlidd.health: its state and what a start waits for).
The listeners' and the Workload API's parts are the edges' own (wlidd.api.listener_set), passed in.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from wlidd import __version__
from wlidd.health import Health
from wlidd.sinks.problems import failing_sinks
from wlidd.status import (
    BundleTrouble,
    DaemonStatus,
    FailingSink,
    IdentityStatus,
    ListenerStatus,
    Outcome,
    Status,
    TokenStatus,
    UpstreamFailure,
    WaitingFor,
    WorkloadApiStatus,
)
from wlidd.watch import CredentialWatcher

if TYPE_CHECKING:  # the token machinery (httpx, PyJWT) is imported only when a config names a token
    from wlidd.tokens.manager import TokenSource
    from wlidd.tokens.source import RefreshingSource


def identity_status(watcher: CredentialWatcher, now: dt.datetime) -> IdentityStatus:
    """One identity at `now`: what is loaded, how fresh, what went wrong last."""
    stats = watcher.stats
    state = watcher.current
    last_error = last_rejection = None
    if stats.last_error is not None:
        last_error = Outcome(stats.last_error_reason, stats.last_error, stats.last_error_at)
    if stats.last_rejection is not None:
        last_rejection = Outcome(stats.last_rejection_reason, stats.last_rejection, stats.last_rejection_at)
    common = IdentityStatus(
        source=watcher.source.config.source,
        path=watcher.source.describe(),
        valid=watcher.is_valid(now),
        required=watcher.source.config.required,
        spiffe_id=None,
        serial=None,
        not_before=None,
        not_after=None,
        seconds_left=None,
        trust_domains=(),
        last_loaded=stats.last_loaded,
        last_checked=stats.last_checked,
        last_error=last_error,
        last_rejection=last_rejection,
        bundle_problems=(),
        reloads=stats.reloads,
        retries=stats.retries,
        updates=stats.updates,
        rejections=stats.rejections,
        warnings=tuple(sorted(stats.warned)),
    )
    if state is None:
        return common
    svid = state.identity.svid
    return dataclasses.replace(
        common,
        spiffe_id=str(svid.spiffe_id),
        serial=svid.serial,
        not_before=svid.not_before,
        not_after=svid.not_after,
        seconds_left=max(0, int(svid.seconds_left(now))),
        trust_domains=tuple(state.identity.bundles.trust_domains),
        origin=state.identity.origin,
        version=state.version,
        bundle_problems=tuple(
            BundleTrouble(p.trust_domain, p.reason, p.message, p.kept) for p in state.identity.bundle_problems
        ),
    )


def token_status(source: RefreshingSource, now: dt.datetime) -> TokenStatus:
    """One token source at `now`: its flow, whether its token is servable, its schedule, its last error."""
    token = source.current
    error = source.last_error
    return TokenStatus(
        flow=source.config.flow,
        identity=source.config.identity,
        valid=source.servable(now) is not None,
        required=source.config.require_at_start,
        on_demand=source.config.on_demand,
        expire_time=token.expire_time if token else None,
        seconds_left=max(0, int(token.seconds_left(now))) if token else None,
        last_refresh=source.last_refresh,
        next_refresh=source.next_refresh,
        failures=source.failures,
        upstream_calls=source.upstream_calls,
        last_error=(
            UpstreamFailure(error.reason, error.status, error.message, error.permanent, source.last_error_at)
            if error
            else None
        ),
    )


def sink_problems(identities: Mapping[str, object], tokens: Mapping[str, object]) -> dict[str, FailingSink]:
    """{place: FailingSink} for the sinks of these identities and token sources (by name) whose last write
    failed (their files keep the last good content)."""
    owners = {("identity", name) for name in identities} | {("token", name) for name in tokens}
    return {
        problem.place: FailingSink(problem.kind, problem.owner, problem.error)
        for problem in failing_sinks().now()
        if (problem.kind, problem.owner) in owners
    }


def daemon_status(health: Health, started_at: dt.datetime, now: dt.datetime) -> DaemonStatus:
    """The process at `now`: its state and what a start still waits for (wlidd.health), version, pid, times."""
    return DaemonStatus(
        state=health.state,
        waiting_for=health.waiting_for or WaitingFor(),
        version=__version__,
        pid=os.getpid(),
        started_at=started_at,
        uptime_seconds=int((now - started_at).total_seconds()),
        now=now,
    )


def status_of(
    now: dt.datetime,
    health: Health,
    started_at: dt.datetime,
    watchers: Mapping[str, CredentialWatcher],
    tokens: Mapping[str, TokenSource],
    listeners: Mapping[str, ListenerStatus],
    workload_api: WorkloadApiStatus | None,
) -> Status:
    """The whole /v1/status document at `now` (identities sorted by name, tokens in their config's order)."""
    return Status(
        daemon=daemon_status(health, started_at, now),
        identities={name: identity_status(w, now) for name, w in sorted(watchers.items())},
        tokens={name: token_status(source, now) for name, source in tokens.items()},
        listeners=listeners,
        sink_problems=sink_problems(watchers, tokens),
        workload_api=workload_api,
    )
