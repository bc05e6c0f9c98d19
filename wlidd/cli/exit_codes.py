"""Every exit status of `wlidd` (`ExitCode`), what each means (the `--help` epilog, the README's table), and
the code a WlidError exits with.
"""

from __future__ import annotations

import enum
import textwrap

from wlidd.errors import WlidError


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
