"""Issue 14, sinks: faults a tester found against a real daemon.

- a sink with `readers` was rewritten (and its hooks run) at every check: the ACL's mask shows in the
  group bits (a 0600 key shows 0640), so the file never looked current; token sinks the same;
- two writers of one sink directory (an alias such as /var/run -> /run, a second daemon, `wlidd creds
  --out` into a live sink) left `..data` leading to an empty generation;
- a generation directory chmod'ed 0700 (readers locked out) was never put right.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import threading
from pathlib import Path

from tests.test_hostile_sinks import identity_state, sink
from wlidd.config import SinkConfig
from wlidd.emulator.ca import CertificateAuthority
from wlidd.sinks.credentials import write_credentials
from wlidd.sinks.tokens import ensure_token
from wlidd.tokens.model import Token
from wlidd.watch import IdentityState

APPEND = "import sys; open(sys.argv[1], 'a').write('ran\\n')"
READER = "daemon"  # a user every Debian image has (uid 1)


def test_a_sink_with_readers_that_is_current_is_not_rewritten(tmp_path: Path, ca: CertificateAuthority) -> None:
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    config = sink(tmp_path / "out", readers={"users": [READER]})
    assert write_credentials(config, state) is True
    generation = os.readlink(tmp_path / "out" / "..data")
    assert write_credentials(config, state) is False  # fails: True, a new generation every check
    assert os.readlink(tmp_path / "out" / "..data") == generation


async def test_a_token_sink_with_readers_that_is_current_is_not_rewritten(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    token = Token("opaque-" + "t" * 30, now + dt.timedelta(hours=1), now, "gcp")
    marker = tmp_path / "ran"
    token_sink = SinkConfig.model_validate(
        {
            "path": str(tmp_path / "gcp.token"),
            "readers": {"users": [READER]},
            "on_change": [sys.executable, "-c", APPEND, str(marker)],
        }
    )

    class Source:
        name = "gcp"
        config = type("Config", (), {"sinks": (token_sink,)})()

        def servable(self, now: object = None) -> Token:
            return token

    assert await ensure_token(Source(), lambda: now) == (token_sink,)  # type: ignore[arg-type]
    assert await ensure_token(Source(), lambda: now) == ()  # type: ignore[arg-type]  # fails: rewritten
    assert len(marker.read_text().splitlines()) == 1


def test_two_concurrent_writers_of_one_sink_never_leave_an_empty_generation(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    out = tmp_path / "out"
    states = [identity_state(ca.issue_svid(), ca.bundle_pem) for _ in range(3)]
    write_credentials(sink(out), states[0])
    broken = []
    for round_ in range(30):
        state = states[round_ % 3]

        def write(state: IdentityState = state) -> None:
            with contextlib.suppress(OSError):  # one may fail; the sink must still hold a whole generation
                write_credentials(sink(out), state)

        threads = [threading.Thread(target=write) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not (out / "key.pem").exists() or (out / "key.pem").read_bytes() != state.identity.svid.key_pem():
            broken.append((round_, sorted(os.listdir(out / os.readlink(out / "..data")))))
    assert broken == [], broken[:3]  # fails: ..data -> an empty generation in most rounds


def test_a_generation_directory_whose_mode_was_changed_is_written_again(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    state = identity_state(ca.issue_svid(), ca.bundle_pem)
    target = sink(tmp_path / "out")
    assert write_credentials(target, state) is True
    generation = tmp_path / "out" / os.readlink(tmp_path / "out" / "..data")
    os.chmod(generation, 0o700)  # other users can no longer reach the files through the links
    assert write_credentials(target, state) is True
    assert os.stat(tmp_path / "out" / "cert.pem").st_mode & 0o777 == 0o644
    assert write_credentials(target, state) is False
