"""How a Flow's HTTP clients reach their upstreams: each client a Flow makes (`new_client`) gets its transport
from `transports(identity)` (`Transports`): None for the plain client, the identity state whose SVID the
client presents for an mTLS one. The default (`tls_transports`) is httpx's own over TLS, verifying servers
against `ca_file` (`upstream_ssl_context`). Tests pass one that answers without sockets
(wlidd.emulator.upstreams.Upstreams.mock_transport: the emulator's own request checks behind an
httpx.MockTransport); as such a transport sees no handshake, it takes the client certificate from the
identity it is made for, the one the handshake would present.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Callable
from pathlib import Path

import httpx

from wlidd.errors import UpstreamError
from wlidd.tlsctx import load_identity_into, trust_every_anchor
from wlidd.tokens.flows.attempts import count_request
from wlidd.tokens.model import IdentitySnapshot

Transports = Callable[[IdentitySnapshot | None], httpx.AsyncBaseTransport]
"""The transport of one new HTTP client: called with None for the plain client, with the identity state whose
SVID an mTLS client presents. May raise UpstreamError (`wlidd_ca_file`: nothing is sent then)."""


def tls_transports(ca_file: Path | None) -> Transports:
    """The real transports: httpx over TLS, the server verified against `ca_file` (or the system store), the
    identity's SVID presented when there is one (`upstream_ssl_context`)."""

    def transport(state: IdentitySnapshot | None) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(verify=upstream_ssl_context(ca_file, state), trust_env=False)

    return transport


def upstream_ssl_context(ca_file: Path | None, state: IdentitySnapshot | None = None) -> ssl.SSLContext:
    """Verify upstream servers against `ca_file` or the system store; with `state`, present its SVID
    (TLS 1.3 only, as required for mTLS with workload credentials).

    The server is verified against `ca_file` (or the system store), never against the SPIFFE bundle.
    Every certificate there is a trust anchor, self-signed or not (`trust_every_anchor`): a `ca_file`
    holding only the issuing intermediate works, and so does a server certificate pinned there, as
    with Python 3.13's create_default_context. Raises UpstreamError `wlidd_ca_file` (permanent) naming
    the path when `ca_file` cannot be loaded (`wlidd check` reports the same before start), among them a
    `ca_file` that is not a regular file: OpenSSL's open() of a FIFO would block the event loop until
    something writes to it, so os.stat (which never blocks) is asked first.
    """
    try:
        if ca_file is not None and not stat.S_ISREG(os.stat(ca_file).st_mode):
            raise UpstreamError("wlidd", f"ca_file {ca_file}: is not a regular file", code="ca_file", retryable=False)
        context = trust_every_anchor(ssl.create_default_context(cafile=str(ca_file) if ca_file else None))
    except (OSError, ssl.SSLError) as exc:  # ca_file missing, unreadable, or no certificate in it
        detail = "holds no usable CA certificate" if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
        raise UpstreamError("wlidd", f"ca_file {ca_file}: {detail}", code="ca_file", retryable=False) from None
    if state is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        load_identity_into(context, state.identity)
    return context


def new_client(transport: httpx.AsyncBaseTransport, timeout: float) -> httpx.AsyncClient:
    """A Flow's HTTP client over `transport`: no proxy from the environment, every request counted
    (wlidd.tokens.flows.attempts)."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        trust_env=False,
        headers={"User-Agent": "wlidd"},
        event_hooks={"request": [count_request]},
    )
