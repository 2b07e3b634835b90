"""What an HTTP request carries to the router: its id, priority, caller key and body."""

from __future__ import annotations

import uuid
from typing import Final

from aiohttp import web

from clients import Priority
from facade.errors import ApiError
from facade.keys import REQUEST_ID, SETTINGS

__all__ = ["call_metadata", "priority", "read_body", "request_id"]

_MAX_REQUEST_ID = 128
_PRIORITIES: Final[dict[str, Priority]] = {"high": "high", "normal": "normal", "low": "low"}


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
    """gRPC metadata for the router: the request id and the caller's own Authorization."""
    metadata: tuple[tuple[str, str], ...] = (("x-request-id", request_id(request)),)
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        # gRPC refuses metadata values outside printable ASCII; say so instead of failing later.
        if not all(" " <= char <= "~" for char in authorization):
            raise ApiError(400, "the Authorization header must be printable ASCII")
        metadata += (("authorization", authorization),)
    return metadata


async def read_body(request: web.Request) -> str:
    """The body as text, within `api.max_body_bytes` (aiohttp raises 413 past it, chunked too)."""
    limit = request.app[SETTINGS].api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8") from None
