"""HTTP to one llama-server child: streamed SSE and plain JSON calls.

A stream is read in batches (``EventReader``): each batch is every event that
arrived since the last one, so when the router falls behind, or holds a stream
back on purpose (see ``router.inference``), several upstream events travel in
one gRPC message. While a stream is held, its socket's low-water mark keeps
the process asleep: llama-server's chunks wait in the kernel and are read in
one go when the hold ends. Silence longer than ``request_timeout`` ends the
request (aiohttp's ``sock_read`` timeout is exactly "no bytes for that long").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import sys
import termios
import time
from collections.abc import Iterator

import aiohttp

from router.pool.process import CLOSE

# Far more than a hold collects (~25 ms of tokens), and small enough (under half the default
# receive buffer) that Linux does not grow the buffer for it.
HOLD_LOW_WATER = 32 * 1024
# Loop turns a batch waits, after a hold, for the transport to take in what the kernel held
# (one is enough unless aiohttp has paused reading: a bound, not a tuning knob).
_TAKE_IN_TURNS = 4


class UpstreamHTTPError(Exception):
    """The child answered with a non-200 status (or an error event mid-stream)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upstream status {status}")
        self.status = status
        self.body = body


class UpstreamTimeout(Exception):
    """The child sent nothing for ``request_timeout`` seconds."""


class UpstreamBroken(Exception):
    """The connection to the child failed or closed mid-response."""


@contextlib.contextmanager
def transport_errors() -> Iterator[None]:
    """aiohttp's timeouts and connection failures, as this module's exceptions."""
    try:
        yield
    except asyncio.TimeoutError as error:
        raise UpstreamTimeout() from error
    except aiohttp.ClientError as error:
        raise UpstreamBroken(str(error)) from error


class SSEParser:
    """Incremental parser for llama-server's SSE: returns complete ``data:`` payloads."""

    __slots__ = ("_buffer", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        payloads: list[bytes] = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[6:] if line[5:6] == b" " else line[5:]
                    if payload == b"[DONE]":
                        self.done = True
                    else:
                        payloads.append(payload)
                elif line.startswith(b"error:"):
                    raise UpstreamHTTPError(500, line[6:].strip())
                # ':' comments (keep-alive pings), 'event:', 'id:' carry nothing for us.
        return payloads


class EventReader:
    """The SSE payloads of one streamed response, in batches of whatever has arrived."""

    __slots__ = ("_content", "_ended", "_parser", "_socket", "_waiter")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._content = response.content
        self._parser = SSEParser()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._content.on_eof(self._on_eof)
        connection = response.connection
        transport = connection.transport if connection is not None else None
        self._socket = transport.get_extra_info("socket") if transport is not None else None

    @property
    def finished(self) -> bool:
        """Whether [DONE] has been read: the last batch has been returned."""
        return self._parser.done

    def _on_eof(self) -> None:
        self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def batch(self, hold_until: float = 0.0) -> list[bytes]:
        """The payloads that arrived since the last batch (waiting for one); [] after [DONE].

        Before ``hold_until`` (a ``time.monotonic()`` value) nothing is returned: what
        arrives meanwhile accumulates (without waking this task per chunk) and leaves as
        one batch then. The end of the response cuts that wait short.
        """
        parser = self._parser
        if parser.done:
            return []
        content = self._content
        with transport_errors():
            delay = hold_until - time.monotonic()
            if delay > 0 and not self._ended:
                await self._hold(delay)
                await self._take_in_held()
            while True:
                data = content.read_nowait() or await content.readany()
                if not data:
                    raise UpstreamBroken("stream ended before [DONE]")
                payloads = parser.feed(data)
                if payloads or parser.done:
                    return payloads

    async def _hold(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(seconds, _resolve, waiter)
        self._set_low_water(HOLD_LOW_WATER)
        try:
            await waiter
        finally:
            self._set_low_water(1)
            timer.cancel()
            self._waiter = None

    async def _take_in_held(self) -> None:
        # What arrived during the hold is still in the kernel. With the mark back at 1 the
        # socket reads as ready, and the transport takes the bytes in on a coming loop turn;
        # wait for that, or this batch would leave them for the next one (a hold later).
        for _ in range(_TAKE_IN_TURNS):
            if self._ended or self._unread() == 0:
                return
            await asyncio.sleep(0)

    def _open_fd(self) -> int | None:
        """The socket's descriptor; None if unknown or closed (a response that ended)."""
        if self._socket is None:
            return None
        fd = self._socket.fileno()
        return fd if fd >= 0 else None

    def _unread(self) -> int:
        """Bytes waiting in the kernel for this socket (0 when unknown)."""
        fd = self._open_fd()
        if fd is None:
            return 0
        try:
            answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(answer, sys.byteorder)

    def _set_low_water(self, size: int) -> None:
        # While held, the socket reads as idle until HOLD_LOW_WATER bytes are in: the chunks
        # llama-server writes meanwhile wait in the kernel instead of waking this process once
        # each. Its end still wakes it (the kernel reports a closed connection as readable
        # whatever the low-water mark), and lowering the mark again wakes it for what waits.
        if self._socket is not None and self._open_fd() is not None:
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
            except OSError:
                self._socket = None  # not supported here: holds just save fewer wake-ups


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Upstream:
    """Calls to one child at 127.0.0.1:``port`` with its API key."""

    def __init__(
        self, session: aiohttp.ClientSession, port: int, api_key: str, request_timeout: float
    ) -> None:
        self._session = session
        self._base = f"http://127.0.0.1:{port}"
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        # llama-server closes the connection after every streamed response although it
        # answers keep-alive; a pooled copy would fail the next request before any byte.
        self._stream_headers = {**self._headers, **CLOSE}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(request_timeout, 10.0), sock_read=request_timeout
        )

    async def open_stream(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """POST and return the response once its headers are in (caller closes it)."""
        with transport_errors():  # an error body can break off too: the child died mid-reply
            response = await self._session.post(
                self._base + path, data=body, headers=self._stream_headers, timeout=self._timeout
            )
            if response.status != 200:
                try:
                    payload = await response.read()
                finally:
                    response.release()
                raise UpstreamHTTPError(response.status, payload)
        return response

    async def post(self, path: str, body: bytes) -> bytes:
        """POST and return the 200 body; UpstreamHTTPError otherwise."""
        with transport_errors():
            async with self._session.post(
                self._base + path, data=body, headers=self._headers, timeout=self._timeout
            ) as response:
                payload = await response.read()
        if response.status != 200:
            raise UpstreamHTTPError(response.status, payload)
        return payload
