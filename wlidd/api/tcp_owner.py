"""A loopback TCP peer's owner: the uid (and socket inode) of the process holding the client's socket,
from the kernel's socket table. The metadata listener identifies its callers so.

A TCP peer carries no credentials, so the metadata listener asks the kernel who owns the client's socket
(the one whose local address is our remote address and whose remote address is our local one). Only an
ESTABLISHED socket with a non-zero inode is still held by a process. Once its owner closes it, the socket
is orphaned: inode 0 at once (sock_i_ino: no struct socket any more), and when its FIN is acknowledged it
becomes a FIN_WAIT2 or TIME_WAIT minisocket, which the kernel reports with uid 0 (net/ipv4/inet_diag.c
inet_twsk_diag_fill, tcp_ipv4.c get_timewait4_sock). Such a socket must never be taken for root, so the
state and the inode are checked, never the uid alone.

Two ways to ask, same answer:

1. sock_diag (netlink(7) NETLINK_SOCK_DIAG, sock_diag(7)): one SOCK_DIAG_BY_FAMILY request with an
   `inet_diag_req_v2` naming the exact 4-tuple and no NLM_F_DUMP. The kernel looks the socket up in its
   established hash (net/ipv4/inet_diag.c inet_diag_find_one_icsk), O(1) whatever the number of
   connections, and answers one `inet_diag_msg` (state, uid, inode). Needs AF_NETLINK (the shipped unit's
   RestrictAddressFamilies= allows it) and no privilege.
2. /proc/self/net/tcp{,6} (proc(5)), when netlink is refused: a listing of every TCP socket of the
   network namespace, for which the kernel walks its whole established hash. /proc/self/net, never
   /proc/net: under systemd's ProcSubset=pid the /proc/net symlink is hidden while /proc/self/net (a
   per-process directory) stays visible.

Measured on a 2-core VM (Linux 6.18, 262,144-bucket TCP hash), per call: sock_diag ~18 µs found or not;
/proc ~2.5 ms found in tcp, ~9.5 ms not found (tcp and tcp6 read whole): the kernel walks its whole
established hash for every read, whatever the number of connections. So: sock_diag inline on the event
loop, /proc in a worker thread (`lookup_is_cheap` says which applies).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from wlidd.errors import PeerRefused

# Failures that say this process (or the system) is out of descriptors or memory: nothing about the socket
# asked for, nor about whether netlink works here (a lookup then fails; the next one may not).
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

TCP_ESTABLISHED = 1
# include/net/tcp_states.h
_STATE_NAMES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}

# include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order); then if + cookie[2], host order
_SOCKID_TAIL = struct.Struct("=III")
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_MSG_SIZE = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size  # 72

Address = tuple[str, int]
_T = TypeVar("_T")
_IpPort = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


@dataclass(frozen=True)
class TcpOwner:
    """The owner of an ESTABLISHED client socket: its uid (the socket inode's, set when the socket was
    made) and the socket's inode number (which identifies the socket while a process holds it)."""

    uid: int
    inode: int


@dataclass(frozen=True)
class TcpSocket:
    """What the kernel reports about one TCP socket; `via` names where the answer came from."""

    state: int
    uid: int
    inode: int
    via: str

    @property
    def state_name(self) -> str:
        return _STATE_NAMES.get(self.state, f"state {self.state}")

    @property
    def owner(self) -> TcpOwner | None:
        """The owner when a process still holds the socket (ESTABLISHED, non-zero inode), else None."""
        if self.state == TCP_ESTABLISHED and self.inode != 0:
            return TcpOwner(self.uid, self.inode)
        return None


@dataclass(frozen=True)
class TcpPeerLookup:
    """The outcome of one lookup: the client's socket as the kernel reports it, if found."""

    remote: Address
    socket: TcpSocket | None

    @property
    def owner(self) -> TcpOwner | None:
        return self.socket.owner if self.socket is not None else None

    def reason(self) -> str:
        """Why there is no owner, for a 403 and the audit log (no secret: addresses and states only)."""
        address = _format(self.remote)
        found = self.socket
        if found is None:
            return f"the calling socket {address} is not in this network namespace's TCP table (closed, or another namespace)"
        if found.state != TCP_ESTABLISHED:
            return (
                f"the calling socket {address} is {found.state_name}, not ESTABLISHED: its owner closed or shut it "
                "down, so it has no owner to authorize"
            )
        if found.inode == 0:
            return f"the calling socket {address} is held by no process (inode 0), so it has no owner to authorize"
        return f"the calling socket {address} has an owner"  # not a refusal; kept total for callers


def _format(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address with IPv4-mapped IPv6 (::ffff:a.b.c.d) unwrapped, so both spellings compare equal."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# ---- sock_diag ------------------------------------------------------------------------------------


class _SockDiag:
    """NETLINK_SOCK_DIAG exact lookups. `usable` turns False for good when netlink is refused (no
    AF_NETLINK under RestrictAddressFamilies=, a seccomp filter); the caller then reads /proc."""

    def __init__(self) -> None:
        self.usable = True
        self.answered = False  # an answer proves inet_diag works here, so ENOENT then means "no such socket"

    def lookup(self, remote: Address, local: Address) -> TcpSocket | None:
        """The client's socket, or None when the kernel has none. Raises OSError when netlink cannot
        answer (the caller falls back to /proc)."""
        found = self._query(remote, local)
        if found is None and not self.answered and self._query(local, remote) is None:
            # Not even our own end of the connection: inet_diag does not answer here (no tcp_diag).
            raise OSError(errno.ENOENT, "sock_diag finds no TCP socket at all")
        return found

    def _query(self, source: Address, destination: Address) -> TcpSocket | None:
        """The socket whose local address is `source` and remote `destination`; None on ENOENT."""
        src, dst = _ip(source[0]), _ip(destination[0])
        family = socket.AF_INET if src.version == 4 and dst.version == 4 else socket.AF_INET6
        payload = (
            _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + _SOCKID.pack(source[1], destination[1], _packed(src, family), _packed(dst, family))
            + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        )
        message = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + payload
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)  # the kernel answers within sendto(); this only guards against a surprise
            nl.sendto(message, (0, 0))
            data = nl.recv(8192)
        return self._parse(data, (src, source[1]), (dst, destination[1]))

    def _parse(self, data: bytes, source: _IpPort, destination: _IpPort) -> TcpSocket | None:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                break
            body = offset + _NLMSGHDR.size
            offset += (length + 3) & ~3
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, body)
                if code == -errno.ENOENT:
                    return None  # no socket with this 4-tuple (or, before any answer, no inet_diag)
                raise OSError(-code, f"sock_diag answered {errno.errorcode.get(-code, str(-code))}")
            if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + _MSG_SIZE:
                continue
            family, state, _timer, _retrans = _MSG_HEAD.unpack_from(data, body)
            sport, dport, src, dst = _SOCKID.unpack_from(data, body + _MSG_HEAD.size)
            at = body + _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size
            _expires, _rqueue, _wqueue, uid, inode = _MSG_TAIL.unpack_from(data, at)
            self.answered = True
            # The kernel's lookup falls back to listening sockets: only the exact 4-tuple is the one asked for.
            if ((_unpacked(src, family), sport), (_unpacked(dst, family), dport)) != (source, destination):
                return None
            return TcpSocket(state=state, uid=uid, inode=inode, via="sock_diag")
        raise OSError(errno.EPROTO, "sock_diag answered nothing usable")


def _packed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, family: int) -> bytes:
    """An address as inet_diag_sockid holds it: 16 bytes, IPv4 in the first 4, IPv4-mapped for AF_INET6."""
    if family == socket.AF_INET:
        return ip.packed.ljust(16, b"\0")
    if ip.version == 4:
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed
    return ip.packed


def _unpacked(raw: bytes, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return _ip(str(ipaddress.IPv6Address(raw)))


_sock_diag = _SockDiag()


# ---- /proc/self/net ------------------------------------------------------------------------------


def _proc_net_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, *, v6: bool) -> str:
    """An address as /proc/net/tcp{,6} writes it: the address as 32-bit words in host order, hex, ':',
    the port in hex (net/ipv4/tcp_ipv4.c get_tcp4_sock, net/ipv6/tcp_ipv6.c get_tcp6_sock)."""
    packed = ip.packed
    if v6 and ip.version == 4:
        packed = b"\0" * 10 + b"\xff\xff" + packed
    words = "".join(f"{struct.unpack('=I', packed[i : i + 4])[0]:08X}" for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"


def proc_lookup(remote: Address, local: Address, proc_net: str = "/proc/self/net") -> TcpSocket | None:
    """The client's socket from `proc_net`/tcp and tcp6 (an IPv4 client may hold a dual-stack IPv6
    socket), or None when neither lists it. Raises OSError when neither table can be read."""
    src, dst = _ip(remote[0]), _ip(local[0])
    tables = ["tcp", "tcp6"] if src.version == 4 and dst.version == 4 else ["tcp6"]
    readable = False
    for table in tables:
        v6 = table == "tcp6"
        wanted = (_proc_net_address(src, remote[1], v6=v6), _proc_net_address(dst, local[1], v6=v6))
        try:
            with open(f"{proc_net}/{table}", encoding="ascii", errors="replace") as handle:
                readable = True
                next(handle, None)  # the header line
                for line in handle:
                    fields = line.split()
                    # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …
                    if len(fields) >= 10 and (fields[1], fields[2]) == wanted:
                        return TcpSocket(
                            state=int(fields[3], 16),
                            uid=int(fields[7]),
                            inode=int(fields[9]),
                            via=f"{proc_net}/{table}",
                        )
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    if not readable:
        raise OSError(errno.ENOENT, f"neither {proc_net}/tcp nor {proc_net}/tcp6 can be read")
    return None


# ---- the API -------------------------------------------------------------------------------------


def lookup_tcp_peer(remote: Address, local: Address, *, proc_net: str = "/proc/self/net") -> TcpPeerLookup:
    """The kernel's view of the client end of a loopback TCP connection we accepted.

    `remote` is the peer's address as our socket sees it (getpeername), `local` ours (getsockname); both
    must be IP addresses (ValueError otherwise). Tries sock_diag first, and /proc when netlink cannot
    answer (for good once netlink is refused; not for a failure of OUT_OF_RESOURCES, which says nothing
    about netlink). Synchronous; see the module docstring for costs. Raises OSError only when neither way
    can answer (netlink refused and `proc_net` unreadable, or out of descriptors): refuse then.
    """
    if _sock_diag.usable:
        try:
            return TcpPeerLookup(remote, _sock_diag.lookup(remote, local))
        except OSError as exc:
            if not _sock_diag.answered and exc.errno != errno.ENOENT and exc.errno not in OUT_OF_RESOURCES:
                _sock_diag.usable = False  # refused here (EAFNOSUPPORT, EPERM): do not pay for it again
    return TcpPeerLookup(remote, proc_lookup(remote, local, proc_net))


def lookup_is_cheap() -> bool:
    """True while lookups go through sock_diag (microseconds, fine inline on the event loop); False once
    they read /proc (milliseconds: run them in a worker thread)."""
    return _sock_diag.usable


async def run_lookup(lookup: Callable[..., _T], *args: Any) -> _T:
    """Run a lookup of this module where it belongs: inline while it is a sock_diag query
    (microseconds), in a worker thread once it reads /proc (milliseconds: it must not block the loop)."""
    if lookup_is_cheap():
        return lookup(*args)
    return await anyio.to_thread.run_sync(lookup, *args)


def tcp_peer_owner(remote: Address, local: Address) -> TcpOwner | None:
    """The owner (uid, inode) of the client end of a loopback TCP connection, or None when no process
    holds an ESTABLISHED socket with that 4-tuple (closed, half-closed, TIME_WAIT, gone, or the table
    cannot be read). Meant for accept time, and again before answering; see `lookup_tcp_peer` for the
    arguments and `lookup_is_cheap` for where to run it."""
    try:
        return lookup_tcp_peer(remote, local).owner
    except OSError:
        return None


def verify_tcp_peer(remote: Address, local: Address, expected: TcpOwner | int | None = None) -> TcpOwner:
    """The current owner of the client end of a loopback TCP connection, which must be ESTABLISHED and
    held by a process; with `expected` (an owner found earlier, or just its uid when the inode is not
    known), also the same uid and inode. Raises PeerRefused otherwise. Same costs as `lookup_tcp_peer`."""
    try:
        found = lookup_tcp_peer(remote, local)
    except OSError as exc:
        raise PeerRefused(
            f"the owner of the calling socket {_format(remote)} cannot be looked up: {exc.strerror or exc}"
        ) from None
    owner = found.owner
    if owner is None:
        raise PeerRefused(found.reason())
    if expected is not None:
        uid, inode = (expected.uid, expected.inode) if isinstance(expected, TcpOwner) else (expected, owner.inode)
        if (owner.uid, owner.inode) != (uid, inode):
            raise PeerRefused(f"the calling socket {_format(remote)} changed owner since it was identified")
    return owner
