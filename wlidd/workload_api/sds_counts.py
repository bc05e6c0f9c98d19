"""What Envoy's SDS streams did, counted once for /v1/status (wlidd.status.SdsStatus) and the metrics.

    wlidd_sds_streams{method}          open StreamSecrets / DeltaSecrets streams
    wlidd_sds_streams_nacked{method}   those whose client NACKed the last response and has accepted none
                                       since: an Envoy left on an older secret (wlidd resends nothing until
                                       the content changes, wlidd.workload_api.sds_protocol)
    wlidd_sds_pushes_total{method}     responses sent (FetchSecrets answers included)
    wlidd_sds_nacks_total{method}      NACKs received: requests with error_detail answering a response the
                                       stream sent, once per response (the xDS protocol's ACK/NACK;
                                       wlidd.workload_api.sds_protocol)

The only label is the method, a fixed set. An Envoy's node id and the resource names it asks for are the
client's to choose (an unbounded set), so they are never labels: the last NACK's resource names are in
/v1/status (at most LOGGED_NAMES, each cut to LOGGED_NAME_LENGTH) and, with Envoy's error text, in the log.
Every series is made at 0 when SDS starts, so Prometheus' increase() sees the first NACK.
"""

from __future__ import annotations

from collections.abc import Sequence

from wlidd.clock import Clock
from wlidd.metrics import Metrics
from wlidd.status import SdsNack, SdsStatus
from wlidd.workload_api.sds_protocol import Received

STREAM_METHODS = ("StreamSecrets", "DeltaSecrets")
METHODS = (*STREAM_METHODS, "FetchSecrets")
LOGGED_NAMES = 10  # resource names a log line or the status shows (the first, each cut to LOGGED_NAME_LENGTH)
LOGGED_NAME_LENGTH = 256


def verdict(received: Received) -> bool | None:
    """A client's verdict on the last response, from one request: True for a NACK of it (error_detail
    answering it, the first time: `Received.nack`), False for an ACK (`Received.ack`: its nonce, no
    error_detail, for StreamSecrets the version sent), None for neither (a first request, one that answers
    an older response, a NACK repeated, or one that changes names while Envoy keeps an older version)."""
    if received.stale:
        return None
    if received.nack:
        return True
    return False if received.ack else None


class SdsCounts:
    """The counts of one SDS service (see the module docstring); `clock` dates the last NACK."""

    def __init__(self, metrics: Metrics | None, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self.streams = 0
        self.streams_nacked = 0
        self.pushes = 0
        self.nacks = 0
        self.last_nack: SdsNack | None = None
        if metrics is not None:
            for method in METHODS:
                metrics.sds_pushes.labels(method)
            for method in STREAM_METHODS:
                metrics.sds_streams.labels(method)
                metrics.sds_streams_nacked.labels(method)
                metrics.sds_nacks.labels(method)

    def __repr__(self) -> str:
        counts = f"streams={self.streams}, nacked={self.streams_nacked}, pushes={self.pushes}, nacks={self.nacks}"
        return f"SdsCounts({counts})"

    def stream(self, method: str, change: int) -> None:
        """A stream of `method` opened (+1) or ended (-1)."""
        self.streams += change
        if self.metrics is not None:
            self.metrics.sds_streams.labels(method).inc(change)

    def stream_nacked(self, method: str, change: int) -> None:
        """A stream's client NACKed the last response (+1), or accepted a response or ended after one (-1)."""
        self.streams_nacked += change
        if self.metrics is not None:
            self.metrics.sds_streams_nacked.labels(method).inc(change)

    def pushed(self, method: str) -> None:
        self.pushes += 1
        if self.metrics is not None:
            self.metrics.sds_pushes.labels(method).inc()

    def nack(self, method: str, names: Sequence[str]) -> None:
        """A NACK of `method` about these resource names (the request's; none: every resource)."""
        self.nacks += 1
        shown = tuple(name[:LOGGED_NAME_LENGTH] for name in names[:LOGGED_NAMES])
        self.last_nack = SdsNack(shown, len(names), self.clock())
        if self.metrics is not None:
            self.metrics.sds_nacks.labels(method).inc()

    def status(self) -> SdsStatus:
        """The SDS part of /v1/status: counts and the last NACK (names and time, never key material)."""
        return SdsStatus(self.streams, self.streams_nacked, self.pushes, self.nacks, self.last_nack)
