"""The /v1 routes: plain async Request -> Response functions over the published identity states.

The route table (`Api.router`, `MetricsRoutes.router`) is a list of path templates; the template a request
matched is its metrics label (wlidd.api.server). The daemon's health — /v1/health, /v1/live, /v1/status's
daemon state, the identity and token gauges of /metrics — is one `Health` value (wlidd.health) per request; the
policy and the token sources are read from the one published `Runtime` (wlidd.runtime) per request.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wlidd.api.answers import routed
from wlidd.api.authz import caller_fields, handout_audit
from wlidd.api.callers import CallerCache
from wlidd.api.messages import Handler, Request, Response, Router
from wlidd.clock import Clock, iso_z
from wlidd.errors import ApiError, TokenUnavailable
from wlidd.health import Health, identity_problem
from wlidd.logs import AuditOnce, get_logger
from wlidd.metrics import Metrics
from wlidd.policy import Caller, Decision
from wlidd.runtime import RuntimeRef, RuntimeView
from wlidd.status import DAEMON_STATES, ListenerStatus, WorkloadApiStatus, to_json
from wlidd.status_report import status_of
from wlidd.watch import CredentialWatcher

if TYPE_CHECKING:  # the token machinery (httpx, PyJWT) is imported only when a config names a token
    from wlidd.tokens.manager import TokenSource
    from wlidd.tokens.model import Token

audit = get_logger("wlidd.audit")
TOKEN_ROUTE = "/v1/token/{name}"


@functools.lru_cache(maxsize=16)
def _expiry_text(expire_time: dt.datetime) -> str:
    """A token's expiry as every hand-out's audit fields write it (iso_z), formatted once per token."""
    return iso_z(expire_time)


@dataclass
class Api(RuntimeView):
    """The route table of the local API, bound to the daemon's live state: the identities' watchers, the
    published `runtime` (policy, token sources) and `health` (the one health decision, wlidd.health)."""

    watchers: Mapping[str, CredentialWatcher]
    metrics: Metrics
    clock: Clock
    started_at: dt.datetime
    runtime: RuntimeRef
    health: Callable[[dt.datetime], Health]
    listener_status: Callable[[], Mapping[str, ListenerStatus]] = dict  # the listeners' part of /v1/status
    workload_status: Callable[[], WorkloadApiStatus | None] = lambda: None  # the Workload API's, once started
    # While the daemon starts: why a token source must not be asked yet (its identity's first load still
    # runs), else None.
    held_back: Callable[[TokenSource], str | None] | None = None

    def __post_init__(self) -> None:
        self._callers = CallerCache()
        self._token_bodies: dict[str, tuple[tuple[str, int], Response]] = {}
        self._audited = AuditOnce()  # (caller, what) → the token expiry or certificate serial last audited
        self.router = Router(
            [
                ("/v1/status", self.status),
                ("/v1/health", self.health_route),
                ("/v1/live", self.live_route),
                ("/v1/identity/{name}", self.identity),
                ("/v1/credentials/{name}", self.credentials),
                ("/v1/ready/{name}", self.ready),
                (TOKEN_ROUTE, self.token),
                ("/get_wif_token", self.wif_token),
                ("/metrics", self.prometheus),
            ]
        )

    def route(self, request: Request) -> tuple[str, Handler]:
        """(the matched route's template — the metrics label —, the handler answering `request`)."""
        return routed(self.router, request, f"no route {request.path}")

    async def __call__(self, request: Request) -> Response:
        return await self.route(request)[1](request)

    def _watcher(self, name: str) -> CredentialWatcher:
        """The identity `name`'s watcher; ApiError 404 naming the configured ones otherwise."""
        watcher = self.watchers.get(name)
        if watcher is None:
            known = ", ".join(sorted(self.watchers)) or "none"
            raise ApiError(404, "unknown_identity", f"no identity named {name!r} (configured: {known})")
        return watcher

    async def status(self, request: Request, _: dict[str, str]) -> Response:
        """The daemon's state ("starting" until READY=1, then "running" or "degraded": wlidd.health), what a
        start still waits for, every identity and token, the listeners, the failing sinks (wlidd.status)."""
        now = self.clock()
        listeners, workload_api = self.listener_status(), self.workload_status()
        status = status_of(now, self.health(now), self.started_at, self.watchers, self.tokens, listeners, workload_api)
        return Response.json(200, to_json(status))

    async def health_route(self, request: Request, _: dict[str, str]) -> Response:
        """/v1/health: wlidd.health.Health.answer."""
        status, document = self.health(self.clock()).answer()
        return Response.json(status, document)

    async def live_route(self, request: Request, _: dict[str, str]) -> Response:
        """/v1/live, for a liveness probe where no systemd watchdog runs (a Kubernetes pod): 503
        {"status": "dead", "problems": {"listener/<name>": why}} while an accept loop is dead, else 200
        {"status": "ok"} — the watchdog's decision (Health.liveness_problems, wlidd.daemon._watchdog).
        Credential validity is not liveness: a degraded daemon answers 200 (SPECS.md §6). A stalled event
        loop, the watchdog's other reason, answers nothing at all: the probe's timeout is its failure."""
        problems = self.health(self.clock()).liveness_problems
        if problems:
            return Response.json(503, {"status": "dead", "problems": problems})
        return Response.json(200, {"status": "ok"})

    async def ready(self, request: Request, params: dict[str, str]) -> Response:
        source = self.tokens.get(params["name"])
        if source is not None and params["name"] not in self.watchers:
            now = self.clock()
            if source.servable(now) is None:
                return Response.json(
                    503, {"ready": False, "name": source.name, "reason": source.not_servable_reason(now)}
                )
            return Response.json(200, {"ready": True, "name": source.name})
        watcher = self._watcher(params["name"])
        reason = identity_problem(watcher, self.clock())
        if reason is not None:
            return Response.json(503, {"ready": False, "name": watcher.name, "reason": reason})
        return Response.json(200, {"ready": True, "name": watcher.name})

    async def identity(self, request: Request, params: dict[str, str]) -> Response:
        watcher = self._watcher(params["name"])
        state = watcher.current
        if state is None:
            return Response.error(503, "identity_unavailable", identity_problem(watcher, self.clock()) or "not loaded")
        svid = state.identity.svid
        return Response.json(
            200,
            {
                "name": watcher.name,
                "spiffe_id": str(svid.spiffe_id),
                "serial": svid.serial,
                "not_before": iso_z(svid.not_before),
                "not_after": iso_z(svid.not_after),
                "valid": svid.is_valid_at(self.clock()),
                "chain_pem": svid.chain_pem.decode("ascii"),
                "bundle_pem": state.identity.own_bundle.pem.decode("ascii"),
                "trust_domains": list(state.identity.bundles.trust_domains),
            },
        )

    async def _authorize(self, request: Request, decide: Callable[[Caller], Decision]) -> Caller:
        """The caller (`wlidd.api.callers.CallerCache.caller_of`: a local caller, an mTLS caller, or an
        address) if the policy's decision allows it; else ApiError 403 with the decision's reason, which
        names the caller and what it asked for (wlidd.policy). Denials are audited through the repeat
        limiter: the first of each (caller, what) is written, repeats are counted."""
        caller = await self._callers.caller_of(request.peer, self.policy)  # its process too, if a rule asks
        decision = decide(caller)
        if decision.refusal is None:
            return caller
        if caller.spiffe_id is not None:
            key = {"spiffe_id": str(caller.spiffe_id), "refused": decision.what}  # repeats counted, not written
            audit.limited("warning", "access denied", key=key, route=request.path, detail=decision.refusal)
        elif not caller.local:
            key = {"reason": "not a local Unix caller"}
            audit.limited("warning", "access denied", key=key, route=request.path, peer=caller.address)
        else:
            who = {"uid": caller.uid, "refused": decision.what}  # the first of a kind is written, then a count
            fields = caller_fields(caller)
            audit.limited("warning", "access denied", key=who, route=request.path, detail=decision.refusal, **fields)
        raise ApiError(403, "forbidden", decision.refusal)

    async def _serve_token(self, name: str, request: Request) -> tuple[dt.datetime, str, dt.datetime]:
        """(expire_time, value, now) of the token `name` for this caller; ApiError (404 unknown token, 403
        refused, 503 TokenUnavailable) otherwise."""
        runtime = self.runtime.current  # the source and the rule of one config, whatever a reload does meanwhile
        source = runtime.tokens.get(name)
        if source is None:
            known = ", ".join(runtime.tokens) or "none"
            raise ApiError(404, "unknown_token", f"no token named {name!r} (configured: {known})")
        caller = await self._authorize(request, lambda caller: runtime.policy.may_have_token(caller, name))
        if self.held_back is not None and (reason := self.held_back(source)) is not None:
            raise TokenUnavailable(name, reason)  # the answer of an absent identity, without an upstream attempt
        return self._hand_out_token(name, request, caller, await source.get())

    def _token_now(self, name: str, request: Request) -> tuple[dt.datetime, str, dt.datetime] | None:
        """`_serve_token` when it needs no wait: the token `name` already fetched and servable, for a caller
        the cache holds whom the policy allows; None for anything else (a refusal too), which
        `_serve_token` answers."""
        runtime = self.runtime.current
        source = runtime.tokens.get(name)
        if source is None:
            return None
        caller = self._callers.known(request.peer, runtime.policy)
        if caller is None or runtime.policy.may_have_token(caller, name).refusal is not None:
            return None
        if self.held_back is not None and self.held_back(source) is not None:
            return None
        token = source.serve_now()
        return None if token is None else self._hand_out_token(name, request, caller, token)

    def _hand_out_token(
        self, name: str, request: Request, caller: Caller, token: Token
    ) -> tuple[dt.datetime, str, dt.datetime]:
        """Audit the token `name` handed to `caller` (wlidd.api.authz); (expire_time, value, now)."""
        handout_audit(
            self._audited,
            "token handed out",
            caller,
            f"token {name}",
            token.expire_time,
            route=request.path,
            source=name,
            expire_time=_expiry_text(token.expire_time),
        )
        return token.expire_time, token.value, self.clock()

    async def credentials(self, request: Request, params: dict[str, str]) -> Response:
        watcher = self._watcher(params["name"])
        caller = await self._authorize(request, lambda caller: self.policy.may_have_credentials(caller, watcher.name))
        state = watcher.current
        now = self.clock()
        if state is None or not state.identity.svid.is_valid_at(now):
            return Response.error(503, "identity_unavailable", identity_problem(watcher, now) or "not loaded")
        svid = state.identity.svid
        handout_audit(
            self._audited,
            "credentials handed out",
            caller,
            f"identity {watcher.name}",
            svid.serial,
            route=request.path,
            identity=watcher.name,
            serial=svid.serial,
        )
        return Response.json(
            200,
            {
                "name": watcher.name,
                "spiffe_id": str(svid.spiffe_id),
                "serial": svid.serial,
                "not_after": iso_z(svid.not_after),
                "chain_pem": svid.chain_pem.decode("ascii"),
                "key_pem": svid.key_pem().decode("ascii"),
                "bundle_pem": state.identity.own_bundle.pem.decode("ascii"),
                "federated_bundles_pem": {
                    bundle.trust_domain: bundle.pem.decode("ascii")
                    for bundle in state.identity.bundles
                    if bundle.trust_domain != svid.spiffe_id.trust_domain
                },
            },
        )

    async def token(self, request: Request, params: dict[str, str]) -> Response:
        return self._token_answer(params["name"], *await self._serve_token(params["name"], request))

    def answer_now(self, request: Request) -> tuple[str, Response] | None:
        """(route template, answer) of `request` when it needs no wait (wlidd.api.connection answers it from
        the event loop's callback): a GET of a token already fetched and servable, for a caller the cache
        holds whom the policy allows (`_token_now`); None for anything else, which `route` answers."""
        if request.method != "GET":
            return None
        found = self.router.match(request.path)
        if found is None or found[0] != TOKEN_ROUTE:
            return None
        name = found[2]["name"]
        served = self._token_now(name, request)
        return None if served is None else (TOKEN_ROUTE, self._token_answer(name, *served))

    def _token_answer(self, name: str, expire_time: dt.datetime, value: str, now: dt.datetime) -> Response:
        """The JSON answer handing out the token `name`."""
        expires_in = max(0, int((expire_time - now).total_seconds()))
        # The body only changes when the token or the whole second of expires_in does: reuse it (the server
        # reuses its bytes too: wlidd.api.connection).
        key = (value, expires_in)
        cached = self._token_bodies.get(name)
        if cached is None or cached[0] != key:
            body = Response.json(
                200,
                {
                    "access_token": value,
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                    "expire_time": iso_z(expire_time),
                },
            )
            cached = self._token_bodies[name] = (key, body)
        return cached[1]

    async def wif_token(self, request: Request, _: dict[str, str]) -> Response:
        if not self.tokens:
            raise ApiError(404, "no_tokens", "no token is configured ([tokens.<name>])")
        value = (await self._serve_token(next(iter(self.tokens)), request))[1]
        return Response.text(200, value)

    async def prometheus(self, request: Request, _: dict[str, str]) -> Response:
        """The Prometheus exposition, its health gauges set from one Health first."""
        health = self.health(self.clock())
        for name, problem in health.identities.items():
            self.metrics.identity_valid.labels(name).set(0 if problem else 1)
        for name, problem in health.tokens.items():
            self.metrics.token_valid.labels(name).set(0 if problem else 1)
        for state in DAEMON_STATES:
            self.metrics.daemon_state.labels(state).set(1 if state == health.state else 0)
        return Response(200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
