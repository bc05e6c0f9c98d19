"""`wlidd demo`: a local CA rotating GCE-style SVIDs, emulated upstreams, and the real daemon serving
identities and tokens from all three flows (entra-sts, x509-sts, gce-metadata)."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import signal
import sys
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from wlidd.config import load_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.emulator.upstreams import Upstreams

DEMO_TRUST_DOMAIN = "demo.global.123456789.workload.id.goog"
DEMO_PATH = "/ns/demo/sa/app"
POOL = "//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/demo"
ENTRA_AUDIENCE = f"{POOL}/providers/entra"
X509_AUDIENCE = f"{POOL}/providers/x509"
APP_URI = "api://wlidd-demo"
CLIENT_ID = "6d1a5c1e-0000-4000-8000-00000000demo"
SERVICE_ACCOUNT = "app@demo-project.iam.gserviceaccount.com"


def write_demo_config(
    base: Path, secrets: Path, upstreams: Upstreams | None = None, token_lifetime: float = 120
) -> Path:
    config = base / "wlidd.toml"
    text = f"""# written by `wlidd demo`
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

[policy]                           # the demo's tokens and credentials go to you (uid {os.getuid()}) and root
tokens = {{ users = ["root", {os.getuid()}] }}
credentials = {{ users = ["root", {os.getuid()}] }}
"""
    if upstreams is not None:
        common = f'ca_file = "{upstreams.ca_file}"\nskew = "10s"\nstart_delay = "2s"\nbackoff_max = "10s"'
        text += f"""
[tokens.gcp]                       # Entra ID assertion -> STS -> impersonation
flow = "entra-sts"
{common}
entra.authority = "{upstreams.authority}"
entra.tenant_id = "{upstreams.tenant_id}"
entra.client_id = "{CLIENT_ID}"
entra.scope = "{APP_URI}/.default"
entra.cert = "{base / "entra.crt"}"
entra.key = "{base / "entra.key"}"
sts.url = "{upstreams.sts_url}"
sts.audience = "{ENTRA_AUDIENCE}"
impersonate.service_account = "{SERVICE_ACCOUNT}"
impersonate.url = "{upstreams.iam_url}"
impersonate.lifetime = "{int(token_lifetime)}s"

[[tokens.gcp.sinks]]
path = "{base / "gcp.token"}"

[tokens.x509]                      # the SVID itself over mTLS -> STS -> impersonation
flow = "x509-sts"
identity = "default"
{common}
sts.url = "{upstreams.sts_mtls_url}"
sts.audience = "{X509_AUDIENCE}"
impersonate.service_account = "{SERVICE_ACCOUNT}"
impersonate.url = "{upstreams.iam_mtls_url}"
impersonate.lifetime = "{int(token_lifetime)}s"

[tokens.mds]                       # the GCE metadata server as an upstream
flow = "gce-metadata"
{common}
metadata.url = "{upstreams.metadata_url}"
"""
    config.write_text(text)
    return config


def demo_upstreams(base: Path, ca: CertificateAuthority, lifetime: float = 120) -> Upstreams:
    """The emulated Entra ID, STS, IAM and metadata server of the demo config, with the Entra app's
    signing certificate written to base/entra.crt and base/entra.key (not yet running)."""
    upstreams = Upstreams(
        base / "emulator",
        spiffe_bundle_pem=ca.bundle_pem,
        sts_lifetime=lifetime,
        metadata_lifetime=lifetime,
        service_accounts=[SERVICE_ACCOUNT],
    )
    signer = CertificateAuthority("entra-app.demo", intermediate=False).issue_svid(key_kind="rsa2048")
    (base / "entra.crt").write_bytes(signer.chain_pem)
    (base / "entra.key").write_bytes(signer.key_pem)
    (base / "entra.key").chmod(0o600)
    upstreams.register_app(CLIENT_ID, APP_URI, signer.leaf)
    upstreams.register_oidc_provider(ENTRA_AUDIENCE, allowed_audiences=[APP_URI])
    upstreams.register_x509_provider(X509_AUDIENCE)
    return upstreams


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _token_line(daemon: Daemon) -> str:
    now = dt.datetime.now(dt.UTC)
    parts = []
    for name, source in daemon.tokens.items():
        token = source.servable(now)
        left = f"{int(token.seconds_left(now))}s left" if token else "none"
        parts.append(f"{name}: {left} ({source.upstream_calls} fetches)")
    return "; ".join(parts)


async def run_demo(base: Path, rotate_every: float, ttl: float, duration: float, tokens: bool = True) -> None:
    """Run the demo in `base` until `duration` seconds (0: no limit) have passed or one SIGINT/SIGTERM.

    One signal ends everything: the inner daemon handles it once it is running (its handler replaces
    the demo's) and returns from `Daemon.run`, which cancels the rotation loop and the emulated
    upstreams; a signal before the daemon is running is caught by the demo's own handler. Returns
    normally in both cases. `base` is left in place: removing it is the caller's choice (`cmd_demo`).
    """
    async with anyio.create_task_group() as outer:
        outer.start_soon(_stop_on_signal, outer.cancel_scope)
        await _run_demo(base, rotate_every, ttl, duration, tokens)
        outer.cancel_scope.cancel()
    _say("demo stopped")


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """Cancel `scope` on the first SIGINT or SIGTERM (until the daemon installs its own handler)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _signum in signals:
            scope.cancel()
            return


async def _run_demo(base: Path, rotate_every: float, ttl: float, duration: float, tokens: bool) -> None:
    base.mkdir(parents=True, exist_ok=True)
    secrets = base / "secrets"
    ca = CertificateAuthority(DEMO_TRUST_DOMAIN)
    writer = GceCredentialWriter(secrets)

    def rotate() -> str:
        svid = ca.issue_svid(DEMO_PATH, ttl=dt.timedelta(seconds=ttl))
        writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
        return format(svid.leaf.serial_number, "x")

    first = rotate()
    async with anyio.create_task_group() as tg:
        upstreams = None
        if tokens:
            upstreams = demo_upstreams(base, ca)
            await tg.start(upstreams.run)
        config_path = write_demo_config(base, secrets, upstreams)
        daemon = Daemon(load_config(config_path))
        sock = shlex.quote(str(daemon.socket_path))

        async def serve(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            await daemon.run(task_status=task_status)
            # The daemon returns once stopped (a signal, or stop() below): end the rotation loop (which
            # would otherwise wait for a rotation nobody publishes) and the upstreams with it.
            tg.cancel_scope.cancel()

        await tg.start(serve)
        token_help = (
            f"""
  curl --unix-socket {sock} http://localhost/v1/token/gcp      # Entra ID -> STS -> impersonation
  curl --unix-socket {sock} http://localhost/v1/token/x509     # SVID over mTLS -> STS
  curl --unix-socket {sock} http://localhost/get_wif_token
  cat {shlex.quote(str(base / "gcp.token"))}
  .venv/bin/wlidd creds default --out /tmp/wlidd-demo-creds --socket {sock}"""
            if tokens
            else ""
        )
        _say(
            f"""
wlidd demo is running in {base}
  credentials: {writer.link} (rotated GCE-style every {rotate_every:g}s, SVID lifetime {ttl:g}s)
  config:      {config_path}
Try, in another terminal:
  curl --unix-socket {sock} http://localhost/v1/status
  curl --unix-socket {sock} http://localhost/v1/identity/default{token_help}
  .venv/bin/wlidd status --socket {sock}
  .venv/bin/wlidd check --config {shlex.quote(str(config_path))}
Press Ctrl-C to stop.
first SVID serial {first}"""
        )
        watcher = daemon.watchers["default"]
        started = anyio.current_time()
        while duration <= 0 or anyio.current_time() - started < duration:
            remaining = duration - (anyio.current_time() - started) if duration > 0 else rotate_every
            await anyio.sleep(min(rotate_every, remaining))
            if duration > 0 and anyio.current_time() - started >= duration:
                break
            version = watcher.current.version if watcher.current else 0
            serial = rotate()
            state = await watcher.wait_for_change(version)
            _say(f"rotated: new SVID serial {serial}; daemon now serves serial {state.identity.svid.serial}")
            if tokens:
                await anyio.sleep(0.5)
                _say(f"tokens:  {_token_line(daemon)}")
        daemon.stop()
        if upstreams is not None:
            upstreams.stop()
