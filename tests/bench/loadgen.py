"""The benchmark's load generator: one process, one command per stdin line, one result per line.

It runs in its own process so its CPU is never the servers', and keeps one aiohttp session
and one RouterClient (one gRPC channel) for its whole life. Commands (JSON objects):

* `{"op": "run", "via": "http" | "grpc", "target": URL or host:port, "headers": {...},
  "stream": bool, "max_tokens": N, "concurrency": C, "requests": R, "in_flight": K}`:
  R requests from C workers, at most K of them sent at a time (0 = no limit), FIFO;
* `{"op": "cold", "argv": [...], "url": URL, "headers": {...}}`: start a llama-server with
  `argv`, poll its /health, stream one request: the floor of a cold start;
* `{"op": "quit"}`.

Each request is measured the same way whatever the path: from just before it is sent to its
first generated text (TTFT) and to its end (e2e); its tokens are the usage's completion_tokens
(streams ask for `stream_options.include_usage`), and its content chunks are counted as a
cross-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from clients import Chunk, End, RouterClient, RouterError

MODEL = "tiny-chat"
PROMPT = "hello world the router"
# llama-server's JSON spelling of a content delta: a role-only or final chunk has none.
_CONTENT = b'"content":"'
_COLD_POLL_SEC = 0.002


@dataclass(slots=True)
class Sample:
    """One request: seconds from its send to the first text and to its end.

    `messages` counts the Chunk messages of a gRPC stream (chunks per message shows how much
    the router coalesced); HTTP reads say nothing about that, so it is 0 there. `server_ms`
    is llama-server's own prompt + generation time from the usage chunk's `timings`: when it
    grows, llama-server itself ran slower (it shares the CPU with everything else).
    """

    start: float
    ttft: float | None
    e2e: float
    tokens: int
    chunks: int
    messages: int = 0
    server_ms: float = 0.0


def request_body(max_tokens: int, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


def _usage(payload: dict[str, Any]) -> tuple[int, float]:
    """Completion tokens, and llama-server's own time in ms, from a chunk carrying usage."""
    timings = payload.get("timings") or {}
    server_ms = float(timings.get("prompt_ms", 0.0)) + float(timings.get("predicted_ms", 0.0))
    return int(payload["usage"]["completion_tokens"]), server_ms


async def http_stream(
    session: aiohttp.ClientSession, url: str, body: str, headers: dict[str, str]
) -> Sample:
    start = time.perf_counter()
    first: float | None = None
    tokens = chunks = 0
    server_ms = 0.0
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        pending = b""
        async for data in response.content.iter_any():
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            complete, pending = pending[:cut], pending[cut + 2 :]
            count = complete.count(_CONTENT)
            if count:
                chunks += count
                if first is None:
                    first = time.perf_counter()
            if b'"usage":{' in complete:
                for event in complete.split(b"\n\n"):
                    if b'"usage":{' in event:
                        tokens, server_ms = _usage(json.loads(event[event.index(b"{") :]))
    end = time.perf_counter()
    ttft = None if first is None else first - start
    return Sample(start, ttft, end - start, tokens, chunks, 0, server_ms)


async def http_once(
    session: aiohttp.ClientSession, url: str, body: str, headers: dict[str, str]
) -> Sample:
    start = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as response:
        payload = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
    end = time.perf_counter()
    parsed = json.loads(payload)
    content = parsed["choices"][0]["message"].get("content")
    tokens, server_ms = _usage(parsed)
    return Sample(start, end - start, end - start, tokens, 1 if content else 0, 0, server_ms)


async def grpc_call(client: RouterClient, body: str, stream: bool) -> Sample:
    if not stream:
        return await grpc_complete(client, body)
    start = time.perf_counter()
    first: float | None = None
    tokens = chunks = messages = 0
    server_ms = 0.0
    async for event in client.generate(MODEL, body):
        if type(event) is Chunk:
            messages += 1
            if first is None and event.text:
                first = time.perf_counter()
            if stream:
                chunks += sum(1 for item in event.data if '"content":"' in item)
            else:
                chunks += 1 if event.text else 0
            for item in event.data:
                if '"usage":{' in item:
                    server_ms = _usage(json.loads(item))[1]
        elif type(event) is End:
            tokens = event.usage.completion_tokens
    end = time.perf_counter()
    ttft = None if first is None else first - start
    return Sample(
        start, ttft if stream else end - start, end - start, tokens, chunks, messages, server_ms
    )


async def grpc_complete(client: RouterClient, body: str) -> Sample:
    """A non-streamed request, as a gRPC user makes it: one unary Complete call."""
    start = time.perf_counter()
    completion = await client.complete(MODEL, body)
    end = time.perf_counter()
    server_ms = _usage(json.loads(completion.body))[1]
    tokens, chunks = completion.end.usage.completion_tokens, 1 if completion.text else 0
    return Sample(start, end - start, end - start, tokens, chunks, 1, server_ms)


async def run_load(
    one: Callable[[], Awaitable[Sample]], requests: int, concurrency: int
) -> dict[str, Any]:
    samples: list[Sample] = []
    errors: list[str] = []
    todo = iter(range(requests))

    async def worker() -> None:
        for _ in todo:  # shared by the workers: each takes the next request number
            try:
                samples.append(await one())
            except (RouterError, aiohttp.ClientError, RuntimeError, KeyError) as error:
                errors.append(f"{type(error).__name__}: {error}"[:300])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"wall": wall, "samples": [_sample_row(s, started) for s in samples], "errors": errors}


def _sample_row(sample: Sample, origin: float) -> list[Any]:
    return [
        sample.start - origin,
        sample.ttft,
        sample.e2e,
        sample.tokens,
        sample.chunks,
        sample.messages,
        sample.server_ms,
    ]


async def cold_start(
    session: aiohttp.ClientSession, argv: list[str], url: str, headers: dict[str, str]
) -> dict[str, Any]:
    """Spawn a llama-server, poll /health, stream one request; times count from the spawn."""
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(
                    url + "/health", headers={"Connection": "close"}
                ) as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(_COLD_POLL_SEC)
        ready = time.perf_counter() - start
        stream_headers = {**headers, "Connection": "close"}
        sample = await http_stream(
            session, url + "/v1/chat/completions", request_body(128, True), stream_headers
        )
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
    elapsed = sample.start - start
    return {
        "ready": ready,
        "ttft": None if sample.ttft is None else elapsed + sample.ttft,
        "e2e": elapsed + sample.e2e,
        "tokens": sample.tokens,
    }


class LoadGenerator:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            # Idle sockets go before llama-server's 5 s keep-alive timeout closes them.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
            timeout=aiohttp.ClientTimeout(total=120),
            auto_decompress=False,
        )
        self._clients: dict[str, RouterClient] = {}

    async def close(self) -> None:
        await self._session.close()
        for client in self._clients.values():
            await client.close()

    def _client(self, target: str) -> RouterClient:
        if target not in self._clients:
            self._clients[target] = RouterClient(target)
        return self._clients[target]

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        headers = {"Content-Type": "application/json", **command.get("headers", {})}
        if op == "cold":
            try:
                return await cold_start(self._session, command["argv"], command["url"], headers)
            except (aiohttp.ClientError, RuntimeError) as error:
                return {"error": f"{type(error).__name__}: {error}"}
        assert op == "run", op
        stream: bool = command["stream"]
        body = request_body(command["max_tokens"], stream)
        one: Callable[[], Awaitable[Sample]]
        if command["via"] == "grpc":
            client = self._client(command["target"])

            def one() -> Awaitable[Sample]:
                return grpc_call(client, body, stream)

        else:
            url = command["target"]
            fetch = http_stream if stream else http_once

            def one() -> Awaitable[Sample]:
                return fetch(self._session, url, body, headers)

        in_flight = command.get("in_flight", 0)
        if in_flight:
            gate = asyncio.Semaphore(in_flight)
            unlimited = one

            async def one() -> Sample:
                async with gate:
                    return await unlimited()

        return await run_load(one, command["requests"], command["concurrency"])


async def main() -> None:
    generator = LoadGenerator()
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            if command["op"] == "quit":
                return
            result = await generator.handle(command)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        await generator.close()


if __name__ == "__main__":
    asyncio.run(main())
