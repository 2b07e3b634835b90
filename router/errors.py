"""Domain errors of the router and their one mapping to gRPC status.

Everything the router refuses or fails is a ``RouterError`` subclass; the tree
mirrors the error table of DESIGN §3::

    RouterError
    ├── InvalidRequest          INVALID_ARGUMENT     INVALID_REQUEST
    │   └── UpstreamRejected    INVALID_ARGUMENT     UPSTREAM_REJECTED (llama-server 4xx)
    ├── Unauthenticated         UNAUTHENTICATED      UNAUTHENTICATED
    ├── PermissionDenied        PERMISSION_DENIED    PERMISSION_DENIED
    ├── ModelNotFound           NOT_FOUND            MODEL_NOT_FOUND
    ├── WrongModelKind          FAILED_PRECONDITION  WRONG_MODEL_KIND
    ├── QueueFull               RESOURCE_EXHAUSTED   QUEUE_FULL
    ├── RateLimited             RESOURCE_EXHAUSTED   RATE_LIMITED
    ├── Unavailable             UNAVAILABLE          LOAD_FAILED | CIRCUIT_OPEN | MODEL_CRASHED
    │                                                | NO_CAPACITY | MODEL_UNLOADED | SHUTTING_DOWN
    ├── DeadlineExceeded        DEADLINE_EXCEEDED    QUEUE_TIMEOUT | UPSTREAM_TIMEOUT | LOAD_TIMEOUT
    └── (anything else)         INTERNAL             INTERNAL (message never leaves the router)

Messages are written for clients: short, no file paths, no llama-server logs,
no stack traces. ``to_status`` is the only place that knows gRPC codes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from router.v1 import errors_pb2

ERROR_DOMAIN = "router.v1"


class RouterError(Exception):
    """A failure the caller should see, with a client-safe message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: errors_pb2.ErrorReason.ValueType = errors_pb2.ERROR_REASON_INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: errors_pb2.ErrorReason.ValueType | None = None,
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})

    @property
    def reason_name(self) -> str:
        """The ErrorInfo reason: the ErrorReason enum name without its prefix."""
        return errors_pb2.ErrorReason.Name(self.reason).removeprefix("ERROR_REASON_")


class InvalidRequest(RouterError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = errors_pb2.ERROR_REASON_INVALID_REQUEST


class UpstreamRejected(InvalidRequest):
    """llama-server answered 4xx; its OpenAI error type travels as metadata `upstream_type`."""

    reason = errors_pb2.ERROR_REASON_UPSTREAM_REJECTED


class Unauthenticated(RouterError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = errors_pb2.ERROR_REASON_UNAUTHENTICATED


class PermissionDenied(RouterError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = errors_pb2.ERROR_REASON_PERMISSION_DENIED


class ModelNotFound(RouterError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_MODEL_NOT_FOUND

    def __init__(self, alias: str) -> None:
        super().__init__(f"model '{_clip(alias)}' does not exist", metadata={"model": _clip(alias)})


class WrongModelKind(RouterError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = errors_pb2.ERROR_REASON_WRONG_MODEL_KIND


class QueueFull(RouterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_QUEUE_FULL


class RateLimited(RouterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_RATE_LIMITED


class Unavailable(RouterError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = errors_pb2.ERROR_REASON_LOAD_FAILED


class DeadlineExceeded(RouterError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = errors_pb2.ERROR_REASON_QUEUE_TIMEOUT


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def to_status(error: BaseException) -> grpc.Status:
    """Map any exception to a gRPC status with ErrorInfo (and RetryInfo) details."""
    if not isinstance(error, RouterError):
        error = RouterError("internal error")
    info = error_details_pb2.ErrorInfo(
        reason=error.reason_name, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    status = status_pb2.Status(code=_RPC_CODE[error.code], message=error.message)
    status.details.add().Pack(info)
    if error.retry_after is not None:
        seconds = max(1, math.ceil(error.retry_after))
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))
        status.details.add().Pack(retry)
    return rpc_status.to_status(status)


# grpc.StatusCode values are (int, str) pairs; google.rpc.Status wants the int.
_RPC_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
}
