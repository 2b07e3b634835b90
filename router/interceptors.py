"""Server interceptors, and ``rewrap``, the one way they wrap a method's behavior.

``ErrorInterceptor`` turns domain errors into gRPC statuses in one place;
``CancelledCallInterceptor`` records CANCELLED on the tracing span of a call that
ended early (``router.auth.AuthInterceptor`` is the third user of ``rewrap``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from opentelemetry import trace

from router.errors import RouterError, to_status

_LOGGER = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]
Unary = Callable[[Any, _Context], Awaitable[Any]]
Stream = Callable[[Any, _Context], AsyncIterator[Any]]
Bidi = Callable[[AsyncIterator[Any], _Context], AsyncIterator[Any]]
STATUS_CODE_ATTRIBUTE = "rpc.grpc.status_code"


def end_with(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    """End the call with ``error``'s status, recorded once on the call's span; anything not a
    RouterError is logged as a bug.

    The status is set, not raised with ``context.abort``: the AbortError that raises passes
    through OpenTelemetry's server interceptor, which records it twice (its own
    ``record_exception`` and its span's context manager), each time as "Locally aborted."
    without the error itself. A handler that sets its status and returns ends the call the
    same way (grpc.aio drops a unary response when the code is not OK).
    """
    if not isinstance(error, RouterError):
        _LOGGER.error("internal error in %s", _method(context), exc_info=error)
    trace.get_current_span().record_exception(error)  # the server span (no-op untraced)
    status = to_status(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def _method(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context._rpc_event.call_details.method.decode())  # type: ignore[attr-defined]
    except AttributeError:
        return "an RPC"


def _wrap_unary(behavior: Unary) -> Unary:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            end_with(context, error)
            return None

    return wrapped


async def responses(behavior: Any, request: Any, context: _Context) -> AsyncIterator[Any]:
    """What a streaming behavior sends, whichever way it is written: an async generator
    yields its responses; a coroutine (grpc's own HealthServicer.Watch) writes them itself
    with ``context.write`` and yields nothing here."""
    result = behavior(request, context)
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


def _wrap_stream(behavior: Stream) -> Stream:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in responses(behavior, request, context):
                yield response
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            end_with(context, error)

    return wrapped


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in grpc-stubs, not at runtime
    _ServerInterceptor = grpc.aio.ServerInterceptor


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    *,
    unary: Callable[[Unary], Unary] | None = None,
    stream: Callable[[Stream], Stream] | None = None,
    bidi: Callable[[Bidi], Bidi] | None = None,
    refuse: RouterError | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behavior wrapped by the function given for its kind; a kind
    without one is returned as is, or, given ``refuse``, replaced by a handler that ends every
    call with that error: an interceptor that guards calls (auth) must fail closed on a kind
    it has no guard for, e.g. a client-streaming RPC added later. (grpc-stubs types behaviors
    as synchronous; on a grpc.aio server they are coroutines and async generators.)"""
    if handler is None:
        return handler  # type: ignore[return-value]  # an unknown method: grpc answers it
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(cast(Unary, handler.unary_unary)), **codec)
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(cast(Stream, handler.unary_stream)), **codec
        )
    if handler.stream_stream is not None and bidi is not None:
        return grpc.stream_stream_rpc_method_handler(
            bidi(cast(Bidi, handler.stream_stream)), **codec
        )
    if refuse is None:
        return handler
    return _refusing(handler, refuse, codec)


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], error: RouterError, codec: dict[str, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s kind whose every call ends with ``error``, unserved."""

    async def refused(_request: Any, context: _Context) -> None:
        # A coroutine serves any of the four kinds on grpc.aio (it may write, not yield).
        _LOGGER.error("refused %s: no guard for its kind of call", _method(context))
        end_with(context, error)

    behavior: Any = refused
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(behavior, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behavior, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behavior, **codec)
    return grpc.stream_stream_rpc_method_handler(behavior, **codec)


class ErrorInterceptor(_ServerInterceptor):
    """Turn exceptions escaping a handler into the mapped status (never a bare INTERNAL)."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return rewrap(
            await continuation(handler_call_details),
            unary=_wrap_unary,
            stream=_wrap_stream,
            bidi=_wrap_stream,  # server reflection
        )


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
        self._span.set_attribute(STATUS_CODE_ATTRIBUTE, code.value[0])


def _ending_early_unary(behavior: Unary) -> Unary:
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


def _ending_early_stream(behavior: Stream) -> Stream:
    async def wrapped(request: Any, context: _Context) -> AsyncIterator[Any]:
        early_end = _EarlyEnd(context)
        try:
            async for response in responses(behavior, request, context):
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
        return rewrap(
            await continuation(handler_call_details),
            unary=_ending_early_unary,
            stream=_ending_early_stream,
        )
