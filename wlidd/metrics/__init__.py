"""Prometheus metrics: one registry per daemon (tests run several daemons in one process).

What wlidd exports is declared here (`Metrics`); the values are kept by wlidd.metrics.families until a scrape
imports prometheus_client to write them out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from wlidd.metrics.families import Counter, Family, Gauge, Registry

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = ["Counter", "Family", "Gauge", "Metrics", "Registry"]


class Metrics:
    """The daemon's metrics. Labels carry names and stable reasons, never secrets."""

    # long: one declaration per metric (name, help, labels): the list of what wlidd exports
    def __init__(self) -> None:
        self.registry = Registry()
        self.identity_reloads = Counter(
            "wlidd_identity_reloads",
            "Credential reload attempts by identity and result (updated, unchanged, rejected).",
            ["identity", "result"],
            registry=self.registry,
        )
        self.identity_rejections = Counter(
            "wlidd_identity_rejections",
            "Credential sets refused, by identity and stable reason.",
            ["identity", "reason"],
            registry=self.registry,
        )
        self.identity_not_after = Gauge(
            "wlidd_identity_not_after_timestamp_seconds",
            "Expiry (Unix time) of the identity's current SVID chain.",
            ["identity"],
            registry=self.registry,
        )
        self.identity_valid = Gauge(
            "wlidd_identity_valid",
            "1 when the identity has a valid SVID now, else 0.",
            ["identity"],
            registry=self.registry,
        )
        self.identity_last_reload = Gauge(
            "wlidd_identity_last_reload_timestamp_seconds",
            "When the identity's current SVID was loaded (Unix time).",
            ["identity"],
            registry=self.registry,
        )
        self.trust_bundle_problem = Gauge(
            "wlidd_trust_bundle_problem",
            "1 while a federated trust domain's bundle cannot be read or parsed (its last good copy, if"
            " any, is still served); the series goes away once the bundle is good again.",
            ["identity", "trust_domain"],
            registry=self.registry,
        )
        self.token_refreshes = Counter(
            "wlidd_token_refreshes",
            "Token fetches by source and result (success, failure).",
            ["source", "result"],
            registry=self.registry,
        )
        self.token_failures = Counter(
            "wlidd_token_failures",
            "Failed token fetches by source and stable reason (e.g. sts_invalid_grant, entra_aadsts700027).",
            ["source", "reason"],
            registry=self.registry,
        )
        self.token_expiry = Gauge(
            "wlidd_token_expiry_timestamp_seconds",
            "Expiry (Unix time) of the source's current token.",
            ["source"],
            registry=self.registry,
        )
        self.token_valid = Gauge(
            "wlidd_token_valid",
            "1 when the source has a servable token now (outside the skew), else 0.",
            ["source"],
            registry=self.registry,
        )
        self.token_upstream_calls = Counter(
            "wlidd_token_upstream_calls",
            "Upstream calls by source and kind (token: an access-token fetch chain; id_token: an ID token mint).",
            ["source", "kind"],
            registry=self.registry,
        )
        self.workload_api_streams = Gauge(
            "wlidd_workload_api_streams",
            "Open SPIFFE Workload API streams (connected clients).",
            registry=self.registry,
        )
        self.workload_api_pushes = Counter(
            "wlidd_workload_api_pushes",
            "Workload API messages sent, by identity (one per stream per change).",
            ["identity"],
            registry=self.registry,
        )
        self.workload_api_last_push = Gauge(
            "wlidd_workload_api_last_push_timestamp_seconds",
            "When an identity's state was last pushed to a Workload API client (Unix time).",
            ["identity"],
            registry=self.registry,
        )
        # Envoy SDS: labelled by method only (a fixed set); an Envoy's node id and the resource names it asks
        # for are the client's to choose, an unbounded set, so they are never labels (see /v1/status and the log)
        self.sds_streams = Gauge(
            "wlidd_sds_streams",
            "Open Envoy SDS streams on the Workload API socket, by method (StreamSecrets, DeltaSecrets).",
            ["method"],
            registry=self.registry,
        )
        self.sds_streams_nacked = Gauge(
            "wlidd_sds_streams_nacked",
            "Open SDS streams whose Envoy rejected (NACKed) the last response and has accepted none since: it"
            " keeps an older secret, and wlidd resends nothing until the content changes. By method.",
            ["method"],
            registry=self.registry,
        )
        self.sds_pushes = Counter(
            "wlidd_sds_pushes",
            "SDS responses sent to Envoy, by method (StreamSecrets, DeltaSecrets, FetchSecrets).",
            ["method"],
            registry=self.registry,
        )
        self.sds_nacks = Counter(
            "wlidd_sds_nacks",
            "SDS responses Envoy rejected (NACKs; Envoy's error_detail is logged), by method (StreamSecrets,"
            " DeltaSecrets).",
            ["method"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "wlidd_http_requests",
            "Local API requests by listener, route and status.",
            ["listener", "route", "status"],
            registry=self.registry,
        )

        self.connections_open = Gauge(
            "wlidd_connections_open",
            "Open connections by listener (counted from accept, before TLS or HTTP/2).",
            ["listener"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "wlidd_connections_refused",
            "Connections refused at accept by listener and reason (listener_full, caller_full, unidentified,"
            " out_of_resources).",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.connections_shed = Counter(
            "wlidd_connections_shed",
            "Idle connections closed to make room for a new one at the listener's cap, by listener.",
            ["listener"],
            registry=self.registry,
        )
        self.accept_errors = Counter(
            "wlidd_accept_errors",
            "Failed accept() calls by listener and errno name (EMFILE, ENFILE, ENOBUFS, ENOMEM, other).",
            ["listener", "error"],
            registry=self.registry,
        )
        self.listener_up = Gauge(
            "wlidd_listener_up",
            "1 while the listener's accept loop runs, else 0 (a dead loop also withholds the watchdog).",
            ["listener"],
            registry=self.registry,
        )
        self.daemon_state = Gauge(
            "wlidd_daemon_state",
            "1 for the daemon's state as /v1/status says it (starting, running, degraded), 0 for the others.",
            ["state"],
            registry=self.registry,
        )

        self.registry.register(_SuppressedLines())
        self.failing_sinks = _FailingSinks()  # the daemon gives it its source of failing sinks
        self.registry.register(self.failing_sinks)
        # and (Registry) process_start_time_seconds (restart loops), CPU, RSS and open descriptors of this process

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry.prometheus())


class _SuppressedLines:
    """wlidd_log_lines_suppressed_total{event}: repeated log lines counted instead of written
    (wlidd.logs.RepeatLimiter); events are names in the code, a fixed set."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        from wlidd.logs import repeat_limiter

        family = CounterMetricFamily(
            "wlidd_log_lines_suppressed",
            "Repeated log lines (failed handshakes, denials) counted instead of written, by event.",
            labels=["event"],
        )
        for event, count in sorted(repeat_limiter().suppressed.items()):
            family.add_metric([event], count)
        yield family


class _FailingSinks:
    """wlidd_sink_write_failing{kind,owner}: how many of an identity's or token source's sinks failed their
    last write; `source` returns (kind, owner) pairs, one per failing sink (the daemon sets it to its
    record of failing sinks: owners come from the config, a bounded set). A series goes away once every
    sink of its owner is written again."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str]]] = tuple

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "wlidd_sink_write_failing",
            "Sinks whose last write failed (their files keep the last good content), by kind (identity,"
            " token) and owner; see /v1/status sink_problems for the places and errors.",
            labels=["kind", "owner"],
        )
        for (kind, owner), count in sorted(collections.Counter(self.source()).items()):
            family.add_metric([kind, owner], count)
        yield family
