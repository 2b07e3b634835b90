"""The streamed hot path: chunk text without full parsing, and batches read from upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer

from router.inference import CHAT, COMPLETION, _Tally
from router.pool.process import CLOSE
from router.pool.upstream import EventReader, Upstream, UpstreamBroken
from tests.helpers import wait_until

ENVELOPE = '"created":1,"id":"chatcmpl-x","model":"m","system_fingerprint":"b0","object":"o"'
CHAT_CHUNKS = [
    # llama-server's text-only chunk: read without a full parse.
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" moon"}}],' + ENVELOPE + "}",
    # Escapes, and text that spells keys the fast path looks for.
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"a\\"usage\\": \\u00e9\\n"}}],'
    + ENVELOPE
    + "}",
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\\"}}],"}}],' + ENVELOPE + "}",
    # Everything else goes through json.loads.
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    + ENVELOPE
    + "}",
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" left"},"logprobs":'
    '{"content":[{"id":5,"token":" left","logprob":-1.0}]}}],' + ENVELOPE + "}",
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" x"}}],'
    + ENVELOPE
    + ',"timings":{"predicted_n":3}}',
    '{"choices":[{"finish_reason":"length","index":0,"delta":{}}],' + ENVELOPE + "}",
    '{"choices":[],' + ENVELOPE + ',"usage":{"completion_tokens":3,"prompt_tokens":2,'
    '"total_tokens":5,"prompt_tokens_details":{"cached_tokens":1}},"timings":{"cache_n":1}}',
]
COMPLETION_CHUNKS = [
    '{"choices":[{"text":" day","index":0,"logprobs":null,"finish_reason":null}],' + ENVELOPE + "}",
    '{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
    + ENVELOPE
    + ',"usage":{"completion_tokens":1,"prompt_tokens":3,"total_tokens":4}}',
]


@pytest.mark.parametrize(("kind", "chunks"), [(CHAT, CHAT_CHUNKS), (COMPLETION, COMPLETION_CHUNKS)])
def test_streamed_chunks_read_like_a_full_parse(kind: str, chunks: list[str]) -> None:
    fast, full = _Tally(), _Tally()
    for chunk in chunks:
        assert fast.read_streamed(chunk, kind) == full.read(json.loads(chunk), kind)
    assert fast.finish_reason == full.finish_reason != ""
    assert fast.usage_counts() == full.usage_counts()


@pytest.mark.parametrize("text", ['"x', '"\\q"'])
def test_text_that_is_no_json_string_is_an_error(text: str) -> None:
    head = '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":'
    with pytest.raises(ValueError):
        _Tally().read_streamed(head + text + "}}]," + ENVELOPE + "}", CHAT)


Script = Callable[[web.StreamResponse], Coroutine[Any, Any, None]]
DONE = b"data: [DONE]\n\n"


def script_of(*steps: bytes | asyncio.Event | Callable[[], None]) -> Script:
    """A response body in steps: bytes are written, an Event is waited for, a callable called."""

    async def script(response: web.StreamResponse) -> None:
        for step in steps:
            if isinstance(step, bytes):
                await response.write(step)
            elif isinstance(step, asyncio.Event):
                await step.wait()
            else:
                step()

    return script


@pytest.fixture
async def stream_from(aiohttp_server: AiohttpServer) -> AsyncIterator[Callable[[Script], Any]]:
    """Open a streamed response whose body `script` writes."""
    async with aiohttp.ClientSession() as session:
        responses: list[aiohttp.ClientResponse] = []

        async def open_stream(script: Script) -> aiohttp.ClientResponse:
            async def handler(request: web.Request) -> web.StreamResponse:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await script(response)
                return response

            app = web.Application()
            app.router.add_get("/", handler)
            server = await aiohttp_server(app)
            # As the router asks llama-server: the end of the response closes the connection.
            response = await session.get(server.make_url("/"), headers=CLOSE)
            responses.append(response)
            return response

        yield open_stream
        for response in responses:
            response.close()


async def test_batches_hold_what_arrives_until_asked_and_the_end_cuts_the_hold_short(
    stream_from: Callable[[Script], Any],
) -> None:
    async def script(response: web.StreamResponse) -> None:
        await response.write(b"data: a\n\n")
        for name in (b"b", b"c"):
            await asyncio.sleep(0.03)
            await response.write(b"data: " + name + b"\n\n")
        await response.write(b"data: [DONE]\n\n")

    reader = EventReader(await stream_from(script))
    assert await reader.batch() == [b"a"]
    started = time.monotonic()
    # Held far beyond the stream's end: b and c come together once the response ends.
    assert await reader.batch(hold_until=started + 5.0) == [b"b", b"c"]
    assert time.monotonic() - started < 1.0
    assert await reader.batch() == []


async def test_what_arrives_during_a_hold_stays_in_the_kernel_until_it_ends(
    stream_from: Callable[[Script], Any],
) -> None:
    go, written, finish = asyncio.Event(), asyncio.Event(), asyncio.Event()
    script = script_of(
        b"data: a\n\n", go, b"data: b\n\n", b"data: c\n\n", written.set, finish, DONE
    )
    response = await stream_from(script)
    reader = EventReader(response)
    assert await reader.batch() == [b"a"]
    received = response.content.total_bytes
    held = asyncio.create_task(reader.batch(hold_until=time.monotonic() + 0.3))
    await asyncio.sleep(0)  # the hold begins
    go.set()
    await written.wait()
    await asyncio.sleep(0.1)  # loopback delivers in microseconds: they would be read by now
    # The process was not woken for b and c (the low-water mark): nothing more was read.
    assert not held.done()
    assert response.content.total_bytes == received
    assert await held == [b"b", b"c"]
    finish.set()
    assert await reader.batch() == []


async def test_a_held_batch_has_what_waited_in_the_kernel_and_what_was_read_before(
    stream_from: Callable[[Script], Any],
) -> None:
    x_written, go, written, finish = (asyncio.Event() for _ in range(4))
    script = script_of(
        b"data: a\n\n", x_written, b"data: x\n\n", go, b"data: b\n\n", b"data: c\n\n",
        written.set, finish, DONE,
    )  # fmt: skip
    response = await stream_from(script)
    reader = EventReader(response)
    assert await reader.batch() == [b"a"]
    received = response.content.total_bytes
    x_written.set()
    # x is read by the transport before the hold begins.
    await wait_until(lambda: response.content.total_bytes > received, 5, step=0.001)
    held = asyncio.create_task(reader.batch(hold_until=time.monotonic() + 0.2))
    await asyncio.sleep(0)  # the hold begins
    go.set()
    await written.wait()
    # Without taking in what the kernel held, this batch would be [x] and b, c the next one's.
    assert await held == [b"x", b"b", b"c"]
    finish.set()
    assert await reader.batch() == []


async def test_without_a_hold_each_batch_is_what_had_arrived(
    stream_from: Callable[[Script], Any],
) -> None:
    async def script(response: web.StreamResponse) -> None:
        await response.write(b"data: a\n\ndata: b\n\n")
        await asyncio.sleep(0.03)
        await response.write(b": keep-alive\n\ndata: c\n\ndata: [DONE]\n\n")

    reader = EventReader(await stream_from(script))
    assert await reader.batch() == [b"a", b"b"]
    assert await reader.batch() == [b"c"]
    assert await reader.batch() == []


async def test_a_stream_ending_before_done_is_broken(stream_from: Callable[[Script], Any]) -> None:
    async def script(response: web.StreamResponse) -> None:
        await response.write(b"data: a\n\n")

    reader = EventReader(await stream_from(script))
    assert await reader.batch() == [b"a"]
    with pytest.raises(UpstreamBroken):
        await reader.batch(hold_until=time.monotonic() + 5.0)


async def test_an_error_status_whose_body_breaks_off_is_a_broken_upstream() -> None:
    """A child that dies mid-way through an error reply: UpstreamBroken, not aiohttp's own
    error (which the router would report as an internal error)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 200\r\n\r\n{partial")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            upstream = Upstream(session, port, "key", request_timeout=5)
            with pytest.raises(UpstreamBroken):
                await upstream.open_stream("/v1/chat/completions", b"{}")
    finally:
        server.close()
        await server.wait_closed()
