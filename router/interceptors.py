"""Server interceptors: domain errors become gRPC statuses in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc

from router.errors import RouterError, to_status

_LOGGER = logging.getLogger(__name__)

_Unary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_Stream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    """Abort the call with ``error``'s status; anything not a RouterError is logged as a bug."""
    if not isinstance(error, RouterError):
        _LOGGER.error("internal error in %s", _method(context), exc_info=error)
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _method(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context._rpc_event.call_details.method.decode())  # type: ignore[attr-defined]
    except AttributeError:
        return "an RPC"


def _wrap_unary(behavior: _Unary) -> _Unary:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort_with(context, error)

    return wrapped


def _wrap_stream(behavior: _Stream) -> _Stream:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort_with(context, error)

    return wrapped


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in grpc-stubs, not at runtime
    _ServerInterceptor = grpc.aio.ServerInterceptor


class ErrorInterceptor(_ServerInterceptor):
    """Turn exceptions escaping a handler into the mapped status (never a bare INTERNAL)."""

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
                _wrap_unary(cast(_Unary, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(cast(_Stream, handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:  # server reflection
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(cast(_Stream, handler.stream_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
