"""One health decision (wlidd.health): /v1/health, /v1/status's daemon state, STATUS=, the watchdog's
liveness and the metrics say the same thing about the same daemon."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import FileSet, in_background, kill_accept_loop
from wlidd.api.messages import Request
from wlidd.api.peers import Peer
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority


def get(d: Daemon, path: str) -> Request:
    return Request("GET", path, {}, (), b"", Peer(), "unix")


@dataclass(frozen=True)
class Said:
    """What every reader of the daemon's health says at one time."""

    health: tuple[int, dict[str, Any]]  # /v1/health: status, document
    state: str  # /v1/status daemon.state
    status_line: str  # STATUS=
    metric: list[str]  # the wlidd_daemon_state series at 1
    exposition: str


async def readers(d: Daemon) -> Said:
    """What every reader of the daemon's health says now (asked without a socket)."""
    health = await d.api(get(d, "/v1/health"))
    status = json.loads((await d.api(get(d, "/v1/status"))).body)
    exposition = (await d.api(get(d, "/metrics"))).body.decode()
    states = dict(re.findall(r'^wlidd_daemon_state\{state="(\w+)"\} ([\d.]+)$', exposition, re.M))
    return Said(
        health=(health.status, json.loads(health.body)),
        state=status["daemon"]["state"],
        status_line=d.summary(),
        metric=sorted(state for state, value in states.items() if float(value) == 1),
        exposition=exposition,
    )


async def test_an_optional_identity_not_loaded_is_named_in_status_while_every_reader_says_running(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """Not required means not a problem: /v1/health ok, state running, STATUS= "serving" naming it."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    spare = files.config(cert=tmp_path / "nope.pem", key=tmp_path / "nope.key", mismatch_retries=1, required=False)
    config = Config.model_validate(
        {
            "identities": {"default": files.config(), "spare": spare},
            "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
        }
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop):
        said = await readers(d)
        assert said.health == (200, {"status": "ok"})
        assert said.state == "running"
        assert said.status_line == "serving 2 identities, 0 tokens; not valid: identity spare"
        assert 'wlidd_identity_valid{identity="spare"} 0.0' in said.exposition
        assert said.metric == ["running"]
        assert d.health().live


async def test_a_dead_accept_loop_makes_every_reader_say_degraded(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """A listener that stopped accepting: /v1/health 503 naming it, state degraded (also in /v1/status and
    the metrics), STATUS= degraded, and not live (the watchdog withholds its pings)."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    config = Config.model_validate(
        {"identities": {"default": files.config()}, "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}}}
    )
    d = Daemon(config)
    async with in_background(d.run, d.stop):
        assert (await readers(d)).state == "running"
        await kill_accept_loop(d.listeners.accept_loops[0], tmp_path / "wlidd.sock")
        said = await readers(d)
        status, document = said.health
        assert status == 503 and document["status"] == "unhealthy"
        assert document["problems"] == {"listener/unix": "accept loop stopped: OSError: [Errno 22] Invalid argument"}
        assert said.status_line == "degraded (1 identities, 0 tokens): not valid: listener unix (accept loop stopped)"
        assert said.state == "degraded"
        assert said.metric == ["degraded"]
        assert not d.health().live
