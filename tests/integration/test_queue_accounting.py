"""Queue counters against real children: each request ends in exactly one of them.

Before, a request whose model failed to load counted as cancelled, one failed by an unload
counted nowhere, and one granted a slot but stopped before it started counted as processed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clients import UnavailableError
from router.scheduler.queue import QueueCounters, SlotQueue
from tests.helpers import fake_server, running_router, settings_for, wait_until
from tests.integration.test_pool_faults import PROMPT, drain
from tests.integration.test_stop_races import model_entry, one_fake_model


def settled(queue: SlotQueue) -> QueueCounters:
    """The counters, once they account for every request (the invariant the test relies on)."""
    c = queue.counters
    ended = c.total_processed + c.total_cancelled + c.total_timed_out + c.total_failed
    assert c.total_requests == ended + c.total_rejected + queue.waiting + queue.running
    return c


async def test_requests_waiting_for_a_load_that_fails_count_as_failed(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = one_fake_model(
        tmp_path, tiny_chat, "bad", "--exit-at-start 1", model_load_max_retries=0
    )
    async with running_router(settings) as (router, client):
        results = await asyncio.gather(
            *(drain(client, "bad") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(result, UnavailableError) for result in results)
        c = settled(router.pool.get("bad").queue)
        assert (c.total_requests, c.total_failed, c.total_cancelled) == (3, 3, 0)


async def test_a_forced_unload_fails_the_waiters_and_ends_the_running_request(
    tmp_path: Path, tiny_chat: Path
) -> None:
    entry = model_entry(tmp_path, tiny_chat, "m")
    settings = settings_for(
        tmp_path,
        {"m": {**entry, "params": {"n_ctx": 131072, "parallel_override": 1}}},
        system={"llama_server_path": fake_server(tmp_path, "--token-delay 0.01")},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        queue = router.pool.get("m").queue
        running = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": 1000}))
        await wait_until(lambda: queue.running == 1, 5)
        waiting = [asyncio.create_task(drain(client, "m")) for _ in range(2)]
        await wait_until(lambda: queue.waiting == 2, 5)
        await client.unload("m", force=True)
        for task in (running, *waiting):
            with pytest.raises(UnavailableError):
                await task
        await wait_until(lambda: queue.running == 0, 5)
        c = settled(queue)
        assert (c.total_requests, c.total_processed, c.total_failed) == (3, 1, 2)
        assert c.total_cancelled == 0
