"""The systemd protocols (SPECS.md §6): sd_notify, the watchdog, socket activation, journald detection.

Our own few lines (the PyPI packages are stale or need C builds):
  Notifier.send()   one datagram per message to $NOTIFY_SOCKET ('@' = abstract namespace); send errors ignored.
                    READY=1, RELOADING=1, STOPPING=1 and STATUS= are the lifecycle's to send (wlidd.lifecycle:
                    a table of the allowed transitions); WATCHDOG=1 is the watchdog's (`watchdog()`)
  watchdog_period() half of $WATCHDOG_USEC when $WATCHDOG_PID is unset or ours, else None
  listen_fds()      {name: socket} from $LISTEN_FDS/$LISTEN_FDNAMES when $LISTEN_PID is ours (fds from 3);
                    the variables are removed after use so children do not inherit them
  journald_stderr() True when stderr is the journal stream ($JOURNAL_STREAM = "dev:ino" of fd 2)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; a no-op when not run by systemd (no $NOTIFY_SOCKET)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        self._socket: socket.socket | None = None

    def send(self, **fields: str | int) -> None:
        """One datagram of KEY=VALUE lines, e.g. send(READY=1, STATUS="serving")."""
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self.address)
        except OSError:
            pass  # sd_notify(3): failures to notify are not the service's failures

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_period(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the configured timeout), or None without a watchdog."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid if pid is not None else os.getpid()):
        return None
    return int(usec) / 2_000_000


def listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by FileDescriptorName (default name: "unknown")."""
    env = os.environ if environ is None else environ
    try:
        if env.get("LISTEN_PID") != str(pid if pid is not None else os.getpid()):
            return {}
        count = int(env.get("LISTEN_FDS", "0"))
        names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    except ValueError:
        return {}
    finally:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    sockets: dict[str, socket.socket] = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            sockets[name] = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (a FIFO or a special file from a unit): not ours to use
    return sockets


def journald_stderr(environ: Mapping[str, str] | None = None) -> bool:
    """True when fd 2 is the journal's stream (systemd sets JOURNAL_STREAM to its "device:inode")."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)
