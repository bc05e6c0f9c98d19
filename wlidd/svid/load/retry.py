"""The mid-write retry policy: `load_identity` reads and validates one identity's set, retrying quietly while
its writer may be half-way through (see `load_identity`), with an injectable sleep and clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio.to_thread

from wlidd.clock import Clock, utc_now
from wlidd.errors import SvidError
from wlidd.svid.credential_set import build_identity
from wlidd.svid.load.source import CredentialSource
from wlidd.svid.model import Identity

MAX_READS_PER_ATTEMPT = 25  # reads woken early by file events, per configured attempt, before a refusal stands

NOT_MID_WRITE = frozenset({"file_is_directory", "file_not_regular", "resources_exhausted"})
"""Refusals no writer produces by being caught half-way (a directory, the process out of descriptors):
reported at once. Every other refusal may be a set caught mid-write and is retried — a file that is
briefly unreadable too (`install -m 0644` creates it 0600 and chmods it after the copy)."""

Sleep = Callable[[float], Awaitable[bool | None]]


# long: the mid-write retry policy: its docstring and its one loop (settle window, read caps) together
async def load_identity(
    source: CredentialSource,
    *,
    now: Clock = utc_now,
    sleep: Sleep = anyio.sleep,
    attempts: int | None = None,
    delay: float | None = None,
    on_retry: Callable[[int, SvidError], None] | None = None,
    current: Identity | None = None,
) -> Identity:
    """Read and validate, retrying quietly while the set may be caught mid-write.

    A writer that truncates and rewrites, renames files in one at a time or swaps links leaves a set
    that is briefly missing a file, damaged (half a PEM), mixed (a key not matching the leaf, a chain
    from another generation) or re-pointed while read. Every refusal but those in NOT_MID_WRITE is
    therefore retried for up to (`attempts` - 1) × `delay` seconds (config `mismatch_retries`,
    `mismatch_retry_delay`: 15 s by default), read again after each `delay` or at the next file event
    if that comes first; a set with federated bundle problems is retried the same way before it is
    accepted with them. Retrying stops early, and the refusal stands, once the same content has failed
    the same way for a full `delay`: the files are as their writer means them to be.

    `sleep(seconds)` may return True when it was cut short by a file event; only the time that really
    passed then counts, so unrelated events in a watched directory cannot use up the retries (reads are
    capped at MAX_READS_PER_ATTEMPT × `attempts` all the same). File reads and crypto run in a worker
    thread; the event loop never blocks on them. Raises SvidError (the last refusal).

    `current` is the identity served now: its federated bundles are kept for domains whose bundle broke,
    files with its fingerprint are not parsed again while it is valid (it is returned as is: events in a
    busy directory cost a read, not a validation), and federated problems it already has are accepted
    at once (only a new problem may be a bundle caught mid-write).
    """
    attempts = attempts if attempts is not None else source.config.mismatch_retries
    delay = delay if delay is not None else source.config.mismatch_retry_delay
    trust_domain = source.config.trust_domain

    previous = current.bundles if current is not None else None
    known_problems = {(p.trust_domain, p.reason) for p in current.bundle_problems} if current is not None else set()

    def attempt_once() -> tuple[Identity | None, SvidError | None, str]:
        try:
            files = source.read()
        except SvidError as exc:
            return None, exc, f"{exc.reason}\0{exc.message}"
        fingerprint = files.fingerprint()
        if current is not None and current.fingerprint == fingerprint and current.svid.is_valid_at(now()):
            return current, None, ""
        try:
            identity = build_identity(files, now(), trust_domain=trust_domain, previous=previous)
        except SvidError as exc:
            return None, exc, f"{exc.reason}\0{fingerprint}"
        return identity, None, f"bundles\0{fingerprint}"

    window = (attempts - 1) * delay  # how long a set may take to settle
    waited = waited_same = 0.0  # seconds since the first refusal; since this content was first read
    previous_key: str | None = None
    for attempt in range(1, attempts * MAX_READS_PER_ATTEMPT + 1):
        identity, error, key = await anyio.to_thread.run_sync(attempt_once)
        if identity is not None and {(p.trust_domain, p.reason) for p in identity.bundle_problems} <= known_problems:
            return identity
        if key != previous_key:
            waited_same = 0.0
        settled = (
            waited >= window
            or waited_same >= delay
            or attempt == attempts * MAX_READS_PER_ATTEMPT
            or (error is not None and error.reason in NOT_MID_WRITE)
        )
        if settled:
            if error is not None:
                raise error
            assert identity is not None
            return identity
        if on_retry is not None:
            if error is None:
                assert identity is not None
                first = identity.bundle_problems[0]
                error = SvidError(first.reason, f"bundle of {first.trust_domain}: {first.message}")
            on_retry(attempt, error)
        started = anyio.current_time()
        woken = await sleep(min(delay, window - waited))
        slept = min(delay, window - waited) if not woken else anyio.current_time() - started
        waited += slept
        waited_same += slept
        previous_key = key
    raise AssertionError("unreachable")
