"""Every facade error as OpenAI's envelope, from one table.

A failed router call arrives as a `clients.RouterError` subclass; `ERROR_TABLE` gives its HTTP
status and OpenAI `error.type` (DESIGN §3), and `error_code` its `error.code`. Errors the facade
finds itself (request validation) are `ApiError`s, and aiohttp's own 404/405/413 become one in
`error_middleware`, so a client sees `{"error": {"message", "type", "param", "code"}}` whatever
failed, streaming or not.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from clients import (
    AuthenticationError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestCancelledError,
    RequestTooLargeError,
    RouterError,
    UnavailableError,
    WrongModelKindError,
)

__all__ = [
    "ERROR_TABLE",
    "ApiError",
    "error_code",
    "error_middleware",
    "from_http_exception",
    "from_router_error",
    "internal_error",
]

_LOGGER = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# The client exception -> (HTTP status, OpenAI error.type). Subclasses come before their base
# (RequestTooLargeError is an InvalidRequestError): the first row the error is an instance of wins.
ERROR_TABLE: tuple[tuple[type[RouterError], int, str], ...] = (
    (RequestTooLargeError, 413, INVALID_REQUEST),
    (InvalidRequestError, 400, INVALID_REQUEST),
    (AuthenticationError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (ModelNotFoundError, 404, INVALID_REQUEST),
    (WrongModelKindError, 400, INVALID_REQUEST),
    (RateLimitError, 429, "rate_limit_error"),
    (UnavailableError, 503, SERVER_ERROR),
    (DeadlineExceededError, 504, "timeout_error"),
    # The router or the transport cancelled the call (not the caller, who sees no response).
    (RequestCancelledError, 503, SERVER_ERROR),
    (InternalError, 500, SERVER_ERROR),
)

# error.code for the router's ErrorInfo reasons whose OpenAI spelling differs from the
# lower-cased reason; every other reason is used lower-cased.
_CODES_BY_REASON: Mapping[str, str] = {
    "UNAUTHENTICATED": "invalid_api_key",
    "RATE_LIMITED": "rate_limit_exceeded",
    "INVALID_REQUEST": "",
    "INTERNAL": "",
}
# error.code for llama-server's own error types (UPSTREAM_REJECTED carries one as metadata).
_CODES_BY_UPSTREAM_TYPE: Mapping[str, str] = {
    "exceed_context_size_error": "context_length_exceeded",
    "invalid_request_error": "",
}
# error.code and error.message when the status carries no reason: a transport failure rather
# than the router. gRPC's own text names addresses and its internals, so the caller gets a fixed
# sentence instead (the original goes to the log).
_WITHOUT_REASON: Mapping[type[RouterError], tuple[str, str]] = {
    RequestTooLargeError: ("request_too_large", "the request is too large for the router"),
    UnavailableError: ("router_unavailable", "the router is unavailable"),
    DeadlineExceededError: ("deadline_exceeded", "the router did not answer in time"),
    RequestCancelledError: ("cancelled", "the router call was cancelled"),
}
# Retry-After (seconds) for a 429/503 whose status carried no RetryInfo.
_DEFAULT_RETRY_AFTER = 1
_RETRYABLE_STATUSES = frozenset({429, 503})


class ApiError(Exception):
    """An error answered with OpenAI's envelope.

    **Parameters:**

    * **status** - the HTTP status.
    * **message** - `error.message`, safe to show to the caller.
    * **type** - `error.type`, e.g. "invalid_request_error".
    * **param** - `error.param`, the request field at fault, or None.
    * **code** - `error.code`, e.g. "model_not_found", or None.
    * **retry_after** - whole seconds for a `Retry-After` header, or None for no header.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str | None]]:
        """The envelope: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json(self) -> str:
        """The envelope as one line of JSON, e.g. for an SSE frame."""
        return json.dumps(self.body(), separators=(",", ":"))

    def response(self) -> web.Response:
        """The envelope as an HTTP response, with `Retry-After` when set."""
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return web.Response(
            status=self.status,
            text=self.json(),
            content_type="application/json",
            headers=headers,
        )


def error_code(error: RouterError) -> str | None:
    """`error.code` for a router error: from its ErrorInfo reason, or the transport failure."""
    if error.reason == "UPSTREAM_REJECTED":
        upstream = error.metadata.get("upstream_type", "")
        return _CODES_BY_UPSTREAM_TYPE.get(upstream, upstream) or None
    if error.reason:
        return _CODES_BY_REASON.get(error.reason, error.reason.lower()) or None
    for error_class, (code, _) in _WITHOUT_REASON.items():
        if isinstance(error, error_class):
            return code
    return None


def _client_message(error: RouterError) -> str:
    if error.reason:
        return error.message or "the router failed the request"
    _LOGGER.warning("router call failed in transport: %r", error)
    return next(
        (message for cls, (_, message) in _WITHOUT_REASON.items() if isinstance(error, cls)),
        "the router failed the request",
    )


def from_router_error(error: RouterError) -> ApiError:
    """The `ApiError` for a failed router call, through `ERROR_TABLE`."""
    status, error_type = next(
        ((status, error_type) for cls, status, error_type in ERROR_TABLE if isinstance(error, cls)),
        (500, SERVER_ERROR),
    )
    if status == 500:
        # The router keeps internals out of its messages, but a transport failure's text names
        # addresses and grpc internals; neither helps the caller.
        _LOGGER.error("router call failed: %r", error)
        return internal_error()
    retry_after = None
    if status in _RETRYABLE_STATUSES:
        retry_after = (
            _DEFAULT_RETRY_AFTER
            if error.retry_after is None
            else max(1, math.ceil(error.retry_after))
        )
    return ApiError(
        status,
        _client_message(error),
        type=error_type,
        # The router names the request field at fault (e.g. max_tokens over the cap) this way.
        param=error.metadata.get("param") or None,
        code=error_code(error),
        retry_after=retry_after,
    )


def internal_error() -> ApiError:
    """A 500 that says nothing about internals (they go to the log)."""
    return ApiError(500, "internal server error", type=SERVER_ERROR)


def from_http_exception(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own errors (unknown route, wrong method, body too large) as `ApiError`s."""
    if exc.status == 404:
        message = f"Invalid URL ({request.method} {request.path})"
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed on {request.path}"
    else:
        message = exc.text or exc.reason
    error_type = SERVER_ERROR if exc.status >= 500 else INVALID_REQUEST
    return ApiError(exc.status, message, type=error_type)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer every error with the envelope (a stream already started handles its own)."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except RouterError as error:
        return from_router_error(error).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc, request).response()
    except Exception:
        _LOGGER.exception("unhandled error on %s %s", request.method, request.path)
        return internal_error().response()
