"""What SDS holds and writes for its clients, bounded: the request budget (wlidd.workload_api.sds_budget), the
reading of requests (a half-sent one is not held: wlidd.workload_api.calls), pushes that wait for room, client
text in log lines, and the listener's `max_calls_per_caller`.

Unit tests drive the pieces without a socket (a stand-in for grpclib's reading side, a budget of a few
bytes); the rest run a daemon, with Envoy's side played by tests.sds_envoy or a raw HTTP/2 client as nobody.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import h2.settings
import pytest
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.conftest import FileSet, in_background, wait_until
from tests.test_hostile_workload_api import DaemonProcess, RawGrpc
from tests.test_sds import envoy, make_daemon, socket_of
from tests.test_sds_breaker import NOBODY, SDS, SECRET, connect_as, grpc_frame
from wlidd.config import Config, PolicyConfig
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.logs import RepeatLimiter, configure_logging, reset_logging, use_repeat_limiter
from wlidd.policy import Caller, Policy
from wlidd.workload_api import sds_service
from wlidd.workload_api.calls import read_message
from wlidd.workload_api.sds import NodeFacts
from wlidd.workload_api.sds_budget import RequestBudget
from wlidd.workload_api.sds_protocol import MAX_ERROR_TEXT, Received
from wlidd.workload_api.sds_service import SecretDiscovery
from wlidd.workload_api.sds_stream import LOGGED_NONCE_LENGTH, log_received

# ---- the budget -----------------------------------------------------------------------------------------


async def test_a_read_waits_until_its_callers_budget_has_room_and_goes_on_when_another_call_shrinks() -> None:
    budget = RequestBudget(per_caller=100, total=1000)
    big, reader = budget.share(1), budget.share(1)
    big.set_state(80)
    read: list[int] = []

    async def read_one() -> None:
        async with reader.reading(50):
            read.append(budget.by_caller[1])

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_one)
        await anyio.wait_all_tasks_blocked()
        assert read == [] and budget.by_caller == {1: 80}  # 80 + 50 is over 100: it waits, holding nothing
        big.set_state(40)
    assert read == [90] and budget.by_caller == {1: 40} and budget.used == 40


async def test_one_caller_over_its_budget_holds_up_no_other_until_the_total_is_full() -> None:
    budget = RequestBudget(per_caller=100, total=150)
    budget.share(1).set_state(100)
    async with budget.share(2).reading(50):  # caller 2's room: its own 100, and 50 left of the total
        assert budget.used == 150
    third = budget.share(3)
    with anyio.move_on_after(0.05) as waited:
        async with third.reading(60):
            pass
    assert waited.cancelled_caught and budget.by_caller == {1: 100}  # the total is full: caller 3 waits


async def test_a_share_releases_everything_when_its_call_ends() -> None:
    budget = RequestBudget(per_caller=100, total=150)
    share = budget.share("uid")
    share.set_state(30)
    with share.sending(20):
        assert budget.by_caller == {"uid": 50}
    share.close()
    assert budget.used == 0 and budget.by_caller == {}


def test_a_budget_refuses_a_total_below_its_per_caller_share() -> None:
    with pytest.raises(ValueError, match="per_caller <= total"):
        RequestBudget(per_caller=10, total=5)


def test_one_call_fits_an_empty_budget_whatever_it_holds() -> None:
    """A call never waits on itself: its largest state, request and push (a DeltaSecrets answer naming back
    MAX_REMOVED_BYTES of names, charged four times) fit an empty per-caller budget."""
    from wlidd.workload_api.sds_budget import PER_CALLER_BYTES, TOTAL_BYTES
    from wlidd.workload_api.sds_delta import MAX_REMOVED_BYTES
    from wlidd.workload_api.sds_protocol import MAX_STATE_BYTES

    largest = MAX_STATE_BYTES + sds_service.MAX_SDS_REQUEST_BYTES + 4 * (MAX_REMOVED_BYTES + 2**16)
    assert largest < PER_CALLER_BYTES <= TOTAL_BYTES


# ---- reading a request ----------------------------------------------------------------------------------


class Connection:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class Reading:
    """grpclib.protocol.Stream's reading side as read_message uses it: `recv_data(n)` returns n bytes once
    they came, b"" at the client's end, AssertionError for a message cut short by it; `consumed` counts
    what was taken."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False
        self.consumed = 0
        self.connection = Connection()
        self._more = anyio.Event()

    def feed(self, data: bytes = b"", *, end: bool = False) -> None:
        self.buffer += data
        self.ended = self.ended or end
        self._more.set()
        self._more = anyio.Event()

    async def recv_data(self, size: int) -> bytes:
        while len(self.buffer) < size and not self.ended:
            if self.connection.closing:
                raise AttributeError("'Connection' object has no attribute '_transport'")  # as grpclib does
            await self._more.wait()
        if self.ended and not self.buffer:
            return b""
        if len(self.buffer) < size:
            raise AssertionError("Received less data than expected")
        data, self.buffer = bytes(self.buffer[:size]), self.buffer[size:]
        self.consumed += size
        return data


class Call:
    def __init__(self) -> None:
        self._stream = Reading()


def message(*names: str) -> bytes:
    return grpc_frame(discovery_pb2.DiscoveryRequest(type_url=SECRET, resource_names=list(names)))


PARSE = discovery_pb2.DiscoveryRequest.FromString


async def test_a_request_left_half_sent_after_its_first_byte_ends_the_call() -> None:
    for sent in (message("default")[:1], message("default")[:8]):  # in its prefix, then in its body
        call = Call()
        call._stream.feed(sent)
        with anyio.fail_after(5), pytest.raises(GRPCError) as refused:
            await read_message(call, PARSE, limit=2**20, timeout=None, rest_timeout=0.05)  # type: ignore[arg-type]
        assert refused.value.status == Status.DEADLINE_EXCEEDED and "half-sent for 0.05 s" in str(refused.value)


async def test_a_call_may_stay_idle_between_requests_as_long_as_it_likes() -> None:
    call = Call()
    with anyio.move_on_after(0.2) as idle:
        await read_message(call, PARSE, limit=2**20, timeout=None, rest_timeout=0.01)  # type: ignore[arg-type]
    assert idle.cancelled_caught
    call._stream.feed(message("ROOTCA"))
    with anyio.fail_after(5):
        request = await read_message(call, PARSE, limit=2**20, timeout=None, rest_timeout=0.01)  # type: ignore
    assert list(request.resource_names) == ["ROOTCA"]


async def test_a_body_is_read_only_once_there_is_room_for_its_declared_size() -> None:
    call, room_made, asked = Call(), anyio.Event(), []

    @asynccontextmanager
    async def room(length: int) -> AsyncIterator[None]:
        asked.append(length)
        await room_made.wait()
        yield

    whole = message("default")
    call._stream.feed(whole)
    async with anyio.create_task_group() as tg:
        got: list[Any] = []

        async def read() -> None:
            pending = read_message(call, PARSE, limit=2**20, timeout=None, rest_timeout=0.01, room=room)  # type: ignore
            got.append(await pending)

        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(0.05)  # longer than rest_timeout: waiting for room is not the client's delay
        assert asked == [len(whole) - 5] and call._stream.consumed == 5  # the prefix only
        room_made.set()
    assert list(got[0].resource_names) == ["default"]


async def test_a_connection_lost_while_a_request_is_read_ends_the_call_without_a_traceback() -> None:
    call = Call()
    call._stream.feed(message("default")[:8])
    call._stream.connection.closing = True
    with anyio.fail_after(5), pytest.raises(GRPCError) as ended:
        await read_message(call, PARSE, limit=2**20, timeout=None)  # type: ignore[arg-type]
    assert ended.value.status == Status.UNAVAILABLE


# ---- client text in log lines ---------------------------------------------------------------------------


@contextmanager
def json_logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    use_repeat_limiter(RepeatLimiter(burst=3, window=60.0))
    try:
        yield out
    finally:
        configure_logging("info", "console")
        reset_logging()


def test_every_client_chosen_field_of_an_sds_log_line_is_cut_and_repeats_are_counted() -> None:
    caller = Caller(uid=4242, gid=4242, pid=1, user="app")
    node = NodeFacts(id="i" * 256, cluster="c" * 256)
    names = tuple(f"spiffe://example.org/{i}/" + "x" * 2000 for i in range(1000))
    stale = Received(names, stale=True, error="e" * MAX_ERROR_TEXT, nonce="n" * 300_000, expected="n1")
    with json_logs() as out:
        for _ in range(10):
            log_received(stale, caller, "StreamSecrets", node)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 6, lines  # 3 of each of the two events, then counted
    for line in lines:
        assert len(json.dumps(line)) < 8192
        assert len(line["nonce"]) <= LOGGED_NONCE_LENGTH + 40 and line["node"] == "i" * 256
    [rejected, *_] = [line for line in lines if line["event"] == "Envoy rejected the secrets sent"]
    assert len(rejected["resources"]) == 11 and rejected["resources"][-1] == "... 990 more"


# ---- pushes that wait for room -----------------------------------------------------------------------------


@pytest.fixture
async def daemon(tmp_path: Path, files: FileSet, ca: CertificateAuthority) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = make_daemon(tmp_path / "workload.sock", {"default": files.config()})
    async with in_background(d.run, d.stop):
        yield d


def sds_of(d: Daemon) -> SecretDiscovery:
    assert d.workload_api is not None and d.workload_api.sds is not None
    return d.workload_api.sds


def fill(d: Daemon) -> Any:
    """A small budget whose caller (root) has room for a request, not for a push; the share holding it."""
    budget = sds_of(d).budget = RequestBudget(per_caller=2**20, total=2**22)
    hog = budget.share(os.getuid())
    hog.set_state(2**20 - 4096)
    return hog


async def test_a_push_with_no_room_waits_and_a_reload_meanwhile_ends_the_call_without_the_keys(daemon: Daemon) -> None:
    hog = fill(daemon)
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        built = hog.state + 1024  # the stream's state is a few hundred bytes; the push as built, a few KB
        await wait_until(lambda: sds_of(daemon).budget.used > built, what="the push built, waiting for room")
        assert daemon.workload_api is not None
        daemon.workload_api.set_policy(
            Policy.from_config(PolicyConfig.model_validate({"credentials": {"users": ["nobody"]}}))
        )
        hog.close()
        end = await client.next("s")
        assert end["event"] == "end" and end["code"] == "PERMISSION_DENIED", end
    assert sds_of(daemon).pushes == 0


async def test_a_push_that_finds_no_room_in_time_ends_the_call(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sds_service, "ROOM_TIMEOUT", 0.2)
    fill(daemon)
    async with envoy(socket_of(daemon)) as client:
        await client("open", "s", kind="sotw")
        await client("send", "s", names=["default"])
        end = await client.next("s")
        assert end["event"] == "end" and end["code"] == "DEADLINE_EXCEEDED" and "no room for a push" in end["details"]


# ---- the listener's cap on open calls ----------------------------------------------------------------------


async def test_max_calls_per_caller_caps_a_uids_open_calls_sds_included(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    socket = tmp_path / "workload.sock"
    config = Config.model_validate(
        {
            "identities": {"default": files.config()},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "workload_api": {"path": str(socket), "max_calls_per_caller": 2},
            },
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop), envoy(socket) as client:
        for stream in ("a", "b"):
            await client("open", stream, kind="sotw")
            await client("send", stream, names=["default"])
            assert (await client.next(stream))["event"] == "response"
        await client("open", "c", kind="sotw")
        await client("send", "c", names=["default"])
        end = await client.next("c")
        assert end["event"] == "end" and end["code"] == "RESOURCE_EXHAUSTED" and "at most 2" in end["details"]


# ---- memory, DeltaSecrets --------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the client connects as nobody: needs root")
def test_delta_streams_whose_pushes_are_held_back_hold_a_bounded_amount(
    tmp_path: Path, shared_dir: Path, ca: CertificateAuthority
) -> None:
    """As tests.test_sds_breaker's state-of-the-world case, with DeltaSecrets: each stream subscribes 1,000
    names of 1,000 characters the caller has nothing for (so each answer names them back), then
    unsubscribes them, as fast as the daemon reads. Before: ~12 MB a stream (the requests queued, the
    state, and an answer of 1 MB held three times over while the push waited)."""
    files = FileSet(tmp_path / "creds")
    files.put(ca.issue_svid(), ca.bundle_pem)
    node = DaemonProcess(tmp_path, shared_dir, {"default": files})
    node.write({"default": {"users": ["nobody"]}})
    node.start()
    clients: list[tuple[RawGrpc, int]] = []
    try:
        warm = RawGrpc(sock=connect_as(NOBODY, node.workload))
        call = warm.call(security_header=False, method=SDS + "DeltaSecrets")
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET, resource_names_subscribe=["default"])
        warm.h2.send_data(call, grpc_frame(request))
        warm.flush()
        assert warm.wait_for_data(call).data_bytes > 0
        warm.close()
        before = node.rss_kb()

        names = [f"spiffe://example.org/{i}/" + "x" * 1000 for i in range(1000)]
        frames = [
            grpc_frame(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET, resource_names_subscribe=names)),
            grpc_frame(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET, resource_names_unsubscribe=names)),
        ]
        for _ in range(12):
            client = RawGrpc(sock=connect_as(NOBODY, node.workload))
            client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            client.flush()
            clients.append((client, client.call(security_header=False, method=SDS + "DeltaSecrets")))
        pending = [frames[0]] * len(clients)
        sent = [0] * len(clients)
        last = time.monotonic()
        while time.monotonic() - last < 2.0:  # until the daemon opened no window for 2 s
            for index, (client, call) in enumerate(clients):
                if client.closed or client.calls[call].done:
                    continue
                window = min(client.h2.local_flow_control_window(call), client.h2.max_outbound_frame_size)
                if window > 0:
                    chunk = pending[index][:window]
                    client.h2.send_data(call, chunk)
                    client.flush()
                    pending[index] = pending[index][len(chunk) :]
                    if not pending[index]:
                        sent[index] += 1
                        pending[index] = frames[sent[index] % 2]
                    last = time.monotonic()
                client.receive(0)
        assert not any(client.calls[call].done for client, call in clients)  # all still held back
        grown = (node.rss_kb() - before) / 1024
        assert grown < 12 * 3, f"{grown:.0f} MB held for 12 streams ({sum(sent)} requests of 1 MiB taken in)"
    finally:
        for client, _ in clients:
            client.close()
        node.stop()
