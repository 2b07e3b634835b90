"""Streamed requests must not fail on upstream connections llama-server already closed.

The embedded llama-server closes its HTTP connection after every streamed response although it
answers keep-alive (reference/llama-server-embedded.md). A router that puts such a connection
back in its pool and sends the next POST on it gets "server disconnected" before any byte, and
reports a healthy model as crashed (UNAVAILABLE, MODEL_CRASHED) to about 2% of streams at
concurrency 8. Found while benchmarking the facade; reproduced here without it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from clients import RouterError
from tests.helpers import chat_model, running_router, settings_for

BODY = {
    "messages": [{"role": "user", "content": "hello world the router"}],
    "max_tokens": 8,
    "stream": True,
}


async def test_back_to_back_streams_never_see_a_closed_connection(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat, parallel_override=8)})
    failures: list[str] = []
    async with running_router(settings) as (_, client):
        await client.load("chat")
        gate = asyncio.Semaphore(8)

        async def stream() -> None:
            async with gate:
                try:
                    async for _ in client.generate("chat", BODY):
                        pass
                except RouterError as error:
                    failures.append(f"{error.reason}: {error.message}")

        await asyncio.gather(*(stream() for _ in range(400)))

    assert failures == []
