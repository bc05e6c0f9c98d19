"""`wlidd demo`: a local CA rotating GCE-style SVIDs, emulated upstreams, and the real daemon serving
identities and tokens from all three flows (entra-sts, x509-sts, gce-metadata) on every listener:
the Unix socket, the SPIFFE Workload API, mTLS (for a demo client SVID) and the GCE metadata API.
Long: the demo as one script: its config, its commands and its run.

Once the daemon is ready (and its first tokens are servable) the demo prints one block of
copy-paste commands with absolute paths, one per way in (`demo_commands`); tests/test_demo.py runs
every one of them against a running demo.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from wlidd.config import load_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.emulator.upstreams import Upstreams
from wlidd.errors import WlidError

DEMO_TRUST_DOMAIN = "demo.global.123456789.workload.id.goog"
DEMO_PATH = "/ns/demo/sa/app"
DEMO_CLIENT_PATH = "/ns/demo/sa/client"
DEMO_CLIENT_ID = f"spiffe://{DEMO_TRUST_DOMAIN}{DEMO_CLIENT_PATH}"  # the one caller the mTLS listener allows
DEMO_PROJECT = "demo-project"
DEMO_NUMERIC_PROJECT = "123456789"
POOL = "//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/demo"
ENTRA_AUDIENCE = f"{POOL}/providers/entra"
X509_AUDIENCE = f"{POOL}/providers/x509"
APP_URI = "api://wlidd-demo"
CLIENT_ID = "6d1a5c1e-0000-4000-8000-00000000demo"
SERVICE_ACCOUNT = "app@demo-project.iam.gserviceaccount.com"
FIRST_TOKENS_TIMEOUT = 20.0  # seconds the demo waits for its first tokens before printing the commands


def _impersonation(url: str, lifetime: float) -> str:
    """The lines of a [tokens.*] section that impersonate the demo's service account through the IAM
    Credentials endpoint `url`, for `lifetime` seconds (the gcp and x509 tokens differ only in `url`)."""
    return "\n".join(
        [
            f'impersonate.service_account = "{SERVICE_ACCOUNT}"',
            f'impersonate.url = "{url}"',
            f'impersonate.lifetime = "{int(lifetime)}s"',
        ]
    )


# long: the demo's config file as the user reads it (one TOML template)
def write_demo_config(
    base: Path,
    secrets: Path,
    upstreams: Upstreams | None = None,
    token_lifetime: float = 120,
    *,
    listeners: bool = False,
) -> Path:
    """Write base/wlidd.toml: identity "default" from the GCE-style files under `secrets`, the Unix
    socket base/wlidd.sock, and with `upstreams` the token sources gcp, x509 and mds against them.

    With `listeners`, also the Workload API (base/workload.sock), mTLS on a free loopback port
    presenting "default" and allowing only DEMO_CLIENT_ID, the metadata API on a free loopback port
    serving token "gcp" (only with `upstreams`) and the metrics listener on a free loopback port.
    Ports are 0 (the kernel picks a free one: two demos, or a demo beside a running wlidd, never
    clash); the daemon's `mtls_port`, `metadata_port` and `metrics_port` tell which were taken."""
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
    if listeners:
        text += f"""
[listeners.workload_api]           # the SPIFFE Workload API: py-spiffe, go-spiffe, spiffe-helper
path = "{base / "workload.sock"}"

[listeners.mtls]                   # the local API over mTLS, for the demo's client SVID only
address = "127.0.0.1:0"
identity = "default"
allow = ["{DEMO_CLIENT_ID}"]

[listeners.metrics]                # Prometheus /metrics and /v1/health over plain HTTP
address = "127.0.0.1:0"
"""
        if upstreams is not None:
            text += f"""
[listeners.metadata]               # GCE metadata emulation for unmodified Google libraries
address = "127.0.0.1:0"
token = "gcp"
project_id = "{DEMO_PROJECT}"
numeric_project_id = "{DEMO_NUMERIC_PROJECT}"
"""
    if upstreams is not None:
        common = f'ca_file = "{upstreams.ca_file}"\nskew = "10s"\nstart_delay = "0s"\nbackoff_max = "10s"'
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
{_impersonation(upstreams.iam_url, token_lifetime)}

[[tokens.gcp.sinks]]
path = "{base / "gcp.token"}"

[tokens.x509]                      # the SVID itself over mTLS -> STS -> impersonation
flow = "x509-sts"
identity = "default"
{common}
sts.url = "{upstreams.sts_mtls_url}"
sts.audience = "{X509_AUDIENCE}"
{_impersonation(upstreams.iam_mtls_url, token_lifetime)}

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


@dataclass(frozen=True)
class ClientFiles:
    """The demo client's SVID in spiffe-helper's file names: chain (leaf first), key (0600), bundle."""

    cert: Path
    key: Path
    bundle: Path


def write_client_svid(directory: Path, ca: CertificateAuthority, ttl: dt.timedelta) -> ClientFiles:
    """Issue DEMO_CLIENT_ID from the demo CA into `directory` (made 0700) for `curl --cert --key --cacert`."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    svid = ca.issue_svid(DEMO_CLIENT_PATH, ttl=ttl)
    files = ClientFiles(directory / "svid.pem", directory / "svid_key.pem", directory / "svid_bundle.pem")
    files.cert.write_bytes(svid.chain_pem)
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # also when --dir holds an older copy
        out.write(svid.key_pem)
    files.bundle.write_bytes(ca.bundle_pem)
    return files


def wlidd_command(argv0: str | None = None, executable: str | None = None) -> list[str]:
    """How to run this wlidd from any directory, as an absolute argv prefix: the `wlidd` script this
    process was started as, else the `wlidd` beside the interpreter (the venv's bin directory), else
    `<python> -m wlidd`. Paths are made absolute, never resolved (a venv's python is a symlink to the
    base interpreter, which would lose the venv)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    python = os.path.abspath(sys.executable if executable is None else executable)
    script = Path(os.path.abspath(argv0)) if argv0 else None
    if script is not None and script.name == "wlidd" and script.is_file():
        return [str(script)]
    beside = Path(python).parent / "wlidd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [python, "-m", "wlidd"]


@dataclass(frozen=True)
class DemoEndpoints:
    """Where a running demo answers (ports on 127.0.0.1); what `demo_commands` needs."""

    base: Path
    socket: Path
    config: Path
    workload_socket: Path
    client: ClientFiles
    mtls_port: int
    metadata_port: int | None  # None with --no-tokens
    metrics_port: int
    tokens: bool
    wlidd: tuple[str, ...]  # argv prefix (wlidd_command)
    python: str


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def _python(python: str, program: str, *, env: str = "") -> str:
    """`[env] <python> -c '<program>'` (the program uses double quotes only, so it quotes cleanly)."""
    return f"{env}{_q(python)} -c {_q(program)}"


def _needs(modules: tuple[str, ...], packages: str, python: str) -> str:
    """A hint after a command whose modules this interpreter lacks (wlidd installed without [test])."""
    if all(importlib.util.find_spec(module) is not None for module in modules):
        return ""
    return f"   # needs: {_q(python)} -m pip install {packages}"


# long: the demo's copy-paste block, one line per command
def demo_commands(e: DemoEndpoints) -> list[str]:
    """The demo's copy-paste block: comment lines (`# ...`) heading shell commands, one a line, each
    runnable from any directory by the demo's user (absolute paths; pasted into sh or bash as is)."""
    sock = _q(e.socket)
    unix = f"curl --unix-socket {sock} http://localhost"
    wlidd = " ".join(_q(part) for part in e.wlidd)
    lines = [
        "# the local API over the Unix socket (tokens and keys to your uid and root only: [policy])",
        f"{unix}/v1/status",
        f"{unix}/v1/identity/default",
    ]
    if e.tokens:
        lines += [
            f"{unix}/v1/token/gcp      # Entra ID -> STS -> impersonation",
            f"{unix}/v1/token/x509     # the SVID over mTLS -> STS -> impersonation",
            f"{unix}/v1/token/mds      # the GCE metadata server as an upstream",
            f"{unix}/get_wif_token",
            f"cat {_q(e.base / 'gcp.token')}       # a token sink, rewritten atomically on every refresh",
        ]
    mtls_route = "/v1/token/gcp" if e.tokens else "/v1/identity/default"
    lines += [
        f"# the same API over mTLS, as {DEMO_CLIENT_ID} (the only ID it allows;"
        " the demo's SVID also names localhost, which curl checks)",
        f"curl --cert {_q(e.client.cert)} --key {_q(e.client.key)} --cacert {_q(e.client.bundle)}"
        f" https://localhost:{e.mtls_port}{mtls_route}",
        "# the command line",
        f"{wlidd} status --socket {sock}",
    ]
    if e.tokens:
        lines.append(f"{wlidd} token gcp --socket {sock}")
    lines += [
        f"{wlidd} creds default --out {_q(e.base / 'creds')} --socket {sock}",
        f"{wlidd} check --config {_q(e.config)}",
        "# the Python client (wlidd.client)",
    ]
    client = f"from wlidd.client import Client; c = Client({json.dumps(str(e.socket))}); "
    client += 'i = c.get_credentials("default"); print(i.spiffe_id, "until", i.not_after)'
    if e.tokens:
        client += '; t = c.get_token("gcp"); print("token gcp until", t.expire_time)'
    lines.append(_python(e.python, client))
    if e.metadata_port is not None:
        host = f"127.0.0.1:{e.metadata_port}"
        env = f"GCE_METADATA_HOST={host} GCE_METADATA_IP={host} GCE_METADATA_MTLS_MODE=none "
        program = (
            "import google.auth, google.auth.transport.requests as r; c, p = google.auth.default();"
            " c.refresh(r.Request()); print(p, c.service_account_email, c.expiry)"
        )
        lines += [
            "# unmodified google-auth through the metadata API (google.auth.default() prefers"
            " GOOGLE_APPLICATION_CREDENTIALS and gcloud's application default credentials if you have them)",
            _python(e.python, program, env=env) + _needs(("google.auth", "requests"), "google-auth requests", e.python),
        ]
    program = "from spiffe import WorkloadApiClient; print(WorkloadApiClient().fetch_x509_svid().spiffe_id)"
    lines += [
        "# py-spiffe through the SPIFFE Workload API",
        _python(e.python, program, env=f"SPIFFE_ENDPOINT_SOCKET={_q('unix://' + str(e.workload_socket))} ")
        + _needs(("spiffe",), "spiffe", e.python),
        "# Prometheus metrics and the health check, on the metrics listener (plain HTTP, nothing secret)",
        f"curl http://127.0.0.1:{e.metrics_port}/metrics",
        f"curl http://127.0.0.1:{e.metrics_port}/v1/health",
    ]
    return lines


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


async def _first_tokens(daemon: Daemon) -> list[str]:
    """Wait (at most FIRST_TOKENS_TIMEOUT s) until every token source serves, so the printed commands
    work at once; the problems of those that did not, one line each."""
    problems: list[str] = []
    for source in daemon.tokens.values():
        try:
            await source.wait_until_servable(FIRST_TOKENS_TIMEOUT)
        except WlidError as exc:
            problems.append(f"warning: {exc.message}")
    return problems


# long: the demo's script in order: CA, upstreams, daemon, the printed commands, rotations, stop
async def _run_demo(base: Path, rotate_every: float, ttl: float, duration: float, tokens: bool) -> None:
    base.mkdir(parents=True, exist_ok=True)
    secrets = base / "secrets"
    ca = CertificateAuthority(DEMO_TRUST_DOMAIN)
    writer = GceCredentialWriter(secrets)

    def rotate() -> str:
        # DNS name localhost beside the SPIFFE ID: curl checks the server's name, not its SPIFFE ID
        svid = ca.issue_svid(DEMO_PATH, ttl=dt.timedelta(seconds=ttl), dns_names=["localhost"])
        writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
        return format(svid.leaf.serial_number, "x")

    first = rotate()
    client = write_client_svid(base / "client", ca, dt.timedelta(days=1))
    async with anyio.create_task_group() as tg:
        upstreams = None
        if tokens:
            upstreams = demo_upstreams(base, ca)
            await tg.start(upstreams.run)
        config_path = write_demo_config(base, secrets, upstreams, listeners=True)
        daemon = Daemon(load_config(config_path))

        async def serve(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            await daemon.run(task_status=task_status)
            # The daemon returns once stopped (a signal, or stop() below): end the rotation loop (which
            # would otherwise wait for a rotation nobody publishes) and the upstreams with it.
            tg.cancel_scope.cancel()

        await tg.start(serve)
        problems = await _first_tokens(daemon)
        assert daemon.mtls_port is not None and daemon.metrics_port is not None
        endpoints = DemoEndpoints(
            base=base,
            socket=daemon.socket_path,
            config=config_path,
            workload_socket=base / "workload.sock",
            client=client,
            mtls_port=daemon.mtls_port,
            metadata_port=daemon.metadata_port,
            metrics_port=daemon.metrics_port,
            tokens=tokens,
            wlidd=tuple(wlidd_command()),
            python=os.path.abspath(sys.executable),
        )
        listeners = f"unix {daemon.socket_path}, workload API {endpoints.workload_socket}"
        listeners += f", mTLS 127.0.0.1:{daemon.mtls_port}"
        if daemon.metadata_port is not None:
            listeners += f", metadata 127.0.0.1:{daemon.metadata_port}"
        listeners += f", metrics 127.0.0.1:{daemon.metrics_port}"
        _say(
            "\n".join(
                [
                    "",
                    f"wlidd demo is running in {base}",
                    f"  credentials: {writer.link} (rotated GCE-style every {rotate_every:g}s, SVID lifetime {ttl:g}s)",
                    f"  config:      {config_path}",
                    f"  listeners:   {listeners}",
                    *problems,
                    "Try, in another terminal:",
                    *(f"  {line}" for line in demo_commands(endpoints)),
                    "Press Ctrl-C to stop.",
                    f"first SVID serial {first}",
                ]
            )
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
