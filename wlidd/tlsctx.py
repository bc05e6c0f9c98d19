"""TLS 1.3 contexts built from a validated identity, and a server context that follows rotations.

Key material reaches OpenSSL through an anonymous memfd (never a file on disk) and no pass phrase
callback can prompt. `HotServerContext` is one long-lived SSLContext for listeners: its
`sni_callback` (called on every ClientHello, with or without SNI) switches the connection to the
current identity's server context, so a rotation needs no restart and new handshakes get the new
leaf while established connections keep theirs. Server contexts issue no session tickets: every
connection is a full handshake with a client chain verified against the current bundles.

Every context that verifies a peer against trust anchors treats each certificate of the bundle as an
anchor, self-signed or not (`trust_every_anchor`), as `wlidd.svid.validate` does: a bundle that holds
only the issuing intermediate works for the TLS listeners, the identity's client context and the
token flows' upstream contexts alike.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from wlidd.svid.model import Identity


def _no_pass_phrase() -> bytes:
    raise ssl.SSLError("wlidd never loads encrypted keys")


def load_identity_into(context: ssl.SSLContext, identity: Identity) -> None:
    """Load the SVID chain and key into `context` through a memfd (never a file on disk)."""
    fd = os.memfd_create("wlidd-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, identity.svid.chain_pem + identity.svid.key_pem())
        context.load_cert_chain(f"/proc/self/fd/{fd}", password=_no_pass_phrase)
    finally:
        os.close(fd)


def trust_every_anchor(context: ssl.SSLContext) -> ssl.SSLContext:
    """Let path validation stop at any certificate of the verify store, self-signed or not.

    A trust anchor is a name and key trusted a priori, whatever signed its certificate (RFC 5280
    §6.1.1(d)); the operator who puts an intermediate in `bundle` trusts exactly that CA. OpenSSL
    otherwise demands a chain up to a self-signed root and refuses such a bundle with "unable to get
    issuer certificate" (X509_V_FLAG_PARTIAL_CHAIN, X509_VERIFY_PARAM_set_flags(3)). The SPIFFE
    tooling wlidd meets already works this way: Go's crypto/x509 ends a chain at any certificate of
    VerifyOptions.Roots (golang/go#51953), and go-spiffe's x509svid.Verify (SPIRE, Go workloads)
    passes the peer's trust domain bundle as those Roots; Python 3.13's `ssl.create_default_context`
    sets VERIFY_X509_PARTIAL_CHAIN by default (python/cpython#107361, citing RFC 5280); and
    `validate_svid` (cryptography's verifier) accepts any bundle certificate as the anchor. Setting it
    here keeps the TLS handshakes and wlidd's own validation in agreement. An anchor must still be
    inside its validity window, and bundles only ever hold CA certificates (`wlidd.svid.parse`), so a
    leaf can never become its own anchor through a bundle.
    """
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _tls13_only(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


def _no_resumption(context: ssl.SSLContext) -> ssl.SSLContext:
    """A server context that issues no TLS 1.3 session tickets, so no client can resume a session.

    A resumed session carries no verified chain (and was judged against the bundles of its first
    handshake), so every connection must be a full handshake whose client chain is verified against
    the current bundles. TLS 1.3 resumes only through tickets (RFC 8446 §2.2, §4.6.1); OpenSSL sends
    `num_tickets` of them after each handshake (default 2) and OP_NO_TICKET alone only turns them
    into stateful tickets, still resumable (SSL_CTX_set_num_tickets(3)). Zero sends none, so no
    session is ever stored either. TLS 1.2 (session IDs) is not enabled at all.
    """
    context.num_tickets = 0
    return context


def build_server_context(identity: Identity) -> ssl.SSLContext:
    """Server side: present the SVID, require a client certificate verified against the bundles."""
    context = trust_every_anchor(_no_resumption(_tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=identity.bundles.pem.decode("ascii"))
    load_identity_into(context, identity)
    return context


def build_client_context(identity: Identity) -> ssl.SSLContext:
    """Client side: present the SVID; the peer's chain is verified against the bundles.

    SPIFFE peers are named by URI SAN, not host name, so host name checks are off; callers check
    the peer's SPIFFE ID themselves.
    """
    context = trust_every_anchor(_tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=identity.bundles.pem.decode("ascii"))
    load_identity_into(context, identity)
    return context


@dataclass(frozen=True)
class TlsContexts:
    """A matched pair for one identity; replaced as a whole, never edited."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def build(cls, identity: Identity) -> TlsContexts:
        return cls(server=build_server_context(identity), client=build_client_context(identity))


class HotServerContext:
    """A listener's SSLContext that hands each new handshake the current server context."""

    def __init__(self, current: Callable[[], TlsContexts | None]) -> None:
        self._current = current
        # no tickets and every anchor trusted on both this context and each identity's (see
        # _no_resumption, trust_every_anchor): OpenSSL copies the ticket count and the verify flags
        # (X509_VERIFY_PARAM) from this one when the connection is created, and switching contexts in
        # sni_callback (SSL_set_SSL_CTX) swaps the certificate and the verify store but not those
        # (openssl/openssl#13208); the identity's copy serves build_server_context's direct users
        self.context = trust_every_anchor(_no_resumption(_tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.sni_callback = self._switch

    def _switch(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        contexts = self._current()
        if contexts is None:
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR  # nothing valid to present yet
        connection.context = contexts.server
        return None
