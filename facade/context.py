"""What an HTTP request carries to the router: its id, priority, caller key and body."""

from __future__ import annotations

import json
import uuid
from typing import Any, Final

from aiohttp import web

from clients import Priority, map_rpc_errors
from facade.errors import ApiError
from facade.keys import CLIENT, REQUEST_ID, SETTINGS
from router.v1 import model_control_service_pb2

__all__ = [
    "call_metadata",
    "check_monitor_scope",
    "json_object",
    "json_value",
    "priority",
    "read_body",
    "request_id",
]

_MAX_REQUEST_ID = 128
_PRIORITIES: Final[dict[str, Priority]] = {"high": "high", "normal": "normal", "low": "low"}
# The headers a caller's API key may come in (OpenAI SDKs send the first, Anthropic-style
# clients and curl users often the second).
_KEY_HEADERS: Final = ("Authorization", "x-api-key")


def _visible_ascii(text: str) -> bool:
    return all("!" <= char <= "~" for char in text)


def request_id(request: web.Request) -> str:
    """The caller's `X-Request-ID` when it is 1-128 visible ASCII characters, else a new one."""
    if REQUEST_ID in request:
        return request[REQUEST_ID]
    given = request.headers.get("X-Request-ID", "")
    chosen = given if 0 < len(given) <= _MAX_REQUEST_ID and _visible_ascii(given) else ""
    chosen = chosen or uuid.uuid4().hex
    request[REQUEST_ID] = chosen
    return chosen


def priority(request: web.Request) -> Priority:
    """`X-Request-Priority` (high, normal or low, any case); normal when absent."""
    given = request.headers.get("X-Request-Priority")
    if given is None:
        return "normal"
    chosen = _PRIORITIES.get(given.strip().lower())
    if chosen is None:
        raise ApiError(400, "X-Request-Priority must be high, normal or low")
    return chosen


def call_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for the router: the request id and the caller's own key.

    Both `Authorization` and `x-api-key` are forwarded as sent, in that order: the router
    takes the first that carries a key, and alone decides what it may do.
    """
    metadata: tuple[tuple[str, str], ...] = (("x-request-id", request_id(request)),)
    for header in _KEY_HEADERS:
        value = request.headers.get(header)
        if value is None:
            continue
        # gRPC refuses metadata values outside printable ASCII; say so instead of failing later.
        if not all(" " <= char <= "~" for char in value):
            raise ApiError(400, f"the {header} header must be printable ASCII")
        metadata += ((header.lower(), value),)
    return metadata


async def read_body(request: web.Request) -> str:
    """The body as text, within `api.max_body_bytes` (aiohttp raises 413 past it, chunked too)."""
    limit = request.app[SETTINGS].api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        raw = await request.read()
    except web.RequestPayloadError:  # e.g. Content-Encoding: gzip on a body that is not gzip
        message = "the request body cannot be read as sent (check Content-Encoding)"
        raise ApiError(400, message) from None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8") from None


def json_value(text: str) -> Any:
    """The JSON value of a request body; `ApiError` 400 saying what is wrong with it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {error.msg} (line {error.lineno}, "
            f"column {error.colno})",
        ) from None
    except RecursionError:
        # json's C decoder recurses per array/object level and gives up at the interpreter's
        # recursion limit: e.g. `[` * 100000 is a client mistake (or probe), not a facade bug.
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError:
        # Python refuses to read an integer of more than 4,300 digits (a guard against
        # quadratic conversion): also the client's to fix.
        raise ApiError(400, "the request body has an integer with too many digits") from None


def json_object(text: str) -> dict[str, Any]:
    """Like `json_value`, for a body that must be a JSON object."""
    body = json_value(text)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def check_monitor_scope(request: web.Request, timeout: float) -> None:
    """Raise unless the caller's key has the monitor scope. The router decides, as for every
    key: a cheap monitor-scope call (GetQueueStats) made with that key answers 401/403 or
    passes."""
    with map_rpc_errors():
        await request.app[CLIENT].control.GetQueueStats(
            model_control_service_pb2.GetQueueStatsRequest(),
            metadata=call_metadata(request),
            timeout=timeout,
        )
