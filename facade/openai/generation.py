"""`POST /v1/chat/completions` and `POST /v1/completions`: one router call each.

The body goes to the router as received. A non-streamed request is one unary Complete call
(cheaper than a stream: one message, no queue events), answered with llama-server's own
response body. A streamed one is a Generate call whose messages' chunks are written as SSE
frames, one write per message, without parsing them (the hot path: thousands of chunks a
second).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TypedDict

from aiohttp import web

from clients import Chunk, GenerateEvent, GenerateKind, Priority
from facade.context import call_metadata, priority, read_body, request_id
from facade.errors import internal_error
from facade.keys import CLIENT, STREAMS
from facade.openai.protocol import parse_generation_request
from facade.sse import DONE, data_frame, openai_error_frame

__all__ = ["chat_completions", "completions"]

_LOGGER = logging.getLogger(__name__)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streamed or not."""
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI (legacy) text completions, streamed or not."""
    return await _generate(request, "completion")


class _CallOptions(TypedDict):
    kind: GenerateKind
    priority: Priority
    request_id: str
    metadata: Sequence[tuple[str, str]]


async def _generate(request: web.Request, kind: GenerateKind) -> web.StreamResponse:
    parsed = parse_generation_request(await read_body(request), kind)
    client = request.app[CLIENT]
    options = _CallOptions(
        kind=kind,
        priority=priority(request),
        request_id=request_id(request),
        metadata=call_metadata(request),
    )
    if not parsed.stream:
        completion = await client.complete(parsed.model, parsed.body, **options)
        if not completion.body:
            _LOGGER.error("the router answered a non-streamed call without a response")
            raise internal_error()
        return web.Response(text=completion.body, content_type="application/json")
    events = client.generate(parsed.model, parsed.body, **options)
    async with contextlib.aclosing(events):
        return await _stream(request, events)


async def _stream(request: web.Request, events: AsyncIterator[GenerateEvent]) -> web.StreamResponse:
    async with request.app[STREAMS].open(request, openai_error_frame) as stream:
        async for event in events:
            # Queued/Loading need no frame (keep-alive comments cover long waits); End's usage
            # already rode in llama-server's own chunks.
            if type(event) is Chunk and event.data:
                await stream.write(data_frame(event.data))
        await stream.close(DONE)
    return stream.response
