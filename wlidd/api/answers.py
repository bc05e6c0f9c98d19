"""A route table's answers without a socket: the matched route's template (its metrics label) and its
answer to a GET or HEAD, its refusals (ApiError) rendered as the HTTP server renders them. Shared by the
local API (wlidd.api.routes) and the metrics listener (wlidd.api.metrics_routes)."""

from __future__ import annotations

from wlidd.api.messages import OTHER_ROUTE, Endpoint, Handler, Request, Response, Router
from wlidd.errors import ApiError


def routed(router: Router, request: Request, not_found: str) -> tuple[str, Handler]:
    """`request`'s route in `router`: (its template, the handler answering with it through `answer`), or
    ("other", a 404 naming `not_found`)."""
    found = router.match(request.path)
    if found is None:
        return OTHER_ROUTE, lambda _request: not_found_answer(not_found)
    template, endpoint, params = found
    return template, lambda request: answer(endpoint, request, params)


async def not_found_answer(message: str) -> Response:
    return Response.error(404, "not_found", message)


async def answer(route: Endpoint, request: Request, params: dict[str, str]) -> Response:
    """`route`'s answer to a GET (HEAD: the same without the body); 405 naming GET for other methods. A route
    raises its refusals (ApiError: 403, 404, 503 …); they are answered here as the HTTP server answers one
    (a JSON error body with the error's status and reason), so the route table answers without a socket."""
    if request.method not in ("GET", "HEAD"):
        return Response.error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use GET",
            headers=(("allow", "GET, HEAD"),),
        )
    try:
        response = await route(request, params)
    except ApiError as exc:
        return Response.error(exc.http_status, exc.reason, exc.message)
    if request.method == "HEAD":
        return Response(response.status, b"", response.content_type, response.headers)
    return response
