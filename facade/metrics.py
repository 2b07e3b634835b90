"""The facade's Prometheus metrics, and `GET /metrics`: its own series plus the router's.

One scrape of the facade is enough: its exposition is the facade's families followed by the
router's, fetched from `http://<grpc.host>:<telemetry.metrics_port>/metrics` with the caller's
key (the router may require one: its 401/403 is the answer). Every facade family is named
`routermodel_facade_*`, a prefix the router never uses, so no family appears twice.

Labels are bounded: `route` is the matched route's template (`/v1/models/{model}`, never the
path or a model name; `unmatched` for a 404/405), `method` an HTTP method (`OTHER` for unknown
ones on unmatched paths), `status` a class. A route's series appear with its first request, for
every status class at once, so what a request asks for never adds a series. Scraping reads
counters and the router's own exposition only: it never loads a model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from facade.errors import ApiError

__all__ = [
    "METRICS_ROUTE",
    "PREFIX",
    "STATUS_CLASSES",
    "UNMATCHED",
    "FacadeMetrics",
    "openapi_paths",
    "setup_metrics",
]

_LOGGER = logging.getLogger(__name__)

PREFIX = "routermodel_facade"
METRICS_ROUTE = "/metrics"
UNMATCHED = "unmatched"
STATUS_CLASSES = ("2xx", "4xx", "5xx", "cancelled")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# From a cached JSON answer to a ten-minute generation.
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 600)
# Within Prometheus's default scrape timeout (10 s), leaving room for the facade's own part.
_ROUTER_SCRAPE_TIMEOUT_SEC = 5.0
# The headers the router's /metrics reads a key from.
_KEY_HEADERS = (hdrs.AUTHORIZATION, "X-API-Key")
_SSE_CONTENT_TYPE = "text/event-stream"
_SSE_OPEN: Final = web.RequestKey("metrics_sse_open", bool)
_SESSION: Final = web.AppKey("metrics_router_session", aiohttp.ClientSession)


@dataclass(slots=True)
class _RouteSeries:
    """One route's children, resolved once: `labels()` takes a lock and builds a key per call."""

    route: str
    method: str
    requests: dict[str, Counter]
    duration: Histogram
    disconnects: Counter


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class FacadeMetrics:
    """The facade's metric families (in their own registry) and the middleware that feeds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace=PREFIX, registry=r)
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route template, method and status class "
            "(cancelled: the client left first).",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (streams included).",
            ["route", "method"],
            buckets=_SECONDS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight", "HTTP requests being answered.", registry=r
        )
        self.sse_streams = Gauge(
            f"{PREFIX}_sse_streams_open",
            "Server-sent event responses whose headers went out and that have not ended.",
            registry=r,
        )
        self.disconnects = Counter(
            f"{PREFIX}_client_disconnects",
            "Requests whose client went away before their response ended.",
            ["route", "method"],
            registry=r,
        )
        self.router_up = Gauge(
            f"{PREFIX}_router_metrics_up",
            "1 when the last scrape included the router's metrics, else 0.",
            registry=r,
        )
        self._routes: dict[tuple[str, str], _RouteSeries] = {}

    def _series(self, request: web.Request) -> _RouteSeries:
        resource = request.match_info.route.resource
        method = request.method
        if resource is None:
            route = UNMATCHED
            if method not in _METHODS:
                method = "OTHER"
        else:
            route = resource.canonical
        key = (route, method)
        series = self._routes.get(key)
        if series is None:
            series = _RouteSeries(
                route,
                method,
                {status: self.requests.labels(route, method, status) for status in STATUS_CLASSES},
                self.duration.labels(route, method),
                self.disconnects.labels(route, method),
            )
            self._routes[key] = series
        return series

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count and time every request; outside the error middleware, so it sees the final
        status."""
        series = self._series(request)
        started = time.perf_counter()
        status = "5xx"  # what aiohttp answers for an exception that escapes
        self.in_flight.inc()
        try:
            response = await handler(request)
            status = _status_class(response.status)
            return response
        except web.HTTPException as exc:
            status = _status_class(exc.status)
            raise
        except asyncio.CancelledError:
            # aiohttp cancels the handler when its client disconnects (handler_cancellation).
            status = "cancelled"
            series.disconnects.inc()
            raise
        finally:
            self.in_flight.dec()
            if request.get(_SSE_OPEN):
                self.sse_streams.dec()
            series.duration.observe(time.perf_counter() - started)
            counter = series.requests.get(status)
            if counter is None:  # 1xx/3xx, which the facade does not answer today
                counter = self.requests.labels(series.route, series.method, status)
                series.requests[status] = counter
            counter.inc()

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Count an SSE stream from when its headers go out (the middleware uncounts it)."""
        if response.content_type == _SSE_CONTENT_TYPE:
            self.sse_streams.inc()
            request[_SSE_OPEN] = True

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def setup_metrics(
    app: web.Application,
    metrics: FacadeMetrics,
    router_url: str | None,
    *,
    authorize: Callable[[web.Request], Awaitable[None]] | None = None,
) -> None:
    """Mount `GET /metrics` serving `metrics`, plus the router's exposition at `router_url`
    (None: the router serves no metrics, the facade's series are the whole answer).

    `authorize` (set when `telemetry.metrics_open` is false) raises for a caller that may not
    read metrics, before anything is served, whether or not the router's port answers.
    """
    app.on_response_prepare.append(metrics.on_response_prepare)
    if router_url is not None:
        app.cleanup_ctx.append(_router_session)

    async def handle(request: web.Request) -> web.Response:
        if authorize is not None:
            await authorize(request)
        router_part = b""
        if router_url is not None:
            router_part = await _router_exposition(request, router_url)
        metrics.router_up.set(1 if router_part else 0)
        return web.Response(
            body=metrics.exposition() + router_part, headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_route("GET", METRICS_ROUTE, handle)


async def _router_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=_ROUTER_SCRAPE_TIMEOUT_SEC)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[_SESSION] = session
        yield


async def _router_exposition(request: web.Request, url: str) -> bytes:
    """The router's exposition; b"" when it cannot be had (the facade's series still are)."""
    headers = {name: request.headers[name] for name in _KEY_HEADERS if name in request.headers}
    try:
        async with request.app[_SESSION].get(url, headers=headers) as response:
            body = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        _LOGGER.warning("router metrics at %s unavailable: %r", url, error)
        return b""
    if status == 401:
        raise ApiError(401, "the router's metrics need an API key", type="authentication_error")
    if status == 403:
        raise ApiError(403, "this key may not read the router's metrics", type="permission_error")
    if status != 200:
        _LOGGER.warning("router metrics at %s answered %d", url, status)
        return b""
    return body


def openapi_paths() -> dict[str, dict[str, Any]]:
    """The OpenAPI description of `GET /metrics`."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {
        METRICS_ROUTE: {
            "get": {
                "operationId": "metrics",
                "tags": ["monitoring"],
                "summary": "Prometheus metrics of the facade and the router, in one exposition",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": {"description": "The router's metrics need a key", "content": error},
                    "403": {"description": "The key lacks the scope", "content": error},
                },
            }
        }
    }
