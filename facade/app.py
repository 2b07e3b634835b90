"""The facade's application factory: routes, middlewares, and the router client's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web
from opentelemetry import trace

from clients import RouterClient
from facade import bridge, openai, openapi, status
from facade.context import check_monitor_scope, request_id
from facade.cors import setup_cors
from facade.errors import error_middleware
from facade.health import health
from facade.keys import CLIENT, METRICS, SETTINGS, STREAMS
from facade.metrics import FacadeMetrics, setup_metrics
from facade.sse import StreamRegistry
from facade.telemetry import client_interceptors, observing_middlewares
from facade.tls import channel_credentials
from router.config import GrpcConfig, Settings

__all__ = ["create_app", "router_metrics_url", "router_target"]

# Idle seconds before an SSE response sends a `: keep-alive` comment (and, while the request
# still waits for the model, its headers).
DEFAULT_KEEPALIVE_SEC = 10.0
# How long shutdown waits for the streams it ended to send their last frame.
_STREAM_STOP_TIMEOUT_SEC = 2.0
# Find a restarted router within about a second, whatever backoff the channel reached while it
# was away (gRPC's default grows to two minutes).
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def router_target(grpc: GrpcConfig) -> str:
    """Where the router listens, as a gRPC target; a wildcard bind is reached on loopback."""
    host = grpc.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{grpc.port}"


def router_metrics_url(settings: Settings) -> str | None:
    """The router's /metrics; None when it serves none, or on a port the facade cannot know
    (0: the router picks one)."""
    port = settings.telemetry.metrics_port
    if not port:
        return None
    host = router_target(settings.grpc).rsplit(":", 1)[0]
    return f"http://{host}:{port}/metrics"


def create_app(
    settings: Settings,
    *,
    client: RouterClient | None = None,
    keepalive_sec: float = DEFAULT_KEEPALIVE_SEC,
    tracer_provider: trace.TracerProvider | None = None,
) -> web.Application:
    """The facade for `settings`: OpenAI routes, the admin bridge, health, monitoring, OpenAPI.

    `client` is used as given and left open (tests pass one to a fake router); without it the
    app opens its own client to `settings.grpc` at startup and closes it at cleanup. With
    `tracer_provider`, requests and the router calls they make (on the app's own client) are
    traced.
    """
    metrics = FacadeMetrics()
    app = web.Application(
        client_max_size=settings.api.max_body_bytes,
        middlewares=[*observing_middlewares(metrics, tracer_provider), error_middleware],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STREAMS] = StreamRegistry(keepalive_sec)
    app.cleanup_ctx.append(_router_client(settings, client, tracer_provider))
    app.on_shutdown.append(_stop_streams)
    app.on_response_prepare.append(_echo_request_id)
    setup_cors(app, settings.api.cors_origins)
    openai.setup_routes(app)
    bridge.setup_routes(app)
    app.router.add_route("GET", "/health", health)
    setup_metrics(
        app,
        metrics,
        router_metrics_url(settings),
        authorize=None if settings.telemetry.metrics_open else _monitor_key,
    )
    status.setup_routes(app)
    openapi.setup_routes(app)
    return app


def _router_client(
    settings: Settings, given: RouterClient | None, tracer_provider: trace.TracerProvider | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        if given is not None:
            app[CLIENT] = given
            yield
            return
        # No api_key: each call forwards its caller's own Authorization instead.
        tls = settings.grpc.tls
        client = RouterClient(
            router_target(settings.grpc),
            credentials=None if tls is None else channel_credentials(tls),
            max_message_bytes=settings.api.max_message_bytes,
            options=_RECONNECT_OPTIONS,
            interceptors=() if tracer_provider is None else client_interceptors(tracer_provider),
        )
        app[CLIENT] = client
        try:
            yield
        finally:
            await client.close()

    return lifetime


async def _stop_streams(app: web.Application) -> None:
    # Status streams never end by themselves; without this, shutdown would wait its whole
    # timeout for them.
    await app[STREAMS].stop_all(_STREAM_STOP_TIMEOUT_SEC)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Request-ID"] = request_id(request)


async def _monitor_key(request: web.Request) -> None:
    """Raise unless the caller's key may read metrics."""
    await check_monitor_scope(request, timeout=2.0)
