"""`wlidd run --oneshot`: what the daemon does at start, once, then exit — for ExecStartPre=, init containers
and cron (as Vault Agent's `exit_after_auth`, spiffe-helper's `daemon_mode = false`, tbot's `oneshot`).

Built from the daemon's own parts: `wlidd.daemon.Daemon` constructs the watchers and token sources (nothing
is bound, started or inherited; it is given no listeners and an empty [policy], as it serves nobody: so
nothing is resolved or logged about callers), and then

1. every identity is read once, all at once (`CredentialWatcher.reload`: the same quiet retry while a set
   may be caught mid-write, bounded by the identity's `mismatch_retries` × `mismatch_retry_delay`, 15 s by
   default); each one loaded has its sinks brought up to date and their on_change and signal run
   (`wlidd.sinks.credentials.ensure_credentials`: a sink already current is left alone, its hooks not run);
2. every token is fetched once, all at once (`TokenSource.refresh`: one attempt, each HTTP request bounded
   by the source's `timeout`; no backoff, no Retry-After wait, no start_delay); each one fetched has its
   sinks written and their on_change run (`wlidd.sinks.tokens.publish_token`, called here once `refresh` returned:
   a token source publishes tokens and writes no file itself; the daemon's follower task is not run).

Nothing is retried past that, so a run is bounded in time whatever the upstreams answer. One failure does
not stop the others; the result names each one (`Failure`): `identity X: <reason>: <detail>`, `token Y:
<reason>: <detail>` (a token whose identity failed says so), `sink PATH (identity X | token Y): <error>`.
The sink layer logs a write it could not do and never raises it; those failures are read from its record of
failing sinks (`wlidd.sinks.failing_sinks`, which `/v1/status` and the metrics show too). A hook that fails (an on_change
command, a signal) is logged as by the daemon and does not fail the run: the files are in place, and at
ExecStartPre= or init time the program a hook reloads is usually not running yet.

No sd_notify at all: a Type=oneshot unit expects no READY=1 (it is up when the process exits), and a
READY=1 sent from ExecStartPre= of a Type=notify service could be taken for that service's own readiness
(NotifyAccess=exec or all) or refused with a journal line (main). No STATUS=, no watchdog, no socket
activation fds taken (they belong to the service).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from wlidd.clock import Clock, utc_now
from wlidd.config import AccessRule, Config, ListenersConfig, PolicyConfig
from wlidd.daemon import Daemon
from wlidd.errors import UpstreamError
from wlidd.logs import get_logger
from wlidd.sinks.credentials import ensure_credentials
from wlidd.sinks.problems import failing_sinks
from wlidd.sinks.tokens import publish_token
from wlidd.tokens.manager import TokenSource
from wlidd.watch import CredentialWatcher

log = get_logger("wlidd.oneshot")


@dataclass(frozen=True)
class Failure:
    """One thing a one-shot run could not do: `what` ("identity web", "token gcp", "sink /run/x (token
    gcp)") and why (no secret: reasons and messages of WlidErrors and the sink layer's errors)."""

    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass(frozen=True)
class OneshotResult:
    """What a one-shot run did: the identities loaded and tokens fetched (names), and every failure."""

    identities: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    failures: tuple[Failure, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures


def _identity_failure(watcher: CredentialWatcher) -> Failure:
    stats = watcher.stats
    if stats.last_error is not None:
        return Failure(f"identity {watcher.name}", f"{stats.last_error_reason}: {stats.last_error}")
    return Failure(
        f"identity {watcher.name}", "no valid credentials loaded (out of descriptors or memory: see the log)"
    )


def _sink_failures(daemon: Daemon, loaded: list[str], fetched: list[str]) -> list[Failure]:
    """The sinks of the identities loaded and tokens fetched whose write failed in this run (each of their
    sinks was written or checked in it, so their entries in the record are this run's)."""
    places = {
        ("identity", name, str(sink.dir)) for name in loaded for sink in daemon.watchers[name].source.config.sinks
    }
    places |= {("token", name, str(sink.path)) for name in fetched for sink in daemon.tokens[name].config.sinks}
    return [
        Failure(f"sink {problem.place} ({problem.kind} {problem.owner})", problem.error)
        for problem in failing_sinks().now()
        if (problem.kind, problem.owner, problem.place) in places
    ]


# long: the one-shot run in order: identities, tokens, sinks, then the result
async def run_oneshot(
    config: Config, *, environ: Mapping[str, str] | None = None, clock: Clock = utc_now
) -> OneshotResult:
    """Load every identity, fetch every token, write every sink and run its hooks, once (see the module
    docstring). A failure of one of them is not raised: it is in the result, beside the others."""
    serves_nobody = PolicyConfig(tokens=AccessRule(), credentials=AccessRule())
    daemon = Daemon(
        config.model_copy(update={"listeners": ListenersConfig(), "policy": serves_nobody}),
        environ=environ,
        clock=clock,
    )
    log.info("one-shot run starting", identities=sorted(daemon.watchers), sources=list(daemon.tokens))
    failures: list[Failure] = []
    loaded: list[str] = []
    fetched: list[str] = []

    async def load(watcher: CredentialWatcher) -> None:
        await watcher.reload("oneshot")
        if watcher.current is None:
            failures.append(_identity_failure(watcher))
            return
        loaded.append(watcher.name)
        await ensure_credentials(watcher)

    async def fetch(source: TokenSource) -> None:
        try:
            token = await source.refresh("oneshot")
        except UpstreamError as exc:
            failures.append(Failure(f"token {source.name}", f"{exc.reason}: {exc.message}"))
            return
        fetched.append(source.name)
        await publish_token(source.config.sinks, token, clock(), source.name)

    try:
        async with anyio.create_task_group() as tg:
            for watcher in daemon.watchers.values():
                tg.start_soon(load, watcher)
        async with anyio.create_task_group() as tg:  # after the identities: x509-sts and entra-sts need them
            for source in daemon.tokens.values():
                tg.start_soon(fetch, source)
    finally:
        with anyio.CancelScope(shield=True):
            for source in daemon.tokens.values():
                await source.flow.aclose()
        for watcher in daemon.watchers.values():
            watcher.close()
    result = OneshotResult(
        identities=tuple(sorted(loaded)),
        tokens=tuple(sorted(fetched)),
        failures=(*sorted(failures, key=str), *_sink_failures(daemon, loaded, fetched)),
    )
    if result.ok:
        log.info("one-shot run done", identities=list(result.identities), sources=list(result.tokens))
    else:
        log.error(
            "one-shot run failed",
            failed=[str(failure) for failure in result.failures],
            identities=list(result.identities),
            sources=list(result.tokens),
        )
    return result
