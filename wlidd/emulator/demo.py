"""`wlidd demo`: a local CA, GCE-style rotations every few seconds, and the real daemon serving them."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from pathlib import Path

import anyio

from wlidd.config import load_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files

DEMO_TRUST_DOMAIN = "demo.global.123456789.workload.id.goog"
DEMO_PATH = "/ns/demo/sa/app"


def write_demo_config(base: Path, secrets: Path) -> Path:
    config = base / "wlidd.toml"
    config.write_text(
        f"""# written by `wlidd demo`
[daemon]
log_level = "info"
runtime_dir = "{base / "run"}"

[identities.default]
source = "gce"
dir = "{secrets / "workload-spiffe-credentials"}"
trust_domain = "{DEMO_TRUST_DOMAIN}"
mismatch_retry_delay = "1s"

[listeners.unix]
path = "{base / "wlidd.sock"}"
mode = "0660"
"""
    )
    return config


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


async def run_demo(base: Path, rotate_every: float, ttl: float, duration: float) -> None:
    base.mkdir(parents=True, exist_ok=True)
    secrets = base / "secrets"
    ca = CertificateAuthority(DEMO_TRUST_DOMAIN)
    writer = GceCredentialWriter(secrets)

    def rotate() -> str:
        svid = ca.issue_svid(DEMO_PATH, ttl=dt.timedelta(seconds=ttl))
        writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
        return format(svid.leaf.serial_number, "x")

    first = rotate()
    config_path = write_demo_config(base, secrets)
    daemon = Daemon(load_config(config_path))
    sock = shlex.quote(str(daemon.socket_path))
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        _say(
            f"""
wlidd demo is running in {base}
  credentials: {writer.link} (rotated GCE-style every {rotate_every:g}s, SVID lifetime {ttl:g}s)
  config:      {config_path}
Try, in another terminal:
  curl --unix-socket {sock} http://localhost/v1/status
  curl --unix-socket {sock} http://localhost/v1/identity/default
  .venv/bin/wlidd status --socket {sock}
  .venv/bin/wlidd check --config {shlex.quote(str(config_path))}
Press Ctrl-C to stop.
first SVID serial {first}"""
        )
        started = anyio.current_time()
        while duration <= 0 or anyio.current_time() - started < duration:
            await anyio.sleep(
                min(rotate_every, duration - (anyio.current_time() - started)) if duration > 0 else rotate_every
            )
            if duration > 0 and anyio.current_time() - started >= duration:
                break
            serial = rotate()
            state = await daemon.watchers["default"].wait_for_change(
                daemon.watchers["default"].current.version if daemon.watchers["default"].current else 0
            )
            _say(f"rotated: new SVID serial {serial}; daemon now serves serial {state.identity.svid.serial}")
        daemon.stop()
    _say("demo stopped")
