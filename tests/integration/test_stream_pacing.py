"""Stream pacing (system.stream_pacing_ms): held output travels together; 0 turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients import Chunk, End
from tests.helpers import chat_model, fake_server, running_router, settings_for

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}


# Without pacing each token is its own read unless the router's loop stalls for a token's
# time (5 ms) and two arrive together: "fewest" leaves a busy machine room for that; with
# 20 ms of pacing, 40 tokens in ~200 ms can fill at most ~15 messages.
@pytest.mark.parametrize(("pacing_ms", "most", "fewest"), [(0, 40, 25), (20, 15, 2)])
async def test_pacing_sets_how_many_tokens_share_a_message(
    tmp_path: Path, tiny_chat: Path, pacing_ms: float, most: int, fewest: int
) -> None:
    settings = settings_for(
        tmp_path,
        {"m": chat_model(tiny_chat)},
        system={
            # One token every 5 ms: under 20 ms pacing about four share a message.
            "llama_server_path": fake_server(tmp_path, "--token-delay 0.005"),
            "stream_pacing_ms": pacing_ms,
        },
    )
    async with running_router(settings) as (_, client):
        events = [e async for e in client.generate("m", BODY)]
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert sum(len(c.data) for c in chunks) == 40  # nothing lost or repeated
    assert fewest <= len(chunks) <= most
    assert "".join(c.text for c in chunks).split()[0] == "alpha"
    assert isinstance(events[-1], End) and events[-1].usage.completion_tokens == 40
