"""CredentialWatcher: every trigger feeds one `reload(reason)`; consumers read one published state.

Triggers: inotify events (`dirwatch`) on the parent directories (symlink swaps, renames, Kubernetes ``..data``
swaps; where the watches go, and when they move, is wlidd.watch.directories), a periodic re-read, SIGHUP
(through the daemon), and re-reads just before and at the leaf's expiry. Change is decided by content
fingerprint, not by events. A valid new set is published by one assignment of an immutable
`IdentityState`; an invalid one is counted, logged with its reason, and the last good state stays.

Consumers either read `watcher.current` (the TLS server context does, per handshake) or iterate
`watcher.changes()` to be woken on every new state (the Workload API and token engine will).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from wlidd.clock import Clock, utc_now
from wlidd.errors import SvidError
from wlidd.logs import get_logger
from wlidd.metrics import Metrics
from wlidd.svid.load.files import RESOURCE_ERRNOS
from wlidd.svid.load.retry import load_identity
from wlidd.svid.load.source import CredentialSource
from wlidd.svid.model import Identity
from wlidd.tlsctx import TlsContexts
from wlidd.watch.directories import DirectoryWatches

log = get_logger("wlidd.watch")

PRE_EXPIRY_MARGIN = 30.0  # seconds before not_after to re-read once more
MAX_TIMER_SLEEP = 30.0  # wall clock is re-checked at least this often (suspend/resume)
INVALID_REREAD_INTERVAL = 30.0  # re-read at least this often while no valid SVID is loaded
RESOURCE_RETRY = 1.0  # seconds before a reload deferred for lack of descriptors or memory is tried again


@dataclass(frozen=True)
class IdentityState:
    """What consumers see: one validated identity with its matched TLS contexts."""

    name: str
    identity: Identity
    tls: TlsContexts
    version: int
    loaded_at: dt.datetime


@dataclass
class IdentityStats:
    """Counters and last outcomes for status; owned and written only by the watcher."""

    reloads: int = 0
    updates: int = 0
    rejections: int = 0
    last_loaded: dt.datetime | None = None
    last_checked: dt.datetime | None = None
    last_error: str | None = None  # why the files on disk are refused now; None once a read succeeds
    last_error_reason: str | None = None
    last_error_at: dt.datetime | None = None
    last_rejection: str | None = None  # the most recent refusal ever, kept as history
    last_rejection_reason: str | None = None
    last_rejection_at: dt.datetime | None = None
    retries: int = 0  # quiet re-reads of sets caught mid-write
    last_trigger: str | None = None
    warned: set[str] = field(default_factory=set)


class CredentialWatcher:
    """Keeps one identity's current validated state and publishes each new one."""

    def __init__(
        self,
        name: str,
        source: CredentialSource,
        *,
        clock: Clock = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.clock = clock
        self.metrics = metrics
        self.stats = IdentityStats()
        self.current: IdentityState | None = None
        self._lock = anyio.Lock()
        self._wake = anyio.Event()
        self._pending: str | None = None
        self._changed = anyio.Event()
        self._log = log.bind(identity=name)
        self._watches = DirectoryWatches(source, self.request_reload, self._log)
        self._task_group: anyio.abc.TaskGroup | None = None  # run()'s, for deferred retries

    # ---- consumers -------------------------------------------------------------------------
    def current_tls(self) -> TlsContexts | None:
        state = self.current
        return state.tls if state is not None else None

    def is_valid(self, now: dt.datetime | None = None) -> bool:
        state = self.current
        return state is not None and state.identity.svid.is_valid_at(now or self.clock())

    async def wait_for_change(self, after_version: int) -> IdentityState:
        """Return the first published state newer than `after_version`."""
        while self.current is None or self.current.version <= after_version:
            await self._changed.wait()
        return self.current

    async def changes(self) -> AsyncIterator[IdentityState]:
        """The current state (if any), then every newer one; slow consumers skip to the latest."""
        version = 0
        while True:
            state = await self.wait_for_change(version)
            version = state.version
            yield state

    # ---- triggers --------------------------------------------------------------------------
    def request_reload(self, reason: str) -> None:
        """Ask for a reload; triggers arriving while one runs coalesce into one more."""
        self._pending = self._pending or reason
        self._wake.set()

    async def _retry_sleep(self, delay: float) -> bool:
        """A set caught mid-write: wait the retry delay, but a new file event ends the wait early
        (True: the files changed again, so the next read proves nothing about a stable set)."""
        with anyio.move_on_after(delay):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = anyio.Event()
            self._pending = None
            return True
        return False

    async def reload(self, reason: str) -> bool:
        """Read, validate and (if changed) publish. True when a new state was published."""
        async with self._lock:
            return await self._reload(reason)

    # long: the one reload path: load, refuse or keep, publish; each outcome's counters and log lines beside it
    async def _reload(self, reason: str) -> bool:
        stats = self.stats
        stats.reloads += 1
        stats.last_trigger = reason

        def on_retry(attempt: int, exc: SvidError) -> None:
            stats.retries += 1
            self._count("retried")
            self._log.debug(
                "credential set incomplete, retrying", attempt=attempt, reason=exc.reason, detail=exc.message
            )

        current = self.current
        try:
            identity = await load_identity(
                self.source,
                now=self.clock,
                sleep=self._retry_sleep,
                on_retry=on_retry,
                current=current.identity if current is not None else None,
            )
            self._clear_error()
            if current is not None and current.identity.fingerprint == identity.fingerprint:
                stats.last_checked = self.clock()
                self._count("unchanged")
                self._log.debug("credentials unchanged", trigger=reason)
                return False
            tls = await anyio.to_thread.run_sync(TlsContexts.build, identity)
        except SvidError as exc:
            if exc.reason == "resources_exhausted":
                self._resources_exhausted(exc.message, reason)
                return False
            self._reject(exc.reason, exc.message, reason)
            return False
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                self._resources_exhausted(f"TLS context could not be built now: {exc.strerror}", reason)
                return False
            self._reject("tls_context_failed", f"TLS context could not be built: {exc}", reason)
            return False
        except ValueError as exc:  # OpenSSL refusing what we validated: keep the old state
            self._reject("tls_context_failed", f"TLS context could not be built: {exc}", reason)
            return False
        now = self.clock()
        version = (self.current.version if self.current else 0) + 1
        self.current = IdentityState(self.name, identity, tls, version, now)
        stats.updates += 1
        stats.last_loaded = stats.last_checked = now
        self._count("updated")
        svid = identity.svid
        if self.metrics is not None:
            self.metrics.identity_not_after.labels(self.name).set(svid.not_after.timestamp())
            self.metrics.identity_last_reload.labels(self.name).set(now.timestamp())
            self.metrics.identity_valid.labels(self.name).set(1)
        self._log.info(
            "credentials loaded",
            trigger=reason,
            spiffe_id=str(svid.spiffe_id),
            serial=svid.serial,
            not_after=svid.not_after.isoformat(),
            origin=identity.origin,
            version=version,
        )
        for note in (*svid.warnings, *identity.notes):
            if note not in stats.warned:
                stats.warned.add(note)
                self._log.warning(note)
        self._report_bundle_problems(current, identity)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        return True

    def _clear_error(self) -> None:
        """The files read well now: `last_error` describes the present, so it goes (history stays in
        `last_rejection`)."""
        stats = self.stats
        stats.last_error = stats.last_error_reason = stats.last_error_at = None

    def _report_bundle_problems(self, previous: IdentityState | None, identity: Identity) -> None:
        """Log each federated bundle problem once when it appears or changes, one line when it is
        solved, and keep `wlidd_trust_bundle_problem` to the domains broken now."""
        before = {p.trust_domain: p for p in previous.identity.bundle_problems} if previous is not None else {}
        now = {p.trust_domain: p for p in identity.bundle_problems}
        for td, problem in now.items():
            if before.get(td) != problem:
                self._log.warning(
                    "federated trust bundle refused; the last good copy is kept"
                    if problem.kept
                    else "federated trust bundle refused; no good copy was ever loaded, the domain is left out",
                    trust_domain=td,
                    reason=problem.reason,
                    detail=problem.message,
                )
            if self.metrics is not None:
                self.metrics.trust_bundle_problem.labels(self.name, td).set(1)
        for td in before.keys() - now.keys():
            self._log.info("federated trust bundle good again", trust_domain=td)
            if self.metrics is not None:
                with contextlib.suppress(KeyError):
                    self.metrics.trust_bundle_problem.remove(self.name, td)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.identity_reloads.labels(self.name, result).inc()

    def _resources_exhausted(self, message: str, trigger: str) -> None:
        """The process ran out of descriptors or memory (a local connection flood, say) while reloading:
        not the files' fault, so not a rejection. The last good state stays and the reload is tried
        again in RESOURCE_RETRY seconds (a rotation is not missed until the next periodic re-read)."""
        self._count("deferred")
        log.limited(
            "warning", "credential reload deferred: out of resources", key={"identity": self.name}, detail=message
        )
        if self._task_group is not None:
            self._task_group.start_soon(self._retry_later, trigger)

    async def _retry_later(self, trigger: str) -> None:
        await anyio.sleep(RESOURCE_RETRY)
        self.request_reload(f"{trigger}-retry")

    def _reject(self, reason_code: str, message: str, trigger: str) -> None:
        stats = self.stats
        stats.rejections += 1
        self._count("rejected")
        if self.metrics is not None:
            self.metrics.identity_rejections.labels(self.name, reason_code).inc()
            self.metrics.identity_valid.labels(self.name).set(1 if self.is_valid() else 0)
        kept = self.current.identity.svid.serial if self.current else None
        repeated = (stats.last_error_reason, stats.last_error) == (reason_code, message)
        at = self.clock()
        stats.last_checked = at  # a refused read is a read: the timer's next re-read counts from it
        stats.last_error, stats.last_error_reason, stats.last_error_at = message, reason_code, at
        stats.last_rejection, stats.last_rejection_reason, stats.last_rejection_at = message, reason_code, at
        # The same refusal again (every file event, every timer tick) is news only at debug level.
        emit = self._log.debug if repeated else self._log.warning
        emit("credential set rejected", reason=reason_code, detail=message, trigger=trigger, kept_serial=kept)
        if self.current is not None and not self.is_valid():
            self._log.error("identity has expired and no valid replacement is available", serial=kept)

    def close(self) -> None:
        """Stop the file watcher thread promptly (call before cancelling `run`)."""
        self._watches.close()

    # ---- the service -----------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch, initial load, then time and reload until cancelled. Started once loading was tried.

        The watches are in place before the first read, so a rotation during start-up is never missed."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            await tg.start(self._watches.run)
            await self.reload("start")
            tg.start_soon(self._timer)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                reason, self._pending = self._pending or "event", None
                await self.reload(reason)
                await self._watches.check()

    def next_timer_deadline(self, now: dt.datetime) -> tuple[dt.datetime, str]:
        """When the timer fires next, and why: periodic re-read, shortly before expiry, or at expiry."""
        interval = dt.timedelta(seconds=self.source.config.reload_interval)
        state = self.current
        if state is None or not state.identity.svid.is_valid_at(now):
            # Nothing valid to serve: do not wait the full interval for a missed event.
            interval = min(interval, dt.timedelta(seconds=INVALID_REREAD_INTERVAL))
        last = self.stats.last_checked or self.stats.last_loaded or now
        candidates = [(last + interval, "timer")]
        if state is not None:
            not_after = state.identity.svid.not_after
            pre = not_after - dt.timedelta(seconds=PRE_EXPIRY_MARGIN)
            if pre > now:
                candidates.append((pre, "pre-expiry"))
            elif not_after > now:
                candidates.append((not_after, "expiry"))
        return min(candidates)

    async def _timer(self) -> None:
        while True:
            now = self.clock()
            deadline, why = self.next_timer_deadline(now)
            wait = (deadline - now).total_seconds()
            if wait <= 0:
                if why == "expiry" and self.metrics is not None:
                    self.metrics.identity_valid.labels(self.name).set(0)
                self.request_reload(why)
                self.stats.last_checked = now
                await anyio.sleep(0.5)
                continue
            # Sleep in bounded steps: the monotonic clock stands still across a VM suspend.
            await anyio.sleep(min(wait, MAX_TIMER_SLEEP))
