"""Router faults the soak (tests/soak) found, each reproduced on its own.

* Wake-ups: with `max_concurrent_models: 1`, a model's load waits while the resident model is
  loading or busy. The resident may become evictable without a request ending on it; a missed
  wake-up left the waiting load asleep until its queue timeout.
* A forced unload landing between a child's spawn and its readiness wait left the model stuck
  in STARTING with its child running and its room released.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from clients import End, GenerateEvent, RouterClient
from router.pool.process import ChildProcess
from router.pool.registry import ChildRegistry
from router.pool.state import ModelState
from router.scheduler.queue import Priority
from tests.helpers import fake_server, running_router, settings_for, wait_until
from tests.procfs import children

PROMPT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
# Long, so that a missed wake-up (waiting all of it) stands far apart from a slow machine.
QUEUE_TIMEOUT_SEC = 20


def fake_entry(tmp_path: Path, tiny_chat: Path, name: str) -> dict[str, Any]:
    path = tmp_path / f"{name}.gguf"
    path.symlink_to(tiny_chat)
    return {"model_path": str(path)}


async def run(client: RouterClient, model: str) -> list[GenerateEvent]:
    return [event async for event in client.generate(model, PROMPT)]


def two_models(tmp_path: Path, tiny_chat: Path, *knobs: str) -> Any:
    return settings_for(
        tmp_path,
        {"a": fake_entry(tmp_path, tiny_chat, "a"), "b": fake_entry(tmp_path, tiny_chat, "b")},
        system={
            "llama_server_path": fake_server(tmp_path, *knobs),
            "max_concurrent_models": 1,
            "queue_timeout_sec": QUEUE_TIMEOUT_SEC,
        },
    )


async def test_a_model_ready_with_nobody_waiting_makes_room_at_once(
    tmp_path: Path, tiny_chat: Path
) -> None:
    async with running_router(two_models(tmp_path, tiny_chat, "--load-delay 1")) as (
        router,
        client,
    ):
        for_a = asyncio.create_task(run(client, "a"))
        await wait_until(lambda: router.pool.get("a").child is not None, 5)
        for_b = asyncio.create_task(run(client, "b"))  # waits: a is loading
        await wait_until(lambda: router.pool.get("b").queue.waiting == 1, 5)
        for_a.cancel()  # a's only caller leaves; its load goes on
        await asyncio.gather(for_a, return_exceptions=True)
        started = time.monotonic()
        events = await asyncio.wait_for(for_b, QUEUE_TIMEOUT_SEC + 5)
        took = time.monotonic() - started

    assert isinstance(events[-1], End)
    # a's load ends about 1 s after its spawn, then b loads (another second): not the timeout.
    assert took < QUEUE_TIMEOUT_SEC / 2, f"b waited {took:.1f} s for room"


async def test_a_granted_request_that_never_starts_makes_room_at_once(
    tmp_path: Path, tiny_chat: Path
) -> None:
    async with running_router(two_models(tmp_path, tiny_chat)) as (router, client):
        assert isinstance((await run(client, "a"))[-1], End)  # a is loaded and idle
        a = router.pool.get("a")
        ticket = a.enter(Priority.NORMAL)  # granted a slot at once: a is busy
        for_b = asyncio.create_task(run(client, "b"))  # waits for a's batch
        await wait_until(lambda: router.pool.get("b").queue.waiting == 1, 5)
        ticket.close()  # its caller left before the request started
        started = time.monotonic()
        events = await asyncio.wait_for(for_b, QUEUE_TIMEOUT_SEC + 5)
        took = time.monotonic() - started

    assert isinstance(events[-1], End)
    assert took < QUEUE_TIMEOUT_SEC / 2, f"b waited {took:.1f} s for room"


@pytest.mark.parametrize("window", ["spawn", "record"])
async def test_a_forced_unload_while_starting_stops_the_model(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch, window: str
) -> None:
    # Widen one await between STARTING and the readiness wait to half a second.
    if window == "spawn":
        spawn = ChildProcess.spawn

        async def slow_spawn(*args: Any, **kwargs: Any) -> ChildProcess:
            await asyncio.sleep(0.5)
            return await spawn(*args, **kwargs)

        monkeypatch.setattr(ChildProcess, "spawn", slow_spawn)
    else:
        record = ChildRegistry.record

        def slow_record(self: ChildRegistry, alias: str, pid: int) -> None:
            time.sleep(0.5)
            record(self, alias, pid)

        monkeypatch.setattr(ChildRegistry, "record", slow_record)
    async with running_router(two_models(tmp_path, tiny_chat)) as (router, client):
        a = router.pool.get("a")
        await client.load("a", wait=False)
        await wait_until(lambda: a.state is ModelState.STARTING, 5)
        await asyncio.sleep(0.1)
        await client.unload("a", force=True)

        assert (await client.get_model("a")).state == "stopped"
        assert router.pool.reservations() == {}
        await wait_until(lambda: children(os.getpid()) == [], 5)  # no child left running
        assert isinstance((await run(client, "a"))[-1], End)  # and it loads again
