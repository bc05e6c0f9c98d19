"""Command line: ``wlidd run | check | status | demo``.
Long: one parser and one handler per subcommand.

Every failure a user can cause prints one clear message (no traceback) and exits non-zero with one
of the codes in `ExitCode` (listed by `wlidd --help`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import json
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import anyio

from wlidd import __version__
from wlidd.clock import iso_z
from wlidd.config import DEFAULT_CONFIG_PATH, Config, UnixListenerConfig, config_path_from, load_config
from wlidd.errors import ConfigError, SvidError, WlidError
from wlidd.logs import configure_logging
from wlidd.status import Status, to_json
from wlidd.svid.load import CredentialSource, load_identity


class ExitCode(enum.IntEnum):
    """Every exit status of `wlidd`, the one table `--help` and the README list (EXIT_CODE_MEANING).
    WlidError subclasses carry theirs as the `exit_code` hint (ConfigError 2, ListenerError 3);
    `exit_code_for` maps an error to its code."""

    OK = 0
    FAILURE = 1
    CONFIG = 2
    LISTENER = 3
    NO_ACCESS = 4
    INTERRUPTED = 130


EXIT_CODE_MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "success; `run` stopped by SIGTERM/SIGINT; `run --oneshot` did everything",
    ExitCode.FAILURE: "a check failed, an identity or token is not valid or servable, the daemon refused a"
    " request or is not running (no socket, nothing listening), a required token could not be had at start,"
    " `run --oneshot` could not load an identity, fetch a token or write a sink",
    ExitCode.CONFIG: "bad command line or configuration (unknown key, bad value, missing config file)",
    ExitCode.LISTENER: "a listener could not be set up: socket in use by a running daemon, path not a socket,"
    " unknown socket owner or group, address taken",
    ExitCode.NO_ACCESS: "permission denied on the daemon's socket (the message names its owner, group, mode)",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C (SIGINT) outside `run`, or during `run --oneshot`",
}


def exit_codes_help() -> str:
    """The `--help` epilog: one line per ExitCode."""
    lines = ["exit codes:"]
    for code in ExitCode:
        head = f"  {int(code):<4} {code.name.lower():<12} "
        lines.append(textwrap.fill(EXIT_CODE_MEANING[code], 79, initial_indent=head, subsequent_indent=" " * len(head)))
    return "\n".join(lines)


def exit_code_for(error: WlidError) -> ExitCode:
    """The exit code for a WlidError: NO_ACCESS when the daemon's socket refused this caller, else the
    error's own `exit_code` hint (FAILURE if that is not an ExitCode)."""
    from wlidd.errors import ClientError

    if isinstance(error, ClientError) and error.reason == "permission_denied":
        return ExitCode.NO_ACCESS
    try:
        return ExitCode(error.exit_code)
    except ValueError:
        return ExitCode.FAILURE


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path_from(args.config, os.environ))


def cmd_run(args: argparse.Namespace) -> int:
    from wlidd.daemon import Daemon

    path = config_path_from(args.config, os.environ)
    config = load_config(path)
    configure_logging(args.log_level or config.daemon.log_level, config.daemon.log_format)
    _require_something(config)
    if args.oneshot:
        from wlidd.oneshot import run_oneshot

        result = anyio.run(run_oneshot, config)
        return ExitCode.OK if result.ok else ExitCode.FAILURE
    anyio.run(Daemon(config, config_path=path).run)
    return ExitCode.OK


def _require_something(config: Config) -> None:
    """A config that serves nothing is a config error (exit 2), for `run` and `check` alike."""
    if not config.identities and not config.tokens:
        raise ConfigError("nothing to serve: add an [identities.<name>] or a [tokens.<name>] table to the config")


def _socket_account_problems(config: Config) -> list[str]:
    """Unix sockets whose configured owner or group this host does not know: the daemon would exit 3."""
    from wlidd.accounts import group_named, user_id

    problems = []
    for name, listener in (("unix", config.listeners.unix), ("workload_api", config.listeners.workload_api)):
        if listener is None:
            continue
        if listener.owner is not None and user_id(listener.owner) is None:
            problems.append(f"listeners.{name}.owner: user {listener.owner!r} does not exist (wlidd run would exit 3)")
        if listener.group is not None and group_named(listener.group) is None:
            problems.append(
                f"listeners.{name}.group: group {listener.group!r} does not exist (wlidd run would exit 3; "
                "the Debian package creates wlidd-clients)"
            )
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    _require_something(config)
    if args.print:
        from wlidd.config_toml import config_toml

        print(config_toml(config, source=str(config_path_from(args.config, os.environ))), end="")
        return ExitCode.OK
    configure_logging("error", "console")
    failures = 0
    from wlidd.sinks.check import ownership_warnings, sink_problems

    for warning in ownership_warnings(config):
        print(f"warning: {warning}")
    from wlidd.config import unreadable_by_service

    if (unreadable := unreadable_by_service(config_path_from(args.config, os.environ))) is not None:
        print(f"warning: {unreadable}")
    from wlidd.policy import policy_warnings

    for warning in policy_warnings(config.policy):
        print(f"warning: {warning}")
    from wlidd.tokens.preflight import token_problems

    token_lines = token_problems(config)
    for problem in [*sink_problems(config), *token_lines, *_socket_account_problems(config)]:
        failures += 1
        print(f"FAIL {problem}")
    for name in sorted(config.tokens):
        if not any(problem.startswith(f"tokens.{name}.") for problem in token_lines):
            print(f"ok   token {name}: {config.tokens[name].flow}, its files readable")

    async def check_all() -> None:
        nonlocal failures
        for name, identity_config in sorted(config.identities.items()):
            source = CredentialSource(name, identity_config, dict(os.environ))
            try:
                identity = await load_identity(source, attempts=1)
            except SvidError as exc:
                failures += 1
                print(f"FAIL {name}: {exc.reason}: {exc.message}")
                continue
            svid = identity.svid
            left = int(svid.seconds_left(dt.datetime.now(dt.UTC)))
            print(
                f"ok   {name}: {svid.spiffe_id} serial {svid.serial} expires {svid.not_after.isoformat()} ({left}s left)"
            )
            for note in (*svid.warnings, *identity.notes):
                print(f"     warning: {note}")

    anyio.run(check_all)
    return ExitCode.FAILURE if failures else ExitCode.OK


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    path = config_path_from(args.config, os.environ)
    if path == DEFAULT_CONFIG_PATH and not path.exists():
        return UnixListenerConfig().path
    return _load(args).listeners.unix.path


def fetch_status(socket_path: Path, timeout: float = 5.0) -> Status:
    """The running daemon's /v1/status (ClientError when it cannot be had, or is malformed)."""
    from wlidd.client import Client

    with Client(socket_path, timeout=timeout) as client:
        return client.status()


def cmd_token(args: argparse.Namespace) -> int:
    from wlidd.client import Client

    with Client(_socket_path(args)) as client:
        token = client.get_token(args.name)
    if args.json:
        document = {
            "access_token": token.access_token,
            "token_type": token.token_type,
            "expires_in": token.expires_in,
            "expire_time": iso_z(token.expire_time),
        }
        print(json.dumps(document, indent=2))
    else:
        print(token.access_token)
    return ExitCode.OK


def cmd_creds(args: argparse.Namespace) -> int:
    """Write an identity's current credentials into `--out` in one of the sink layouts, through the sinks'
    own writer (one generation, published by renaming `..data`; wlidd.sinks.publish_generation)."""
    from wlidd.client import Client
    from wlidd.sinks.generations import publish_generation
    from wlidd.sinks.layouts import Material, layout_files
    from wlidd.svid.spiffeid import parse_spiffe_id

    if args.include_federated_domains and args.layout != "spiffe-helper":
        print("wlidd creds: --include-federated-domains is for --layout spiffe-helper", file=sys.stderr)
        return ExitCode.CONFIG
    with Client(_socket_path(args)) as client:
        creds = client.get_credentials(args.identity)
    out = Path(os.path.abspath(args.out))
    try:
        trust_domain = parse_spiffe_id(creds.spiffe_id).trust_domain
    except SvidError as exc:
        print(f"wlidd creds: the daemon handed out an unusable SPIFFE ID: {exc.message}", file=sys.stderr)
        return ExitCode.FAILURE
    material = Material(
        key_pem=creds.key_pem.encode(),
        chain_pem=creds.chain_pem.encode(),
        trust_domain=trust_domain,
        bundle_pem=creds.bundle_pem.encode(),
        federated=tuple(sorted((td, pem.encode()) for td, pem in creds.federated_bundles_pem.items())),
    )
    files = layout_files(args.layout, material, out, include_federated_domains=args.include_federated_domains)
    try:
        written = publish_generation(out, files)
    except OSError as exc:  # a refused (unsafe) directory or a plain I/O error: say which, no traceback
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror else str(exc)
        print(f"wlidd creds: cannot write to {out}: {detail}", file=sys.stderr)
        return ExitCode.FAILURE
    names = ", ".join(f.name for f in files)
    what = "written to" if written else "already in"
    print(f"{creds.spiffe_id} serial {creds.serial} (expires {creds.not_after.isoformat()}) {what} {out}: {names}")
    return ExitCode.OK


def render_status(status: Status) -> str:
    """The `wlidd status` table of a /v1/status document (wlidd.status)."""
    daemon = status.daemon
    lines = [f"wlidd {daemon.version} pid {daemon.pid}: {daemon.state}, up {daemon.uptime_seconds}s"]
    if daemon.state == "starting":  # the accept loops run before the first loads: say what is awaited
        parts = [f"identity {name} (first load)" for name in daemon.waiting_for.identities]
        parts += [f"token {name} (required at start)" for name in daemon.waiting_for.tokens]
        lines.append("starting: waiting for " + (", ".join(parts) or "the last steps before READY"))
    lines.append(f"{'IDENTITY':<14} {'VALID':<6} {'LEFT':>8}  {'SERIAL':<12} {'SPIFFE ID'}")
    for name, ident in status.identities.items():
        left = "-" if ident.seconds_left is None else f"{ident.seconds_left}s"
        serial = (ident.serial or "-")[:12]
        lines.append(f"{name:<14} {'yes' if ident.valid else 'NO':<6} {left:>8}  {serial:<12} {ident.spiffe_id or '-'}")
        if ident.last_error:
            err = ident.last_error
            lines.append(f"{'':<14} last error {iso_z(err.at)}: {err.reason}: {err.message}")
        for problem in ident.bundle_problems:
            kept = "last good copy kept" if problem.kept else "left out"
            lines.append(f"{'':<14} bundle of {problem.trust_domain}: {problem.reason}: {problem.message} ({kept})")
        lines.append(
            f"{'':<14} reloads {ident.reloads}, updates {ident.updates}, rejections {ident.rejections}, "
            f"last loaded {iso_z(ident.last_loaded) or '-'}"
        )
    if status.tokens:
        lines.append(f"{'TOKEN':<14} {'VALID':<6} {'LEFT':>8}  {'FLOW':<13} {'FAILURES':>8}  NEXT REFRESH")
        for name, token in status.tokens.items():
            left = "-" if token.seconds_left is None else f"{token.seconds_left}s"
            valid, failures, next_refresh = "yes" if token.valid else "NO", token.failures, iso_z(token.next_refresh)
            lines.append(f"{name:<14} {valid:<6} {left:>8}  {token.flow:<13} {failures:>8}  {next_refresh or '-'}")
            if token.last_error:
                failure = token.last_error
                kind = " (permanent: retried every backoff_max)" if failure.permanent else ""
                lines.append(f"{'':<14} last error {iso_z(failure.at)}: {failure.reason}{kind}: {failure.message}")
    for place, sink in status.sink_problems.items():
        lines.append(f"SINK {place} ({sink.kind} {sink.owner}): last write failed: {sink.error}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = fetch_status(_socket_path(args))
    if args.json or not sys.stdout.isatty():
        print(json.dumps(to_json(status), indent=2))
    else:
        print(render_status(status))
    return ExitCode.OK if status.daemon.state == "running" else ExitCode.FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from wlidd.emulator.demo import run_demo

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="wlidd-demo-"))
    configure_logging("info", "console")
    try:
        # One SIGINT/SIGTERM ends the demo normally (exit 0); a second one during teardown lands here.
        anyio.run(run_demo, base, args.rotate_every, args.ttl, args.duration, not args.no_tokens)
    except KeyboardInterrupt:
        pass
    finally:
        if not args.dir:  # a scratch folder holds the CA's and the SVIDs' private keys: never leave it behind
            shutil.rmtree(base, ignore_errors=True)
    return 0


# long: the argparse table of every subcommand and option, read top to bottom
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wlidd",
        description="Workload identity daemon for Linux nodes.",
        epilog=exit_codes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wlidd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help=f"config file (env WLIDD_CONFIG; default {DEFAULT_CONFIG_PATH})")
        return p

    run = with_config(sub.add_parser("run", help="run the daemon"))
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--oneshot",
        action="store_true",
        help="load every identity, fetch every token, write every sink and run its hooks once, then exit:"
        " 0 when all was done, 1 naming each failure (for ExecStartPre=, init containers, cron; no listeners,"
        " no sd_notify)",
    )
    run.set_defaults(func=cmd_run)
    check = with_config(sub.add_parser("check", help="validate the config and the current credential files"))
    check.add_argument(
        "--print",
        action="store_true",
        help="print the effective config as TOML (defaults filled in, WLIDD_* applied, ~ expanded, secrets"
        " shown as <redacted>) and exit; credential files are not read",
    )
    check.set_defaults(func=cmd_check)
    status = with_config(sub.add_parser("status", help="ask the running daemon how fresh every credential is"))
    status.add_argument("--socket", help="the daemon's Unix socket (default: from the config)")
    status.add_argument("--json", action="store_true", help="print JSON even on a terminal")
    status.set_defaults(func=cmd_status)
    token = with_config(sub.add_parser("token", help="print a token from the running daemon (for scripts)"))
    token.add_argument("name", help="the token's name ([tokens.<name>])")
    token.add_argument("--socket", help="the daemon's Unix socket (default: from the config)")
    token.add_argument("--json", action="store_true", help="print the whole JSON answer")
    token.set_defaults(func=cmd_token)
    creds = with_config(
        sub.add_parser("creds", help="write an identity's current chain, key and bundle (callers allowed by [policy])")
    )
    creds.add_argument("identity", help="the identity's name ([identities.<name>])")
    creds.add_argument("--out", required=True, help="directory to write into (made if missing)")
    creds.add_argument(
        "--layout",
        choices=["spiffe-helper", "files", "spiffe-fs"],
        default="spiffe-helper",
        help="file names, as a credential sink's layout: spiffe-helper (default: svid.pem chain, svid_key.pem"
        " 0600, svid_bundle.pem), files (cert.pem, key.pem, bundle.pem, certificate_config.json), spiffe-fs"
        " (credential-bundle.private-key.pem: key and chain; <trust domain>.spiffe-trust-bundle.pem)",
    )
    creds.add_argument(
        "--include-federated-domains",
        action="store_true",
        help="spiffe-helper layout: append the federated trust domains' roots to svid_bundle.pem",
    )
    creds.add_argument("--socket", help="the daemon's Unix socket (default: from the config)")
    creds.set_defaults(func=cmd_creds)
    demo = sub.add_parser(
        "demo",
        help="run the daemon on a local CA rotating GCE-style credentials, on every listener, and print"
        " commands to try against it",
        description="A local CA rotates GCE-style SVIDs; emulated Entra ID, STS, IAM and GCE metadata upstreams"
        " feed three token sources; the real daemon serves them on the Unix socket, the SPIFFE Workload API,"
        " mTLS (for a demo client SVID), the GCE metadata API and the metrics listener (free loopback ports)."
        " Prints copy-paste commands with absolute paths for each, then a line per rotation.",
    )
    demo.add_argument(
        "--dir", help="work directory, kept on exit (default: a new temp dir, removed on exit: it holds private keys)"
    )
    demo.add_argument("--rotate-every", type=float, default=30.0, help="seconds between rotations (default 30)")
    demo.add_argument("--ttl", type=float, default=120.0, help="SVID lifetime in seconds (default 120)")
    demo.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    demo.add_argument(
        "--no-tokens",
        action="store_true",
        help="identities only: no emulated upstreams, no tokens, no metadata listener",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def _wlid_errors(exc: BaseException) -> list[WlidError]:
    """The WlidErrors inside `exc` (task groups wrap what their tasks raise in exception groups)."""
    if isinstance(exc, WlidError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [found for inner in exc.exceptions for found in _wlid_errors(inner)]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BaseException as exc:
        errors = _wlid_errors(exc)
        if not errors:
            raise
        for error in errors:
            print(f"wlidd: error: {error.message}", file=sys.stderr)
        return exit_code_for(errors[0])
    return code
