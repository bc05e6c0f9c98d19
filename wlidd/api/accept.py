"""One accept loop for every listener: connections are counted from accept, before TLS or HTTP/2.

Why our own loop (and not anyio's `Listener.serve` or asyncio's `create_server`): a local attacker can
open connections faster than anything above accept() can refuse them, so the limits must apply to the
raw socket, and the failures of accept() itself must never end the loop.

  - EMFILE/ENFILE/ENOBUFS/ENOMEM from accept() are transient: logged once per episode (with a count when
    it ends), backed off (10 ms doubling to 1 s), retried. The pending connection waits in the backlog.
  - Each accepted socket is attributed to a caller (`CallerKey`, from `wlidd.api.peers.socket_caller`:
    the uid from SO_PEERCRED on Unix sockets or from the owning socket on loopback TCP, which must be
    ESTABLISHED and held by a process — else it carries no uid and handlers refuse it whatever needs
    one; the remote address for other TCP peers) and admitted only under both caps: `max_connections`
    for the listener and `max_per_caller` for that caller. At the listener's cap, an idle connection
    (the oldest of the caller holding the most) is closed to make room, where the protocol allows it
    (HTTP/1.1). Refused sockets get an optional short answer (e.g. an HTTP 503) and are closed at once,
    so the descriptors held never exceed the caps.
  - A caller that cannot be identified is refused too: `out_of_resources` when its lookup ran out of
    descriptors or memory (EMFILE … while asking the kernel who owns a loopback socket: logged once per
    episode, with a count when callers are identified again), `unidentified` for any other failure.
  - The loop's liveness is public (`alive`, `failure`): a loop that died on an unexpected error is a
    liveness failure for the daemon's watchdog, never a silent state.

The counting core (`ConnectionCounter`) is pure and bounded: one entry per caller with an open
connection.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus

from wlidd.api.peers import CallerKey, socket_caller
from wlidd.api.tcp_owner import OUT_OF_RESOURCES
from wlidd.logs import get_logger
from wlidd.status import ListenerStatus

log = get_logger("wlidd.api")

# accept() failures that say "not now" (descriptor or memory exhaustion), not "this listener is broken".
TRANSIENT_ACCEPT_ERRORS = OUT_OF_RESOURCES
# accept() failures that concern only the one connection being accepted (it went away first, …).
CONNECTION_ACCEPT_ERRORS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN, errno.EINTR, errno.ENETDOWN, errno.EHOSTUNREACH}
)
BACKOFF_MIN = 0.01  # seconds: the first pause after a transient accept failure
BACKOFF_MAX = 1.0  # seconds: the longest pause
ACCEPT_BATCH = 64  # connections accepted per wake-up before other tasks run
SHED_WAIT = 0.5  # seconds to wait for a shed connection's slot before admitting over the cap
UNKNOWN = CallerKey(None, "unknown caller")  # a caller whose identification failed


@dataclass(frozen=True)
class Refusal:
    """Why a connection was refused: a stable reason (metric label) and a message (log line)."""

    reason: str  # "listener_full" | "caller_full" | "unidentified" | "out_of_resources"
    message: str


class ConnectionCounter:
    """Open connections of one listener, in total and per caller; decides admission (pure, no I/O).

    Bounded: the per-caller table only holds callers with at least one open connection, so it never
    has more than `max_connections` entries.
    """

    def __init__(self, max_connections: int, max_per_caller: int) -> None:
        self.max_connections = max_connections
        self.max_per_caller = min(max_per_caller, max_connections)
        self.total = 0
        self.per_caller: dict[CallerKey, int] = {}

    def admit(self, key: CallerKey, *, room_made: bool = False) -> Refusal | None:
        """Count a new connection of `key`, or say why not (nothing is counted then). `room_made`: an
        idle connection is being closed for this one, so the caps may be passed by one while it closes."""
        held = self.per_caller.get(key, 0)
        if held >= self.max_per_caller and not room_made:
            return Refusal(
                "caller_full", f"{key.describe()} already holds {held} connections (limit {self.max_per_caller})"
            )
        if self.total >= self.max_connections and not room_made:
            return Refusal(
                "listener_full", f"the listener holds {self.total} connections (limit {self.max_connections})"
            )
        self.total += 1
        self.per_caller[key] = held + 1
        return None

    def release(self, key: CallerKey) -> None:
        """One connection of `key` closed."""
        held = self.per_caller.get(key, 0)
        if held <= 1:
            self.per_caller.pop(key, None)
        else:
            self.per_caller[key] = held - 1
        self.total = max(0, self.total - 1)


Identify = Callable[[socket.socket], Awaitable[CallerKey]]  # raises OSError when the caller cannot be identified
Handle = Callable[[socket.socket, CallerKey], Awaitable[None]]
Refuse = Callable[[socket.socket, Refusal], bytes]


class AcceptLoop:
    """Accepts connections from one listening socket and runs `handle(sock, caller)` for each admitted one.

    `handle` owns the connection while it runs (TLS, HTTP, HTTP/2, deadlines); when it returns, the
    socket is closed and the caller's count released. `refuse(sock, refusal)` returns the bytes sent
    to a refused connection before it is closed (b"" for none); it must not block.
    """

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        handle: Handle,
        *,
        max_connections: int,
        max_per_caller: int,
        identify: Identify = socket_caller,
        refuse: Refuse | None = None,
        shed: Callable[[CallerKey | None], Awaitable[bool]] | None = None,
        metrics: Any = None,
    ) -> None:
        self.name = name
        self.sock = sock
        self.handle = handle
        self.identify = identify
        self.refuse = refuse
        self.shed = shed  # closes one idle connection (the caller's, or anyone's with None): True if it did
        self.metrics = metrics
        self.counter = ConnectionCounter(max_connections, max_per_caller)
        self.alive = False
        self.failure: str | None = None
        self.accepted = 0
        self.refused = 0
        self._unidentifiable = 0  # callers refused in a row as their lookup ran out of resources
        self._stopped = False

    def status(self) -> ListenerStatus:
        """The loop's state for /v1/status: alive, open connections and the caps (the address is the
        listener's: wlidd.api.listener_set)."""
        counter = self.counter
        return ListenerStatus(
            None,
            self.alive,
            self.failure,
            counter.total,
            len(counter.per_caller),
            counter.max_connections,
            counter.max_per_caller,
            self.accepted,
            self.refused,
        )

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections already admitted run on)."""
        self._stopped = True
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)  # wakes the loop's wait_readable with ClosedResourceError
            self.sock.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept until stopped or cancelled; connections run in this loop's task group.

        Never raises for accept() failures: transient ones are retried, an unexpected one marks the loop
        dead (`alive` False, `failure` set, logged) and ends accepting.
        """
        self.sock.setblocking(False)
        self._set_alive(True)
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                try:
                    await self._accept_forever(tg)
                except Exception as exc:  # the loop is dead: say so, loudly, and let the watchdog see it
                    self.failure = f"{type(exc).__name__}: {exc}"
                    log.error("listener accept loop died", listener=self.name, error=self.failure)
                finally:
                    self._set_alive(False)
        finally:
            self._set_alive(False)

    def _set_alive(self, alive: bool) -> None:
        self.alive = alive
        if self.metrics is not None:
            self.metrics.listener_up.labels(self.name).set(1 if alive else 0)

    async def _accept_forever(self, tg: anyio.abc.TaskGroup) -> None:
        backoff = 0.0
        exhausted_since: float | None = None
        exhausted_count = 0
        while not self._stopped:
            try:
                await anyio.wait_readable(self.sock)
            except (anyio.ClosedResourceError, ValueError, OSError):
                if self._stopped or self.sock.fileno() < 0:
                    return  # the listener was closed on purpose
                raise
            if self._stopped:
                return
            for _ in range(ACCEPT_BATCH):  # drain the kernel's queue: one wake-up, many connections
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in TRANSIENT_ACCEPT_ERRORS:
                        exhausted_count += 1
                        if exhausted_since is None:
                            exhausted_since = time.monotonic()
                            log.limited(  # episodes can come many a second: repeats are counted (wlidd.logs)
                                "error",
                                "cannot accept connections: out of resources; backing off and retrying",
                                key={"listener": self.name},
                                error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                                open_connections=self.counter.total,
                            )
                        self._count_error(exc.errno or 0)
                        backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, backoff * 2))
                        await anyio.sleep(backoff)
                        break
                    if exc.errno in CONNECTION_ACCEPT_ERRORS:
                        continue
                    if self._stopped or exc.errno == errno.EBADF:
                        return
                    raise
                if exhausted_since is not None:
                    log.limited(
                        "warning",
                        "accepting connections again",
                        key={"listener": self.name},
                        failed_accepts=exhausted_count,
                        seconds=round(time.monotonic() - exhausted_since, 3),
                    )
                    exhausted_since, exhausted_count, backoff = None, 0, 0.0
                await self._admit(conn, tg)

    async def _admit(self, conn: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        try:
            conn.setblocking(False)
            key = await self.identify(conn)
        except OSError as exc:
            self._refuse_unidentifiable(conn, exc)
            return
        if self._unidentifiable:
            log.warning("identifying callers again", listener=self.name, refused=self._unidentifiable)
            self._unidentifiable = 0
        if key.unidentified is not None:
            self._refuse(conn, key, Refusal("unidentified", key.unidentified))
            return
        refusal = self.counter.admit(key)
        # Make room by closing an idle connection: the caller's own at its cap, anyone's (the biggest
        # holder's) at the listener's.
        if (
            refusal is not None
            and self.shed is not None
            and await self.shed(key if refusal.reason == "caller_full" else None)
        ):
            # The shed connection's slot is released when its task ends (a moment later): wait for it,
            # so the counts never pass the caps; only if it lingers is the newcomer let in over them.
            with anyio.move_on_after(SHED_WAIT):
                while (refusal := self.counter.admit(key)) is not None:
                    await anyio.sleep(0.002)
            if refusal is not None:
                refusal = self.counter.admit(key, room_made=True)
            if self.metrics is not None:
                self.metrics.connections_shed.labels(self.name).inc()
        if refusal is not None:
            self._refuse(conn, key, refusal)
            return
        self.accepted += 1
        self._gauge()
        tg.start_soon(self._run_one, conn, key)

    def _refuse_unidentifiable(self, conn: socket.socket, exc: OSError) -> None:
        """Refuse a caller whose identification failed (the kernel lookup raised `exc`): out of descriptors
        or memory (OUT_OF_RESOURCES: EMFILE …) it is refused as `out_of_resources`, logged once per episode
        (then once more, with the count, when a caller is identified again); any other failure (the socket
        table unreadable) as `unidentified`."""
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        if code not in OUT_OF_RESOURCES:
            self._refuse(conn, UNKNOWN, Refusal("unidentified", f"the caller cannot be identified: {name}"))
            return
        if not self._unidentifiable:
            log.error(
                "cannot identify callers: out of resources; refusing them until resources are free",
                listener=self.name,
                error=name,
                open_connections=self.counter.total,
            )
        self._unidentifiable += 1
        message = f"the caller cannot be identified now ({name}: out of descriptors or memory); retry later"
        self._refuse(conn, UNKNOWN, Refusal("out_of_resources", message), logged=False)

    def _refuse(self, conn: socket.socket, key: CallerKey, refusal: Refusal, *, logged: bool = True) -> None:
        """Answer (`refuse`), close and count a refused connection; `logged`: a line (repeats counted)."""
        self.refused += 1
        try:
            answer = self.refuse(conn, refusal) if self.refuse is not None else b""
            if answer:
                conn.send(answer)  # non-blocking, best effort: a full buffer loses the answer, not the loop
        except OSError:
            pass
        finally:
            conn.close()
        if self.metrics is not None:
            self.metrics.connections_refused.labels(self.name, refusal.reason).inc()
        if logged:
            key_fields = {"listener": self.name, "reason": refusal.reason, "caller": key.describe()}
            log.limited("warning", "connection refused", key=key_fields, detail=refusal.message)  # repeats counted

    async def _run_one(self, conn: socket.socket, key: CallerKey) -> None:
        try:
            await self.handle(conn, key)
        except Exception as exc:  # a connection's failure never reaches the accept loop (repeats counted)
            fields = {"listener": self.name, "error_type": type(exc).__name__}
            log.limited("warning", "connection handler failed", key=fields)
        finally:
            if conn.fileno() >= 0:
                conn.close()
            self.counter.release(key)
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.connections_open.labels(self.name).set(self.counter.total)

    def _count_error(self, code: int) -> None:
        if self.metrics is not None:
            name = errno.errorcode.get(code, "other") if code in TRANSIENT_ACCEPT_ERRORS else "other"
            self.metrics.accept_errors.labels(self.name, name).inc()
