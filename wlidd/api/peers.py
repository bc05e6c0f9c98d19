"""Who is calling: every way wlidd identifies a peer, for the HTTP listeners and the Workload API alike.
Long: every way a caller is identified (Unix credentials and groups, TCP owner lookup, caller cache) in one place.

Three kinds of peer, three sources of truth, all the kernel's or the TLS stack's, never the caller's word:

  - Unix sockets (the local API, the Workload API): SO_PEERCRED (pid, uid, gid) and SO_PEERGROUPS (the
    supplementary groups), both as they were when the caller called connect() (socket(7), unix(7)). These
    are the groups the kernel itself checks the process against: a process stripped of its groups
    (setgroups) has none, one given a group by systemd SupplementaryGroups= has it. Only where the kernel
    offers nothing (a kernel older than Linux 4.13 without SO_PEERGROUPS) do the groups come from the
    uid's passwd and group entries (`wlidd.accounts`, over NSS).
  - Loopback TCP (the metadata listener): the owner of the client's ESTABLISHED socket, from the kernel's
    socket table (below); its groups come from NSS.
  - TLS (the mTLS listener): the client certificate and the chain OpenSSL verified (`stream_peer`); the
    mTLS gate (wlidd.api.mtls) turns them into a SPIFFE ID.

`socket_caller` names an accepted socket's caller for the accept loop's connection caps (wlidd.api.accept);
`socket_peer` and `stream_peer` record what a connection's handler needs (`Peer`); `CallerCache` turns a
peer's credentials into a `wlidd.policy.Caller` (names and NSS groups resolved in a worker thread, cached),
on which the policy decides.

Loopback TCP peers in detail. A TCP peer carries no credentials, so the metadata listener asks the kernel
who owns the client's socket (the one whose local address is our remote address and whose remote address
is our local one). Only an ESTABLISHED socket with a non-zero inode is still held by a process. Once its owner closes it,
the socket is orphaned: inode 0 at once (sock_i_ino: no struct socket any more), and when its FIN is
acknowledged it becomes a FIN_WAIT2 or TIME_WAIT minisocket, which the kernel reports with uid 0
(net/ipv4/inet_diag.c inet_twsk_diag_fill, tcp_ipv4.c get_timewait4_sock). Such a socket must never be
taken for root, so the state and the inode are checked, never the uid alone.

Two ways to ask, same answer:

1. sock_diag (netlink(7) NETLINK_SOCK_DIAG, sock_diag(7)): one SOCK_DIAG_BY_FAMILY request with an
   `inet_diag_req_v2` naming the exact 4-tuple and no NLM_F_DUMP. The kernel looks the socket up in its
   established hash (net/ipv4/inet_diag.c inet_diag_find_one_icsk), O(1) whatever the number of
   connections, and answers one `inet_diag_msg` (state, uid, inode). Needs AF_NETLINK (the shipped unit's
   RestrictAddressFamilies= allows it) and no privilege.
2. /proc/self/net/tcp{,6} (proc(5)), when netlink is refused: a listing of every TCP socket of the
   network namespace, for which the kernel walks its whole established hash. /proc/self/net, never /proc/net: under systemd's ProcSubset=pid the
   /proc/net symlink is hidden while /proc/self/net (a per-process directory) stays visible.

Measured on a 2-core VM (Linux 6.18, 262,144-bucket TCP hash), per call: sock_diag ~18 µs found or not;
/proc ~2.5 ms found in tcp, ~9.5 ms not found (tcp and tcp6 read whole): the kernel walks its whole
established hash for every read, whatever the number of connections. So: sock_diag inline on the event
loop, /proc in a worker thread (`lookup_is_cheap` says which applies).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSAttribute

from wlidd.accounts import account_by_uid, member_of, user_name
from wlidd.errors import PeerRefused
from wlidd.logs import get_logger
from wlidd.policy import Caller
from wlidd.svid.spiffeid import parse_spiffe_id

log = get_logger("wlidd.authz")

# ---- Unix sockets: the kernel's credentials ---------------------------------------------------------

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13 (include/uapi/asm-generic/socket.h)
_GROUPS_MAX = 65536  # NGROUPS_MAX on Linux (include/uapi/linux/limits.h)
_peergroups_missing_logged = False


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix socket peer, from SO_PEERCRED; None for other families."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The supplementary groups of a Unix socket's peer as the kernel recorded them at connect()
    (SO_PEERGROUPS: an array of gid_t). None when the kernel offers nothing: not a Unix socket, or a
    kernel without SO_PEERGROUPS (then callers fall back to NSS groups, see `unix_caller`).

    getsockopt(2) fails with ERANGE when the buffer is too small and then reports the size needed;
    Python's socket.getsockopt caps its buffer at 1024 bytes (256 groups), so a peer with more groups
    is read again through libc. A read that still fails gives no supplementary groups at all: group
    rights are never granted on a guess.
    """
    global _peergroups_missing_logged
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno == errno.ERANGE:
            return _peer_groups_libc(sock.fileno())
        if exc.errno != errno.ENOPROTOOPT:
            return frozenset()  # the peer is gone (ENOTCONN …): nothing to grant
        if not _peergroups_missing_logged:
            _peergroups_missing_logged = True
            log.warning("the kernel has no SO_PEERGROUPS (Linux < 4.13): callers' groups come from NSS instead")
        return None
    count = len(raw) // 4
    return frozenset(struct.unpack(f"={count}I", raw[: count * 4]))


def _peer_groups_libc(fd: int) -> frozenset[int]:
    """SO_PEERGROUPS for a peer with more than 256 groups, through libc getsockopt (see peer_groups)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = ctypes.c_uint32(_GROUPS_MAX * 4)
        buffer = (ctypes.c_uint32 * _GROUPS_MAX)()
        if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return frozenset(buffer[: size.value // 4])
    except (OSError, AttributeError) as exc:
        log.warning("cannot read a caller's groups; it is granted no group rights", error=str(exc))
        return frozenset()


# ---- a connection's peer, as its handler sees it -----------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """Who is calling: Unix peer credentials (SO_PEERCRED) and/or a TLS peer's SPIFFE ID."""

    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    address: str = ""
    spiffe_id: str | None = None
    certificate: bytes | None = field(default=None, repr=False)  # a TLS peer's leaf, DER
    verified_chain: tuple[bytes, ...] = field(default=(), repr=False)  # leaf … anchor, as OpenSSL verified it
    tcp_remote: tuple[str, int] | None = None  # a TCP peer: its address, and ours, to find its uid on loopback
    tcp_local: tuple[str, int] | None = None
    groups: frozenset[int] | None = None  # a Unix peer's supplementary groups (SO_PEERGROUPS); None: unknown
    inode: int | None = None  # a loopback TCP peer's socket inode found at accept (with uid: its owner then)


def stream_peer(stream: ByteStream) -> Peer:
    """Who is on the other end: SO_PEERCRED for Unix sockets, the certificate for TLS."""
    try:
        der = stream.extra(TLSAttribute.peer_certificate_binary)
    except anyio.TypedAttributeLookupError:
        return unix_peer(stream)
    try:
        address = str(stream.extra(SocketAttribute.remote_address))
    except anyio.TypedAttributeLookupError:
        address = ""
    return Peer(address=address, certificate=der, verified_chain=verified_chain(stream.extra(TLSAttribute.ssl_object)))


def verified_chain(ssl_object: ssl.SSLObject) -> tuple[bytes, ...]:
    """The peer chain OpenSSL verified, leaf to anchor, DER (public API from Python 3.13; before, the
    same method on the private _sslobj)."""
    getter = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    if getter is None:
        return ()
    chain = getter() or []
    der = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009  (the _ssl.Certificate encoding constant)
    return tuple(c if isinstance(c, bytes) else c.public_bytes(der) for c in chain)


def unix_peer(stream: ByteStream) -> Peer:
    """`socket_peer` of the stream's socket (an empty Peer for a stream without one)."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return Peer()
    return socket_peer(sock)


def socket_peer(sock: socket.socket) -> Peer:
    """Who is on the other end of an accepted socket: a Unix peer's kernel credentials (SO_PEERCRED,
    SO_PEERGROUPS: both as of its connect()); a TCP peer's addresses (its uid is looked up from the
    socket table, below). Raises OSError when the peer is already gone."""
    creds = peer_credentials(sock)
    if creds is None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            remote, local = sock.getpeername(), sock.getsockname()
            return Peer(
                address=f"{remote[0]}:{remote[1]}", tcp_remote=(remote[0], remote[1]), tcp_local=(local[0], local[1])
            )
        return Peer()
    pid, uid, gid = creds
    return Peer(uid=uid, gid=gid, pid=pid, address=f"pid={pid},uid={uid}", groups=peer_groups(sock))


# ---- loopback TCP: the owner of the client's socket ----------------------------------------------------

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
    answer (for good once netlink is refused). Synchronous; see the module docstring for costs. Raises
    OSError only when neither way can answer (netlink refused and `proc_net` unreadable): refuse then.
    """
    if _sock_diag.usable:
        try:
            return TcpPeerLookup(remote, _sock_diag.lookup(remote, local))
        except OSError as exc:
            if not _sock_diag.answered and exc.errno != errno.ENOENT:
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


# ---- at accept: who a connection is counted against ----------------------------------------------------


@dataclass(frozen=True)
class CallerKey:
    """Who a connection is counted against: a uid (local callers) or a remote address (other TCP peers).

    `inode` is the loopback client socket's inode found with its uid (not part of the key's identity
    for counting: compare=False). `unidentified` says why a loopback peer has no owner (refused)."""

    uid: int | None
    address: str = ""
    inode: int | None = field(default=None, compare=False)
    unidentified: str | None = field(default=None, compare=False)

    def describe(self) -> str:
        return f"uid {self.uid}" if self.uid is not None else (self.address or "unknown caller")


_LOOPBACK = ("127.", "::1", "::ffff:127.")


async def socket_caller(sock: socket.socket) -> CallerKey:
    """The caller of an accepted socket: SO_PEERCRED's uid on Unix sockets; on loopback TCP the uid
    owning the client's ESTABLISHED socket (sock_diag inline, microseconds; the /proc fallback in a
    worker thread, milliseconds); otherwise the remote address. A loopback peer whose socket has no
    owner any more (closed, half-closed) is counted as "loopback:unowned", without a uid; a peer
    that is gone altogether comes back `unidentified`, to be refused."""
    creds = peer_credentials(sock)
    if creds is not None:
        return CallerKey(creds[1])
    try:
        remote, local = sock.getpeername(), sock.getsockname()
    except OSError:
        return CallerKey(None, "gone", unidentified="the peer closed before it was accepted")
    host = str(remote[0])
    if not host.startswith(_LOOPBACK):
        return CallerKey(None, host)
    found = await run_lookup(lookup_tcp_peer, (host, int(remote[1])), (str(local[0]), int(local[1])))
    owner = found.owner
    if owner is None:
        # Closed or half-closed already: no owner to count it against or to authorize. It shares one
        # bucket with its kind (capped like a caller) and carries no uid, so whatever needs an identity
        # (a token) is refused by the handler's own lookup; public answers (a ping) still work.
        return CallerKey(None, "loopback:unowned")
    return CallerKey(owner.uid, inode=owner.inode)


# ---- callers: a peer's credentials resolved for the policy ---------------------------------------------


def unix_caller(pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
    """A caller from its kernel credentials. `groups` are its supplementary groups from SO_PEERGROUPS
    (the kernel's own, see `peer_groups`); its gid is always one of its groups. With `groups` None (a
    TCP peer, or a kernel without SO_PEERGROUPS) they are resolved from the passwd entry over NSS (a
    user without one has only its gid); with no gid either (a TCP peer), the passwd entry's primary
    group stands in. The user name is looked up in every case, for messages and audit lines only.
    Blocks on NSS: `CallerCache` runs it in a worker thread."""
    if groups is not None:
        assert gid is not None, "kernel groups come with the kernel's gid"
        return Caller(uid=uid, gid=gid, pid=pid, groups=groups | {gid}, user=user_name(uid))
    account = account_by_uid(uid)
    if account is None:
        gid = uid if gid is None else gid
        return Caller(uid=uid, gid=gid, pid=pid, groups=frozenset({gid}), user=str(uid))
    gid = account.pw_gid if gid is None else gid
    return Caller(uid=uid, gid=gid, pid=pid, groups=member_of(account.pw_name, gid), user=account.pw_name)


@dataclass(frozen=True)
class Credentials:
    """A caller's credentials as a cache key: everything the kernel said of a Unix peer (pid, uid, gid,
    SO_PEERGROUPS), or a TCP peer's uid alone (pid, gid and groups None: NSS decides the rest)."""

    pid: int | None
    uid: int
    gid: int | None
    groups: frozenset[int] | None


@dataclass(frozen=True)
class CachedCaller:
    """A resolved caller and the monotonic time (seconds) after which it is resolved again."""

    expires: float
    caller: Caller


@dataclass(frozen=True)
class CachedName:
    """A uid's user name and the monotonic time (seconds) after which it is looked up again."""

    expires: float
    user: str


_K = TypeVar("_K")
_V = TypeVar("_V")


class CallerCache:
    """Callers by their credentials, resolved in a worker thread (passwd/group lookups may go over NSS:
    a syscall or a network round trip) and kept for `ttl` seconds (of `clock`, monotonic by default).

    A caller with kernel groups (Unix sockets) is keyed by everything the kernel said (pid, uid, gid,
    groups): two processes of one uid with different groups are different callers. Only the user name
    is shared per uid. A caller without (TCP) is keyed by (uid, gid) and gets NSS groups. Every table
    holds at most `max_entries` (cleared when full: each entry is cheap to resolve again).
    """

    def __init__(self, ttl: float = 60.0, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._nss: dict[Credentials, CachedCaller] = {}  # (uid, gid) -> NSS-resolved caller
        self._names: dict[int, CachedName] = {}  # uid -> user name
        self._callers: dict[Credentials, CachedCaller] = {}  # everything the kernel said -> caller

    async def get(self, pid: int | None, uid: int, gid: int | None, groups: frozenset[int] | None = None) -> Caller:
        """The caller with these credentials; `groups` from SO_PEERGROUPS, or None to resolve them over NSS."""
        now = self.clock()
        key = Credentials(pid, uid, gid, groups)
        known = self._callers.get(key)
        if known is not None and known.expires >= now:
            return known.caller  # the hot path: the same process asking again
        if groups is not None and gid is not None:
            named = self._names.get(uid)
            if named is None or named.expires < now:
                resolved = await anyio.to_thread.run_sync(unix_caller, pid, uid, gid, groups)
                named = CachedName(now + self.ttl, resolved.user)
                self._remember(self._names, uid, named)
            caller = Caller(uid=uid, gid=gid, pid=pid, groups=groups | {gid}, user=named.user)
            expires = named.expires
        else:
            nss_key = Credentials(None, uid, gid, None)
            hit = self._nss.get(nss_key)
            if hit is None or hit.expires < now:
                hit = CachedCaller(now + self.ttl, await anyio.to_thread.run_sync(unix_caller, pid, uid, gid))
                self._remember(self._nss, nss_key, hit)
            caller = Caller(uid=uid, gid=hit.caller.gid, pid=pid, groups=hit.caller.groups, user=hit.caller.user)
            expires = hit.expires
        self._remember(self._callers, key, CachedCaller(expires, caller))
        return caller

    async def caller_of(self, peer: Peer) -> Caller:
        """The caller behind a request's `peer`: an mTLS peer by its SPIFFE ID (admitted by the mTLS gate,
        which set it; no lookup), a Unix peer by its kernel credentials (`get`), anyone else by its
        address alone (the policy grants it nothing that needs an identity)."""
        if peer.spiffe_id is not None:
            return Caller(spiffe_id=parse_spiffe_id(peer.spiffe_id), address=peer.address)
        if peer.uid is None or peer.gid is None or peer.pid is None:
            return Caller(address=peer.address)
        return await self.get(peer.pid, peer.uid, peer.gid, peer.groups)  # kernel groups

    def _remember(self, table: dict[_K, _V], key: _K, value: _V) -> None:
        if len(table) >= self.max_entries and key not in table:  # pids come and go: keep this bounded
            table.clear()
        table[key] = value
