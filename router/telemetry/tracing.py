"""OpenTelemetry tracing setup, shared by the router and the facade.

Export is on when ``telemetry.otlp_endpoint`` or the standard
``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set (and ``OTEL_SDK_DISABLED`` is
not): OTLP over gRPC, batched. Without it nothing is installed and the API's
no-op tracer costs nothing on the hot path.

``CancelledCallInterceptor`` completes the public grpc.aio server instrumentation: a call the
client cancelled otherwise keeps ``rpc.grpc.status_code`` 0 (OK) on its span.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_LOGGER = logging.getLogger(__name__)


def otlp_endpoint(configured: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    return (
        configured
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def setup_tracing(service_name: str, configured_endpoint: str | None) -> TracerProvider | None:
    """Install an exporting tracer provider, or return None when export is off."""
    endpoint = otlp_endpoint(configured_endpoint)
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _LOGGER.info("tracing: exporting spans of %s to %s", service_name, endpoint)
    return provider


_Context = grpc.aio.ServicerContext[Any, Any]
_Unary = Callable[[Any, _Context], Awaitable[Any]]
_Stream = Callable[[Any, _Context], AsyncIterator[Any]]
_STATUS_CODE_ATTRIBUTE = "rpc.grpc.status_code"

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in grpc-stubs, not at runtime
    _ServerInterceptor = grpc.aio.ServerInterceptor


class _EarlyEnd:
    """Marks a call's server span when the call ends before its handler does.

    A cancellation reaches a handler in one of two ways: as asyncio.CancelledError at the
    handler's current await, or, when a streaming handler is suspended at a `yield` while
    grpc.aio writes its response, not at all: grpc.aio ends the call, runs its done callbacks,
    and leaves the generators to the garbage collector.
    """

    def __init__(self, context: _Context) -> None:
        self._span = trace.get_current_span()  # the server span: its interceptor runs outside
        self._context = context
        self.handler_done = False
        # grpc-stubs types the callback as its own DoneCallback class; any callable is accepted.
        context.add_done_callback(self._call_done)  # type: ignore[arg-type]

    def _call_done(self, context: _Context) -> None:
        if not self.handler_done:
            self.mark()

    def mark(self) -> None:
        if not self._span.is_recording():
            return
        # grpc.aio ends the call early both when the client cancels and when its deadline passes.
        remaining = self._context.time_remaining()
        code = grpc.StatusCode.CANCELLED
        if remaining is not None and remaining <= 0:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        self._span.set_attribute(_STATUS_CODE_ATTRIBUTE, code.value[0])


def _unary(behavior: _Unary) -> _Unary:
    async def wrapped(request: Any, context: _Context) -> Any:
        early_end = _EarlyEnd(context)
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            early_end.mark()
            raise
        finally:
            early_end.handler_done = True

    return wrapped


def _stream(behavior: _Stream) -> _Stream:
    async def wrapped(request: Any, context: _Context) -> AsyncIterator[Any]:
        early_end = _EarlyEnd(context)
        try:
            async for response in behavior(request, context):
                yield response
        except asyncio.CancelledError:
            early_end.mark()
            raise
        finally:
            early_end.handler_done = True

    return wrapped


class CancelledCallInterceptor(_ServerInterceptor):
    """Record CANCELLED (or DEADLINE_EXCEEDED) on the server span of a call that ended early.

    Install it right after (inside) the OpenTelemetry server interceptor, whose span is then
    the current one: that interceptor only sees statuses set through the servicer context, and
    a cancellation is not one (see `_EarlyEnd`).
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # grpc-stubs types handlers as synchronous; on a grpc.aio server they are async.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(cast(_Unary, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream(cast(_Stream, handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
