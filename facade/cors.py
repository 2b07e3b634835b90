"""CORS for the origins in `api.cors_origins` ("*" allows any); nothing when the list is empty."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import hdrs, web

__all__ = ["setup_cors"]

_ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
_EXPOSED_HEADERS = "X-Request-ID, Retry-After"
_PREFLIGHT_MAX_AGE_SEC = "600"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup_cors(app: web.Application, origins: Sequence[str]) -> None:
    """Answer preflights and add CORS headers to every response (streams included)."""
    if not origins:
        return
    allowed = frozenset(origins)

    def allowed_origin(request: web.Request) -> str | None:
        """The Access-Control-Allow-Origin value for this request, None for no CORS headers."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    @web.middleware
    async def preflight(request: web.Request, handler: _Handler) -> web.StreamResponse:
        is_preflight = (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )
        if not is_preflight or allowed_origin(request) is None:
            return await handler(request)
        headers = {
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: _ALLOWED_METHODS,
            hdrs.ACCESS_CONTROL_MAX_AGE: _PREFLIGHT_MAX_AGE_SEC,
        }
        requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
        if requested:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested
        return web.Response(status=204, headers=headers)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        if "*" not in allowed:
            # Every answer depends on the Origin header, those without CORS headers too (no
            # Origin, or another one): caches must keep one per origin.
            response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        origin = allowed_origin(request)
        if origin is None:
            return
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSED_HEADERS

    app.middlewares.append(preflight)
    app.on_response_prepare.append(add_headers)
