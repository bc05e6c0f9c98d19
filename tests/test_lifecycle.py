"""The lifecycle table (wlidd.lifecycle): which sd_notify lines each transition sends, and what it refuses."""

from __future__ import annotations

import itertools

import pytest
from structlog.testing import capture_logs

from wlidd.lifecycle import TRANSITIONS, Lifecycle, State


class Sent:
    """Records what a Lifecycle sends, one dict per datagram."""

    def __init__(self) -> None:
        self.datagrams: list[dict[str, str | int]] = []

    def __call__(self, **fields: str | int) -> None:
        self.datagrams.append(fields)

    def keys(self) -> list[str]:
        return [key for datagram in self.datagrams for key in datagram if key in ("READY", "RELOADING", "STOPPING")]


def walk(moves: tuple[State, ...]) -> Sent:
    sent = Sent()
    lifecycle = Lifecycle(sent, clock=lambda: 42)
    for to in moves:
        lifecycle.move(to, f"line for {to.value}")
    return sent


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
def test_no_path_through_the_table_sends_anything_but_nothing_after_stopping(length: int) -> None:
    """Every sequence of asked-for states: after STOPPING=1 no datagram at all (no READY=1, no RELOADING=1,
    no STATUS=), whatever is asked (a SIGHUP during the drain, a reload's end after a stop)."""
    for moves in itertools.product(list(State), repeat=length):
        sent = walk(moves)
        keys = sent.keys()
        if "STOPPING" in keys:
            assert keys.count("STOPPING") == 1, moves
            assert sent.datagrams[-1].get("STOPPING") == 1, (moves, sent.datagrams)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
def test_ready_is_sent_only_to_end_a_start_or_a_reload(length: int) -> None:
    """READY=1 first ends the start, and after that only follows a RELOADING=1; every RELOADING=1 is
    followed by READY=1 or STOPPING=1 before anything else of the kind."""
    for moves in itertools.product(list(State), repeat=length):
        keys = walk(moves).keys()
        for before, after in itertools.pairwise(keys):
            assert (before, after) in {("READY", "RELOADING"), ("RELOADING", "READY"), ("READY", "STOPPING")} | {
                ("RELOADING", "STOPPING")
            }, (moves, keys)
        if keys and keys[0] != "STOPPING":
            assert keys[0] == "READY", (moves, keys)


def test_a_sighup_during_the_stop_drain_is_refused_logged_and_sends_nothing() -> None:
    sent = Sent()
    lifecycle = Lifecycle(sent, clock=lambda: 42)
    assert lifecycle.move(State.READY, "serving 1 identities, 0 tokens")
    assert lifecycle.move(State.STOPPING, "stopping")
    with capture_logs() as logs:
        assert not lifecycle.move(State.RELOADING)
        assert not lifecycle.move(State.READY, "serving 1 identities, 0 tokens")
        assert lifecycle.status("serving 1 identities, 0 tokens")  # allowed: nothing sent, stays "stopping"
    assert lifecycle.state is State.STOPPING
    assert sent.datagrams == [
        {"READY": 1, "STATUS": "serving 1 identities, 0 tokens"},
        {"STOPPING": 1, "STATUS": "stopping"},
    ]
    refused = [(e["state"], e["refused"]) for e in logs if e["event"].startswith("lifecycle transition refused")]
    assert refused == [("stopping", "reloading"), ("stopping", "ready")]


def test_a_stop_during_a_reload_ends_it_without_ready() -> None:
    sent = Sent()
    lifecycle = Lifecycle(sent, clock=lambda: 42)
    lifecycle.move(State.DEGRADED, "degraded (1 identities, 0 tokens): not valid: identity default")
    lifecycle.move(State.RELOADING)
    lifecycle.move(State.STOPPING, "stopping")
    assert not lifecycle.move(State.READY, "serving")  # the reload's end
    assert sent.keys() == ["READY", "RELOADING", "STOPPING"]


def test_reloading_carries_the_monotonic_clock_and_the_reload_ends_with_ready_and_its_status() -> None:
    sent = Sent()
    lifecycle = Lifecycle(sent, clock=lambda: 123_456)
    lifecycle.move(State.READY, "serving")
    lifecycle.move(State.RELOADING)
    lifecycle.status("reload refused: bad\nconfig")  # one line on the wire
    lifecycle.move(State.DEGRADED, "degraded (…)")
    assert sent.datagrams[1:] == [
        {"RELOADING": 1, "MONOTONIC_USEC": 123_456},
        {"STATUS": "reload refused: bad config"},
        {"READY": 1, "STATUS": "degraded (…)"},
    ]


def test_a_status_line_is_sent_only_when_its_text_changes() -> None:
    sent = Sent()
    lifecycle = Lifecycle(sent, clock=lambda: 42)
    lifecycle.status("starting: waiting for identity default (first load)")
    lifecycle.status("starting: waiting for identity default (first load)")
    lifecycle.status("starting")
    lifecycle.move(State.READY, "serving")
    lifecycle.move(State.READY, "serving")
    lifecycle.move(State.DEGRADED, "degraded")
    lifecycle.move(State.READY, "serving")
    assert sent.datagrams == [
        {"STATUS": "starting: waiting for identity default (first load)"},
        {"STATUS": "starting"},
        {"READY": 1, "STATUS": "serving"},
        {"STATUS": "degraded"},
        {"STATUS": "serving"},
    ]


def test_a_sighup_while_starting_is_not_a_transition_of_the_table() -> None:
    """RELOADING=1 belongs to a started daemon: the daemon defers a SIGHUP while starting."""
    assert (State.STARTING, State.RELOADING) not in TRANSITIONS
    assert all(to is State.STOPPING for (state, to) in TRANSITIONS if state is State.STOPPING)


@pytest.mark.parametrize(
    ("before", "after", "sent"),
    [
        ((State.READY,), State.DEGRADED, [{"STATUS": "health line"}]),
        ((State.DEGRADED,), State.READY, [{"STATUS": "health line"}]),
        ((), State.STARTING, [{"STATUS": "health line"}]),  # starting: what it waits for, and no READY=1
        ((State.READY, State.RELOADING), State.RELOADING, [{"STATUS": "health line"}]),  # READY=1 is the reload's
        ((State.READY, State.STOPPING), State.STOPPING, []),
    ],
    ids=["ready to degraded", "degraded to ready", "starting", "reloading", "stopping"],
)
def test_reporting_the_health_moves_a_started_daemon_and_only_updates_the_status_otherwise(
    before: tuple[State, ...], after: State, sent: list[dict[str, str | int]]
) -> None:
    record = Sent()
    lifecycle = Lifecycle(record, clock=lambda: 42)
    for state in before:
        lifecycle.move(state, f"line for {state.value}")
    record.datagrams.clear()
    lifecycle.report(State.DEGRADED if State.READY in before[-1:] else State.READY, "health line")
    assert lifecycle.state is after and record.datagrams == sent
