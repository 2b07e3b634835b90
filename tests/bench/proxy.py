"""`python -m tests.bench.proxy PORT UPSTREAM`: the bench's peer, target (p).

The kind of router the issue's "best peer measured" column stands for: one aiohttp process
between the client and llama-server. It reads the body as JSON (a router must, to pick the
model), forwards it upstream with the client's Authorization header, and copies the response
back, a streamed one read by read as it arrives. No queue, no scheduling, no pacing: only the
cost of a single Python HTTP hop, measured on the same machine and in the same rounds as our
stack. Upstream connections are handled as the router handles them: llama-server closes a
streamed one after its response, so those are asked to close, and idle pooled ones are dropped
before llama-server's 5 s keep-alive timeout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

# As many upstream connections as llama-server has slots (the bench's -np 8): more would only
# queue inside llama-server, and its keep-alive connections each hold one of its HTTP threads.
UPSTREAM_CONNECTIONS = 8
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    try:
        parsed = json.loads(body)
    except ValueError:
        return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
    stream = isinstance(parsed, dict) and parsed.get("stream") is True
    headers = {"Content-Type": "application/json"}
    if stream:
        headers["Connection"] = "close"
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    url = request.app[_UPSTREAM] + request.path
    async with request.app[_SESSION].post(url, data=body, headers=headers) as upstream:
        if not stream or upstream.status != 200:
            return web.Response(
                body=await upstream.read(),
                status=upstream.status,
                content_type=upstream.content_type,
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[_SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[_UPSTREAM] = upstream
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    web.run_app(make_app(upstream), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
