"""``create_app(node)``: the Starlette application every node serves on port 52415.

Theory of operation
-------------------
The app is thin: the route table (``skulk.api.routes``) maps each endpoint to a
handler that validates, talks to the node through ``NodePort`` (commands and
the replicated state, nothing else) and renders. Around it:

- exception handlers that turn every failure (``ApiError``, Starlette's own
  404/405, an unexpected exception) into the OpenAI error envelope;
- a small ASGI middleware counting requests by method, route template and
  status for ``/metrics``;
- the OpenAPI document (``/openapi.json``) and its human-readable page
  (``/docs``), both self-contained;
- the dashboard: ``/`` and any client-side route (a browser asking for HTML on
  a path the API does not serve) get ``index.html``; its ES modules and styles
  live under ``/static``. Nothing is built and nothing comes from a CDN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from skulk.api.config import ApiConfig
from skulk.api.appstate import AppState
from skulk.api.errors import ApiError, error_response
from skulk.api.keys import ApiKeyGuard
from skulk.api.port import NodePort
from skulk.api.metrics import ApiMetrics
from skulk.api.openapi import build_openapi
from skulk.api.routes import ENDPOINTS
from skulk.api.wire import json_response

__all__ = ["create_app", "DASHBOARD_DIR"]

log = logging.getLogger("skulk.api")

DASHBOARD_DIR = Path(__file__).parent / "dashboard"


class _RequestCounter:
    """Counts answered requests by (method, route template, status) for ``/metrics``."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: list[Route | Mount]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _template(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path if isinstance(route, Route) else route.path + "/*"
        return "other"  # never the raw path: label cardinality stays bounded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.observe_request(scope["method"], self._template(scope), status)


def _read_asset(name: str) -> str:
    path = DASHBOARD_DIR / name
    assert path.is_file(), f"dashboard asset missing from the package: {path}"
    return path.read_text(encoding="utf-8")


def create_app(node: NodePort, *, config: ApiConfig | None = None, extra_routes: Sequence[Route] = ()) -> Starlette:
    """The API and dashboard app for the node behind ``node``.

    ``config`` defaults to ``ApiConfig.from_env()``. The app keeps no state of
    its own beyond counters and a bounded memory of cancelled command ids;
    everything it shows comes from ``node``.
    """
    config = config or ApiConfig.from_env()
    api = AppState(node=node, config=config)
    openapi_body = json_response(build_openapi()).body
    index_html = _read_asset("index.html").replace("__SKULK_POLL_MS__", str(config.dashboard_poll_ms))
    docs_html = _read_asset("docs.html")

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    async def docs(request: Request) -> Response:
        return Response(docs_html, media_type="text/html", headers={"cache-control": "no-cache"})

    async def index(request: Request) -> Response:
        return Response(index_html, media_type="text/html", headers={"cache-control": "no-cache"})

    routes: list[Route | Mount] = [Route(ep.path, ep.handler, methods=[ep.method]) for ep in ENDPOINTS]
    routes += [
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=DASHBOARD_DIR), name="static"),
    ]
    served = list(routes)

    async def fallback(request: Request) -> Response:
        # A served path with another method: 405, not a page.
        if any(route.matches(request.scope)[0] is Match.PARTIAL for route in served):
            raise ApiError(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        # Deep links and refreshes: a browser asking for a page gets the dashboard,
        # whose router renders the path; API clients get a JSON 404.
        if request.method in ("GET", "HEAD") and "text/html" in request.headers.get("accept", ""):
            return await index(request)
        raise ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")

    # Routes the node serves beside the API (the runtime's node-to-node file transfers).
    routes.extend(extra_routes)
    routes.append(Route("/{path:path}", fallback, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else "HTTP error"
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        status = exc.status_code if 400 <= exc.status_code <= 599 else 500
        return error_response(ApiError(status, message, code=code, headers=exc.headers))

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # the client left while sending its body

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_error,
            ClientDisconnect: on_disconnect,
            Exception: on_unexpected,
        },
    )
    app.state.skulk = api
    # Added first, so it runs inside the counter: refused requests are counted too.
    api_routes = [r for r in served if isinstance(r, Route) and r.path not in ("/",)]
    app.add_middleware(
        ApiKeyGuard,
        keys=config.keys,
        api_routes=api_routes,
        failures_max=config.auth_failures_max,
        window_s=config.auth_window_s,
    )
    app.add_middleware(_RequestCounter, metrics=api.metrics, routes=routes)
    return app
