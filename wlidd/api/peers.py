"""Who is calling: every way wlidd identifies a peer, for the HTTP listeners and the Workload API alike.

Three kinds of peer, three sources of truth, all the kernel's or the TLS stack's, never the caller's word:

  - Unix sockets (the local API, the Workload API): SO_PEERCRED (pid, uid, gid) and SO_PEERGROUPS (the
    supplementary groups), both as they were when the caller called connect() (wlidd.api.peer_credentials);
    for rules on units, executables and sha256, its process through a pidfd (wlidd.workload.proc).
  - Loopback TCP (the metadata listener): the owner of the client's ESTABLISHED socket, from the kernel's
    socket table (wlidd.api.tcp_owner); its groups come from NSS.
  - TLS (the mTLS listener): the client certificate and the chain OpenSSL verified (`stream_peer`); the
    mTLS gate (wlidd.api.mtls) turns them into a SPIFFE ID.

`socket_caller` names an accepted socket's caller for the accept loop's connection caps (wlidd.api.accept);
`socket_peer` and `stream_peer` record what a connection's handler needs (`Peer`); wlidd.api.callers turns
a peer's credentials into a `wlidd.policy.Caller`, on which the policy decides.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSAttribute

from wlidd.api.peer_credentials import peer_credentials, peer_groups
from wlidd.api.tcp_owner import lookup_tcp_peer, run_lookup
from wlidd.workload.proc import PROCESSES, PeerProcess


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
    # a Unix peer's process, as accepted: read only if a rule selects on it (wlidd.workload.proc)
    process: PeerProcess | None = field(default=None, compare=False, repr=False)


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
    SO_PEERGROUPS: both as of its connect()) and its process as accepted (the socket, the pid, the time:
    nothing of /proc is read unless a rule needs it, wlidd.workload.proc); a TCP peer's addresses (its
    uid is looked up from the socket table, below). Raises OSError when the peer is already gone."""
    creds = peer_credentials(sock)
    if creds is None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            remote, local = sock.getpeername(), sock.getsockname()
            return Peer(
                address=f"{remote[0]}:{remote[1]}", tcp_remote=(remote[0], remote[1]), tcp_local=(local[0], local[1])
            )
        return Peer()
    pid, uid, gid = creds
    process = PROCESSES.accepted(sock, pid)
    return Peer(uid=uid, gid=gid, pid=pid, address=f"pid={pid},uid={uid}", groups=peer_groups(sock), process=process)


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
