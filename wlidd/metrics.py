"""Prometheus metrics: one registry per daemon (tests run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    """The daemon's metrics. Labels carry names and stable reasons, never secrets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.http_requests = Counter(
            "wlidd_http_requests",
            "Local API requests by listener, route and status.",
            ["listener", "route", "status"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
