"""Server-sent events: exact frames, lazy headers, keep-alive comments, one error frame.

Wire format (what OpenAI and llama-server send)::

    HTTP/1.1 200 OK
    Content-Type: text/event-stream
    Cache-Control: no-cache
    X-Accel-Buffering: no

    data: {...}\\n\\n          one frame per OpenAI chunk
    : keep-alive\\n\\n         after 1-2 x `keepalive_sec` without a frame (queued, loading, ...)
    data: {"error": {...}}\\n\\n   a failure after the headers went out
    data: [DONE]\\n\\n

The headers go out with the first frame, not before: a request refused while it waits (queue
full, load failure, queue timeout) within the first `keepalive_sec` still gets its real HTTP
status. A longer wait sends them with the first keep-alive comment, so proxies and clients see
the connection is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from types import TracebackType

from aiohttp import web

from clients import RouterError
from facade.errors import ApiError, from_router_error, internal_error

__all__ = [
    "DONE",
    "KEEP_ALIVE",
    "SSE_HEADERS",
    "ErrorFrame",
    "EventStream",
    "StreamRegistry",
    "bridge_error_frame",
    "data_frame",
    "event_frame",
    "openai_error_frame",
]

_LOGGER = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
KEEP_ALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def data_frame(items: Sequence[str]) -> bytes:
    """One `data:` frame per JSON text, as one buffer (one write per gRPC message)."""
    return ("data: " + "\n\ndata: ".join(items) + "\n\n").encode()


def event_frame(event: str, data: str, event_id: str = "") -> bytes:
    """A named event; `data` must be one line (compact JSON is)."""
    frame = f"event: {event}\n"
    if event_id:
        frame += f"id: {event_id}\n"
    return (frame + f"data: {data}\n\n").encode()


def openai_error_frame(error: ApiError) -> bytes:
    """OpenAI's mid-stream failure: the error envelope as a data frame, then `[DONE]`."""
    return f"data: {error.json()}\n\n".encode() + DONE


def bridge_error_frame(error: ApiError) -> bytes:
    """A failed admin stream: an `error` event carrying the envelope."""
    return event_frame("error", error.json())


ErrorFrame = Callable[[ApiError], bytes]


class StreamRegistry:
    """The open streams of one app, so shutdown can end them instead of waiting for them."""

    def __init__(self, keepalive_sec: float) -> None:
        self.keepalive_sec = keepalive_sec
        self._open: set[EventStream] = set()

    def open(self, request: web.Request, error_frame: ErrorFrame) -> EventStream:
        """A new stream answering `request`; use it as `async with`."""
        return EventStream(request, self, error_frame)

    def add(self, stream: EventStream) -> None:
        self._open.add(stream)

    def discard(self, stream: EventStream) -> None:
        self._open.discard(stream)

    async def stop_all(self, timeout: float) -> None:
        """End every open stream with a "shutting down" error and wait up to `timeout`."""
        tasks = [task for stream in list(self._open) if (task := stream.stop()) is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


class EventStream:
    """One SSE response, written only by the handler's task (plus keep-alive comments).

    Usage:

    ```python
    async with registry.open(request, openai_error_frame) as stream:
        async for event in events:
            await stream.write(data_frame(event.data))
        await stream.close(DONE)
    return stream.response
    ```

    Leaving the block with an exception: before the headers went out it propagates (the error
    middleware answers with the real status); after, it becomes `error_frame(...)` and the
    response ends normally. A client that went away (cancellation, reset connection) just ends it.
    """

    def __init__(
        self, request: web.Request, registry: StreamRegistry, error_frame: ErrorFrame
    ) -> None:
        self.response = web.StreamResponse(headers=SSE_HEADERS)
        self._request = request
        self._registry = registry
        self._error_frame = error_frame
        # `response.prepared` turns true before the headers are written; this only after.
        self._started = False
        self._prepare_lock = asyncio.Lock()
        self._closed = False
        self._writes = 0
        self._stopping = False
        self._task: asyncio.Task[object] | None = None
        self._pinger: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        """Whether the headers went out (errors can no longer change the status)."""
        return self._started

    async def write(self, data: bytes) -> None:
        """Send frames, sending the headers first if they have not gone out."""
        if not self._started:
            await self.start()
        self._writes += 1
        await self.response.write(data)

    async def close(self, last: bytes = b"") -> None:
        """Send `last` (e.g. `DONE`) with the end of the body."""
        if not self._started:
            await self.start()
        self._closed = True
        await self.response.write_eof(last)

    def stop(self) -> asyncio.Task[object] | None:
        """Interrupt the handler (server shutdown); it answers with a "shutting down" error."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        return self._task

    async def start(self) -> None:
        """Send the headers now, before the first frame (once, whoever asks first)."""
        async with self._prepare_lock:
            if not self._started:
                await self.response.prepare(self._request)
                self._started = True

    async def _keep_alive(self) -> None:
        seen = -1
        try:
            while True:
                await asyncio.sleep(self._registry.keepalive_sec)
                if self._writes == seen and not self._closed:
                    await self.write(KEEP_ALIVE)
                seen = self._writes
        except ConnectionResetError:
            return  # the client went away; the handler finds out on its next write

    async def __aenter__(self) -> EventStream:
        self._task = asyncio.current_task()
        self._registry.add(self)
        self._pinger = asyncio.create_task(self._keep_alive())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._registry.discard(self)
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.wait({self._pinger})  # lets a cancellation of this task through
        if exc is None:
            if not self._closed:
                await self.close()
            return False
        if isinstance(exc, asyncio.CancelledError) and self._stopping:
            self._uncancel()
            error = ApiError(503, "the server is shutting down", type="server_error", retry_after=1)
            if not self._started:
                raise error from None
            return await self._fail(error)
        if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
            return False  # the client went away: nothing to tell it
        if not self._started or not isinstance(exc, Exception):
            return False  # the error middleware answers with the real status
        return await self._fail(_as_api_error(exc))

    async def _fail(self, error: ApiError) -> bool:
        if not self._closed:
            with contextlib.suppress(ConnectionResetError):
                await self.close(self._error_frame(error))
        return True

    def _uncancel(self) -> None:
        # The cancellation came from stop(), and has been handled; later awaits in this task
        # (aiohttp finishing the response) must not see it as pending.
        if sys.version_info >= (3, 11) and self._task is not None:
            self._task.uncancel()


def _as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RouterError):
        return from_router_error(exc)
    _LOGGER.error("stream failed after its headers were sent", exc_info=exc)
    return internal_error()
