"""wlidd.api.callers.CallerCache: a peer's credentials to a wlidd.policy.Caller, cached as records on an
injected clock; the NSS resolution (`unix_caller`) replaced by a counting fake, so no socket and no lookup."""

from __future__ import annotations

import pytest

from wlidd.api import callers
from wlidd.api.callers import CachedCaller, CachedName, CallerCache, Credentials
from wlidd.api.peers import Peer
from wlidd.policy import Caller
from wlidd.svid.spiffeid import parse_spiffe_id


class Clock:
    """A monotonic clock the test moves (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Every NSS resolution the cache asks for, answered without NSS (user `u<uid>`, groups {gid, 7000})."""
    calls: list[tuple[object, ...]] = []

    def fake(pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
        calls.append((pid, uid, gid, groups))
        primary = uid if gid is None else gid
        found = groups | {primary} if groups is not None else frozenset({primary, 7000})
        return Caller(uid=uid, gid=primary, pid=pid, groups=found, user=f"u{uid}")

    monkeypatch.setattr(callers, "unix_caller", fake)
    return calls


async def test_a_kernel_caller_is_resolved_once_per_ttl_and_kept_as_records(resolved: list[tuple[object, ...]]) -> None:
    clock = Clock()
    cache = CallerCache(ttl=60.0, clock=clock)
    first = await cache.get(42, 1000, 1000, frozenset({2000}))
    assert first == Caller(uid=1000, gid=1000, pid=42, groups=frozenset({1000, 2000}), user="u1000")
    assert await cache.get(42, 1000, 1000, frozenset({2000})) == first and len(resolved) == 1
    key = Credentials(42, 1000, 1000, frozenset({2000}))
    assert cache._callers[key] == CachedCaller(160.0, first)
    assert cache._names[1000] == CachedName(160.0, "u1000")
    clock.now = 160.5  # past the ttl: resolved again
    await cache.get(42, 1000, 1000, frozenset({2000}))
    assert len(resolved) == 2


async def test_a_tcp_caller_gets_nss_groups_keyed_by_uid_and_gid_whatever_its_pid(
    resolved: list[tuple[object, ...]],
) -> None:
    cache = CallerCache(clock=Clock())
    one = await cache.get(None, 1001, None)
    other_process = await cache.get(7, 1001, None)
    assert one.groups == other_process.groups == {1001, 7000} and (one.pid, other_process.pid) == (None, 7)
    assert len(resolved) == 1  # one NSS resolution for the uid
    assert set(cache._nss) == {Credentials(None, 1001, None, None)}


async def test_caller_of_names_an_mtls_peer_by_its_spiffe_id_without_a_lookup(
    resolved: list[tuple[object, ...]],
) -> None:
    cache = CallerCache(clock=Clock())
    mtls = await cache.caller_of(Peer(address="127.0.0.1:5000", spiffe_id="spiffe://example.org/ci"))
    assert mtls == Caller(spiffe_id=parse_spiffe_id("spiffe://example.org/ci"), address="127.0.0.1:5000")
    anonymous = await cache.caller_of(Peer(address="10.1.2.3:4"))
    assert anonymous == Caller(address="10.1.2.3:4") and not anonymous.local
    assert resolved == []
    unix = await cache.caller_of(Peer(uid=5, gid=6, pid=7, groups=frozenset({8})))
    assert (unix.uid, unix.gid, unix.pid, unix.groups, unix.local) == (5, 6, 7, {6, 8}, True)
