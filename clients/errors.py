"""Exceptions the client raises, one class per kind of failure a caller handles differently.

Every client method raises only these. `from_rpc_error()` builds them from a failed gRPC call,
choosing the class by status code and, where the code alone is ambiguous, by the router's
`google.rpc.ErrorInfo` reason; never by message text.

The tree, with the status code (and router reason) each class stands for:

    RouterError
    ├── InvalidRequestError ........ INVALID_ARGUMENT: malformed, or llama-server refused it
    │   └── RequestTooLargeError ... RESOURCE_EXHAUSTED, no reason: gRPC's message size limit
    ├── AuthenticationError ........ UNAUTHENTICATED: API key missing or wrong
    ├── PermissionDeniedError ...... PERMISSION_DENIED: the key lacks the scope
    ├── ModelNotFoundError ......... NOT_FOUND: no model has the alias
    ├── WrongModelKindError ........ FAILED_PRECONDITION: e.g. chat on an embedding model
    ├── RateLimitError ............. RESOURCE_EXHAUSTED, QUEUE_FULL or RATE_LIMITED
    ├── UnavailableError ........... UNAVAILABLE: load failed, circuit open, crash, unreachable
    ├── DeadlineExceededError ...... DEADLINE_EXCEEDED: queue, load, upstream or caller timeout
    ├── RequestCancelledError ...... CANCELLED: by the router or the transport
    └── InternalError .............. INTERNAL, UNKNOWN and every other code
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import cast

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestCancelledError",
    "RequestTooLargeError",
    "RouterError",
    "UnavailableError",
    "WrongModelKindError",
    "ERROR_DOMAIN",
    "from_rpc_error",
    "map_rpc_errors",
]

# The router puts its ErrorInfo under this domain; ErrorInfo from anyone else (a proxy, another
# service) does not carry a router.v1 ErrorReason and is ignored.
ERROR_DOMAIN = "router.v1"
_DETAILS_KEY = "grpc-status-details-bin"


class RouterError(Exception):
    """A router call failed.

    Usage:

    ```python
    try:
        result = await client.embed("bge", ["hello"])
    except clients.RateLimitError as error:
        await asyncio.sleep(error.retry_after or 1.0)
    except clients.RouterError as error:
        log.warning("embed failed: %s %s %s", error.code.name, error.reason, error)
    ```

    **Parameters:**

    * **message** - the status message, safe to show to a caller.
    * **code** - the gRPC status code.
    * **reason** - the router's `ErrorReason` name without its prefix (e.g. "QUEUE_FULL"),
      or "" when the status carries none (transport errors, deadlines set by the caller).
    * **retry_after** - seconds the router suggests waiting before a retry, or None.
    * **metadata** - the ErrorInfo's metadata (e.g. the model alias), empty when absent.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str = "",
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.retry_after = retry_after
        self.metadata: Mapping[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )


class InvalidRequestError(RouterError):
    """The request is malformed, or llama-server refused it (e.g. context too long)."""


class RequestTooLargeError(InvalidRequestError):
    """A message exceeded gRPC's size limit, on this side or the router's."""


class AuthenticationError(RouterError):
    """The API key is missing or wrong."""


class PermissionDeniedError(RouterError):
    """The API key lacks the scope the call needs."""


class ModelNotFoundError(RouterError):
    """No model is configured under the alias."""


class WrongModelKindError(RouterError):
    """The model does not serve this kind of call, e.g. chat on an embedding model."""


class RateLimitError(RouterError):
    """The model's queue is full or the key's rate limit is spent; retry after `retry_after`."""


class UnavailableError(RouterError):
    """The model or the router cannot serve now.

    The `reason` tells why: LOAD_FAILED, CIRCUIT_OPEN, MODEL_CRASHED, NO_CAPACITY,
    MODEL_UNLOADED, SHUTTING_DOWN, UPSTREAM_ERROR, or "" when the router is unreachable.
    """


class DeadlineExceededError(RouterError):
    """The call ran out of time.

    The `reason` tells whose time: QUEUE_TIMEOUT, LOAD_TIMEOUT, UPSTREAM_TIMEOUT, or "" when the
    caller's own deadline passed.
    """


class RequestCancelledError(RouterError):
    """The call was cancelled by the router or the transport.

    A caller cancelling its own task gets `asyncio.CancelledError`, not this.
    """


class InternalError(RouterError):
    """The router failed unexpectedly (INTERNAL, UNKNOWN, or a code the client does not map)."""


_CLASS_BY_CODE: Mapping[grpc.StatusCode, type[RouterError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: WrongModelKindError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def _error_class(code: grpc.StatusCode, reason: str) -> type[RouterError]:
    # gRPC itself answers RESOURCE_EXHAUSTED, with no details, to an oversized message; the
    # router's own RESOURCE_EXHAUSTED (queue full, rate limit) always carries a reason.
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not reason:
        return RequestTooLargeError
    return _CLASS_BY_CODE.get(code, InternalError)


def from_rpc_error(error: grpc.aio.AioRpcError) -> RouterError:
    """Build the `RouterError` subclass for a failed call, with the status details it carries.

    The reason and metadata come from the `google.rpc.ErrorInfo` of domain "router.v1" and
    `retry_after` from the `google.rpc.RetryInfo` in the trailing `grpc-status-details-bin`;
    details that are absent or unreadable leave them empty.
    """
    reason = ""
    metadata: Mapping[str, str] = {}
    retry_after: float | None = None
    for detail in _status_details(error):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN and not reason:
                reason = info.reason
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    code = error.code()
    return _error_class(code, reason)(
        error.details() or "",
        code=code,
        reason=reason,
        retry_after=retry_after,
        metadata=metadata,
    )


def _status_details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    # grpc-stubs types this like the sync API; grpc.aio returns Metadata of (key, value) pairs.
    trailing = cast("Iterable[tuple[str, str | bytes]]", error.trailing_metadata() or ())
    for key, value in trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except DecodeError:
                return []
    return []


@contextlib.contextmanager
def map_rpc_errors() -> Iterator[None]:
    """Re-raise a gRPC failure inside the block as the matching `RouterError`, chained to it."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from error
