"""The metrics listener's routes ([listeners.metrics]): public answers only, no caller authorized."""

from __future__ import annotations

from dataclasses import dataclass

from wlidd.api.answers import routed
from wlidd.api.messages import Handler, Request, Response, Router
from wlidd.api.routes import Api


@dataclass
class MetricsRoutes:
    """The metrics listener's routes: GET /metrics (the Prometheus text exposition), GET /v1/health
    (readiness) and GET /v1/live (liveness), the Unix socket's own handlers of the same `api`; every other
    path 404. The answers are public (names of identities, tokens and listeners, counts, validity, the
    reasons of a failing health), so no caller is authorized; the listener only caps connections (per
    listener and per caller) and times them out."""

    api: Api

    def __post_init__(self) -> None:
        self.router = Router(
            [
                ("/metrics", self.api.prometheus),
                ("/v1/health", self.api.health_route),
                ("/v1/live", self.api.live_route),
            ]
        )
        self._served = ", ".join(sorted(self.router.templates))

    def route(self, request: Request) -> tuple[str, Handler]:
        """(the matched route's template — the metrics label —, the handler answering `request`)."""
        return routed(self.router, request, f"no route {request.path} (this listener serves {self._served})")

    async def __call__(self, request: Request) -> Response:
        return await self.route(request)[1](request)
