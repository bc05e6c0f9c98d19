"""Command line: ``wlidd run | check | status | token | creds | demo``: one parser, one handler per subcommand.

Every failure a user can cause prints one clear message (no traceback) and exits non-zero with one
of the codes in `ExitCode` (wlidd.cli.exit_codes; listed by `wlidd --help`). The commands that ask the
running daemon (status, token, creds) are in wlidd.cli.client_commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from wlidd import __version__
from wlidd.cli.client_commands import cmd_creds, cmd_status, cmd_token
from wlidd.cli.exit_codes import ExitCode, exit_code_for, exit_codes_help
from wlidd.config import DEFAULT_CONFIG_PATH, Config, PolicyConfig, config_path_from, load_config
from wlidd.errors import ConfigError, SvidError, WlidError
from wlidd.logs import configure_logging
from wlidd.svid.load.retry import load_identity
from wlidd.svid.load.source import CredentialSource


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


WORKLOADS_DROP_IN = "/etc/systemd/system/wlidd.service.d/workloads.conf"  # README "Workloads"


def hidden_process_warnings(policy: PolicyConfig, processes_visible: bool | None) -> list[str]:
    """`wlidd check`'s warning when the wlidd unit hides other users' processes (`processes_visible` False:
    ProtectProc=invisible, the shipped hardening; None: not known, no warning) and a rule selects on units,
    which wlidd reads from the caller's /proc/PID/cgroup: such a rule then refuses every other user."""
    rules = {"policy.tokens": policy.tokens, "policy.credentials": policy.credentials}
    rules |= {f"policy.token.{name}": rule for name, rule in policy.token.items()}
    rules |= {f"policy.identity.{name}": rule for name, rule in policy.identity.items()}
    in_units = [where for where, rule in rules.items() if rule.units]
    if not in_units or processes_visible is not False:
        return []
    return [
        f"{', '.join(in_units)} select on units, which wlidd reads in other users' /proc/PID/cgroup, and the"
        f" wlidd unit hides their processes (ProtectProc=invisible): they refuse every other user's process"
        f" (add the README's drop-in {WORKLOADS_DROP_IN}, its ProtectProc=default)"
    ]


def _unit_properties(*names: str) -> dict[str, str] | None:
    """The wlidd unit's properties `names` as systemd has them (`systemctl show -p NAME … wlidd`), with its
    LoadState; None when systemd cannot be asked (no systemctl, it failed or took over 5 s)."""
    import subprocess

    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    options = [option for name in (*names, "LoadState") for option in ("-p", name)]
    try:
        shown = subprocess.run(
            [systemctl, "show", *options, "wlidd"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return dict(line.partition("=")[::2] for line in shown.stdout.splitlines() if "=" in line)


def _unit_grants_ptrace() -> bool:
    """Whether the wlidd unit clearly grants CAP_SYS_PTRACE (`systemctl show -p AmbientCapabilities wlidd`
    lists cap_sys_ptrace): rules on executables and sha256 need it for other users' processes. False when
    it does not, or cannot be told (no systemd here): `wlidd check` then warns of those rules."""
    shown = _unit_properties("AmbientCapabilities")
    return shown is not None and "cap_sys_ptrace" in shown.get("AmbientCapabilities", "").lower()


def _unit_shows_processes() -> bool | None:
    """Whether the installed wlidd unit lets wlidd see other users' processes: False under
    `ProtectProc=invisible` or `noaccess` (the shipped unit's hardening), where rules on units refuse every
    other user's process; None when it cannot be told (no systemd, or no wlidd unit loaded)."""
    shown = _unit_properties("ProtectProc")
    if shown is None or shown.get("LoadState") != "loaded":
        return None
    return shown.get("ProtectProc", "default") not in ("invisible", "noaccess")


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

    metadata = config.listeners.metadata  # its TCP callers never match units, executables, sha256
    token = metadata.token if metadata is not None else None
    for warning in [
        *policy_warnings(config.policy, metadata_token=token, ptrace_granted=_unit_grants_ptrace()),
        *hidden_process_warnings(config.policy, _unit_shows_processes()),
    ]:
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
