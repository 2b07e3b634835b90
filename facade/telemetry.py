"""Request context for logs, and OpenTelemetry tracing of the facade.

Every request sets `router.logs.request_id`, so each log line written while serving it carries
the request id (and, with tracing on, the trace id).

With a tracer provider (export configured, see `router.telemetry.tracing`), a request is one
trace: a SERVER span per HTTP request, with the W3C context of an incoming `traceparent`, and a
CLIENT span per router call from the public grpc.aio client interceptors, which carry the context
to the router in the call's metadata. The router call's model and priority go on both spans.
An innermost interceptor keeps cancellation working under them: a client that leaves still
frees the router's slot.

The server span comes from a middleware built on the public helpers of
opentelemetry-instrumentation-aiohttp-server rather than its instrumentor: the instrumentor
replaces `web.Application` with a subclass for the whole process, which aiohttp deprecates
(opentelemetry-python-contrib#2859) and which would trace every app, tests' included, through
global state.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc.aio
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_server import (
    collect_request_attributes,
    get_default_span_name,
    getter,
    set_status_code,
)
from opentelemetry.propagate import extract

from facade.context import request_id
from facade.metrics import FacadeMetrics
from router.logs import request_id as log_request_id

__all__ = ["client_interceptors", "log_context", "observing_middlewares", "server_span_middleware"]

MODEL_ATTRIBUTE: Final = "routermodel.model"
PRIORITY_ATTRIBUTE: Final = "routermodel.priority"
# The request's server span, for the client interceptor's hook: the hook runs in the call's own
# task (grpc.aio starts one per call, with a copy of this context), where the current span is
# the client span.
_SERVER_SPAN: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "facade_server_span", default=None
)


def observing_middlewares(
    metrics: FacadeMetrics, provider: trace.TracerProvider | None
) -> list[Middleware]:
    """The middlewares that go before (outside) the error middleware, outermost first: the
    server span (so it covers everything), the log context, then the metrics."""
    outer: list[Middleware] = [] if provider is None else [server_span_middleware(provider)]
    return [*outer, log_context, metrics.middleware]


@web.middleware
async def log_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Put the request id on every log line written while the request is served."""
    token = log_request_id.set(request_id(request))
    try:
        return await handler(request)
    finally:
        log_request_id.reset(token)


def server_span_middleware(provider: trace.TracerProvider) -> Middleware:
    """A SERVER span around each request, named `<METHOD> <route template>`."""
    tracer = provider.get_tracer("facade")

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        with tracer.start_as_current_span(
            get_default_span_name(request),
            context=extract(request, getter=getter),
            kind=trace.SpanKind.SERVER,
            attributes=collect_request_attributes(request),
            # The error middleware inside answers every exception; a cancellation (the client
            # left) is not the server's error.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            token = _SERVER_SPAN.set(span)
            try:
                response = await handler(request)
            finally:
                _SERVER_SPAN.reset(token)
            set_status_code(span, response.status)  # 5xx marks the span as an error
            return response

    return traced


def client_interceptors(provider: trace.TracerProvider) -> Sequence[grpc.aio.ClientInterceptor]:
    """The grpc.aio client interceptors that trace each router call and propagate its context,
    outermost first."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    tracing: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=provider, request_hook=_annotate_call
    )
    return [*tracing, _CancelAbandonedUnary(), _CancelAbandonedStream()]


if TYPE_CHECKING:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:  # generic only in grpc-stubs, not at runtime
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor


def _cancel_with_interceptors(call: Any) -> Any:
    """Cancel `call` when the task running the call's interceptors is cancelled.

    grpc.aio runs a call's interceptors in a task of their own; cancelling the caller (or the
    call) before that task ends cancels the task, not the call it started. The tracing
    interceptor keeps that task running until a unary call ends (it waits for the status:
    opentelemetry-python-contrib#3271), so without this a client leaving an embedding request
    would leave the router busy with it.
    """
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(lambda done: call.cancel() if done.cancelled() else None)
    return call


class _CancelAbandonedUnary(_UnaryUnaryInterceptor):
    """Innermost: sees the real call (see `_cancel_with_interceptors`)."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return _cancel_with_interceptors(await continuation(client_call_details, request))


class _CancelAbandonedStream(_UnaryStreamInterceptor):
    """Innermost: sees the real call (see `_cancel_with_interceptors`)."""

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return _cancel_with_interceptors(await continuation(client_call_details, request))


def _annotate_call(span: trace.Span, request: Any) -> None:
    """Put the call's model and priority on its client span and on the request's server span."""
    if not isinstance(request, Message):
        return
    attributes: dict[str, str] = {}
    model = getattr(request, "model", "")
    if isinstance(model, str) and model:
        attributes[MODEL_ATTRIBUTE] = model
    priority = request.DESCRIPTOR.fields_by_name.get("priority")
    if priority is not None and priority.enum_type is not None:
        value = priority.enum_type.values_by_number.get(getattr(request, "priority", 0))
        if value is not None:
            attributes[PRIORITY_ATTRIBUTE] = value.name.removeprefix("PRIORITY_").lower()
    if not attributes:
        return
    span.set_attributes(attributes)
    server = _SERVER_SPAN.get()
    if server is not None:
        server.set_attributes(attributes)
