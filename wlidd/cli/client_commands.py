"""The commands that ask the running daemon over its Unix socket (wlidd.client): `status` (its table or
JSON), `token` and `creds`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wlidd.cli.exit_codes import ExitCode
from wlidd.clock import iso_z
from wlidd.config import DEFAULT_CONFIG_PATH, UnixListenerConfig, config_path_from, load_config
from wlidd.errors import SvidError
from wlidd.status import SdsStatus, Status, to_json


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    path = config_path_from(args.config, os.environ)
    if path == DEFAULT_CONFIG_PATH and not path.exists():
        return UnixListenerConfig().path
    return load_config(path).listeners.unix.path


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


def sds_line(sds: SdsStatus) -> str:
    """`wlidd status`'s line for Envoy's SDS: counts, and the last NACK's time and first resource names (an
    Envoy's own strings: cut to 64 characters, anything unprintable, such as a terminal escape, shown as ?)."""
    line = f"{'SDS (Envoy)':<14} {sds.streams} streams ({sds.streams_nacked} nacked), {sds.pushes} pushes"
    line += f", {sds.nacks} NACKs"
    if sds.last_nack is not None:
        names = ["".join(c if c.isprintable() else "?" for c in name[:64]) for name in sds.last_nack.resources[:3]]
        more = sds.last_nack.names - len(names)
        shown = ", ".join(names) + (f" +{more} more" if more > 0 else "") if names else "every resource (no name)"
        line += f", last {iso_z(sds.last_nack.at)} for {shown}"
    return line


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
    if status.workload_api is not None and status.workload_api.sds is not None:
        lines.append(sds_line(status.workload_api.sds))
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
