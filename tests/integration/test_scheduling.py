"""Scheduling and resources with real child processes: swaps, priorities, TTL, placement."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clients import End, GenerateEvent, Loading, Queued, RouterClient, UnavailableError
from router.pool.process import ChildProcess
from router.pool.snapshot import LoadStage
from router.pool.state import ModelState
from router.scheduler.queue import Priority
from router.v1 import model_control_service_pb2 as mpb
from tests.helpers import chat_model, fake_server, running_router, settings_for, wait_until

PROMPT = {"messages": [{"role": "user", "content": "hello world"}], "temperature": 0}


async def run(
    client: RouterClient, model: str, max_tokens: int = 8, **kwargs: Any
) -> list[GenerateEvent]:
    body = {**PROMPT, "max_tokens": max_tokens, "stream": True}
    return [event async for event in client.generate(model, body, **kwargs)]


def loads_of(events: list[tuple[str, str]]) -> int:
    """Number of transitions into READY seen on the status stream."""
    return sum(1 for _, state in events if state == "ready")


async def record_states(
    client: RouterClient, into: list[tuple[str, str]], subscribed: asyncio.Event
) -> None:
    previous: dict[str, str] = {}
    async for event in client.watch():
        subscribed.set()  # the first event is the full status: changes from here on are seen
        if event.kind == "model_update" and event.model is not None:
            model = event.model
            if previous.get(model.alias) != model.state:
                into.append((model.alias, model.state))
                previous[model.alias] = model.state


async def test_two_models_taking_turns_swap_within_the_batch_bound(
    tmp_path: Path, tiny_chat: Path
) -> None:
    per_model, batch = 6, 3
    settings = settings_for(
        tmp_path,
        {"a": chat_model(tiny_chat), "b": chat_model(tiny_chat)},
        system={"max_concurrent_models": 1, "swap_batch_limit": batch},
    )
    async with running_router(settings) as (_, client):
        states: list[tuple[str, str]] = []
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(record_states(client, states, subscribed))
        await asyncio.wait_for(subscribed.wait(), 5)
        tasks = []
        for _ in range(per_model):  # arrivals interleaved A B A B ...
            for model in ("a", "b"):
                tasks.append(asyncio.create_task(run(client, model, 64)))
                await asyncio.sleep(0.005)
        results = await asyncio.gather(*tasks)
        watcher.cancel()
    for events in results:
        end = events[-1]
        assert isinstance(end, End) and end.usage.completion_tokens == 64  # none was killed
    loads = loads_of(states)
    bound = 2 * math.ceil(per_model / batch) + 1
    assert 2 <= loads <= bound, f"{loads} loads, promised at most {bound}: {states}"
    # Never both resident at once (capacity one).
    resident: set[str] = set()
    for alias, state in states:
        if state in ("starting", "loading", "ready"):
            resident.add(alias)
        elif state in ("stopped", "failed"):
            resident.discard(alias)
        assert len(resident) <= 1, states


async def test_cold_model_waiting_behind_a_busy_one_gets_queue_then_load_events(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(
        tmp_path,
        {"busy": chat_model(tiny_chat, n_ctx=16384), "cold": chat_model(tiny_chat)},
        system={"max_concurrent_models": 1},
    )
    async with running_router(settings) as (router, client):
        await client.load("busy")
        long = asyncio.create_task(run(client, "busy", 12000))
        await wait_until(lambda: router.pool.get("busy").in_flight == 1, 5)
        events = await run(client, "cold", 4)
        await long
    kinds = [type(e).__name__ for e in events]
    first_loading = kinds.index("Loading")
    first_chunk = kinds.index("Chunk")
    assert isinstance(events[0], Queued)
    assert 0 < first_loading < first_chunk
    stages = [e.stage for e in events if isinstance(e, Loading)]
    assert stages[0] == "waiting_for_capacity"
    assert "ready" in stages
    assert isinstance(events[-1], End)


async def test_low_priority_is_dispatched_after_at_most_k_later_arrivals(
    tmp_path: Path, tiny_chat: Path
) -> None:
    k = 3
    model = chat_model(tiny_chat, parallel_override=1)
    settings = settings_for(
        tmp_path,
        {"m": model},
        system={
            "llama_server_path": fake_server(tmp_path, "--token-delay 0.005"),
            "aging_dispatches": k,
        },
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        queue = router.pool.get("m").queue
        order: list[str] = []

        async def request(name: str, priority: str) -> None:
            await run(client, "m", 10, priority=priority)
            order.append(name)

        tasks = [asyncio.create_task(request("first", "high"))]
        await wait_until(lambda: queue.running == 1, 5)
        tasks.append(asyncio.create_task(request("low", "low")))
        await wait_until(lambda: queue.waiting == 1, 5)
        for i in range(10):  # a steady stream of later HIGH arrivals
            tasks.append(asyncio.create_task(request(f"high{i}", "high")))
        await wait_until(lambda: queue.waiting == 11, 5)
        await asyncio.gather(*tasks)
    later_highs_before_low = order.index("low") - 1
    assert later_highs_before_low <= k, order


async def test_idle_ttl_unloads_but_never_kills_a_running_request(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(
        tmp_path,
        {
            "m": {**chat_model(tiny_chat), "ttl_sec": 0.4},
            "pinned": {**chat_model(tiny_chat), "pinned": True},
        },
        system={
            "llama_server_path": fake_server(tmp_path, "--token-delay 0.02"),
            "enable_idle_timeout": True,
            "idle_timeout_sec": 1,
        },
    )
    async with running_router(settings) as (router, client):
        await client.load("pinned")
        events = await run(client, "m", 50)  # ~1 s of streaming, longer than the TTL
        assert isinstance(events[-1], End) and events[-1].usage.completion_tokens == 50
        finished = time.monotonic()
        await wait_until(lambda: router.pool.get("m").state.value == "stopped", 3)
        assert time.monotonic() - finished >= 0.35  # idle is counted from the request's end
        await asyncio.sleep(1.2)
        assert router.pool.get("pinned").state.value == "ready"


async def test_preload_runs_in_the_background(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path,
        {"m": chat_model(tiny_chat)},
        system={
            "llama_server_path": fake_server(tmp_path, "--load-delay 1"),
            "preload_models": ["*"],
        },
    )
    async with running_router(settings) as (_, client):
        started = time.monotonic()
        listed = await client.list_models()
        assert time.monotonic() - started < 0.5
        assert listed.server.state == "starting"
        deadline = time.monotonic() + 10
        while (await client.get_model("m")).state != "ready":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await client.list_models()).server.state == "serving"


def gib_model(tiny_chat: Path, gib: float) -> dict[str, Any]:
    return {**chat_model(tiny_chat), "memory_mib": int(gib * 1024)}


async def test_simulated_gpu_refuses_too_big_and_packs_two(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path,
        {
            "big": gib_model(tiny_chat, 10),
            "s1": gib_model(tiny_chat, 3),
            "s2": gib_model(tiny_chat, 3),
            "s3": gib_model(tiny_chat, 3),
        },
        system={
            "simulated_gpus": [{"name": "Sim 8G", "total_mib": 8192}],
            "gpu_devices": [0],
            "max_concurrent_models": 4,
        },
    )
    async with running_router(settings) as (router, client):
        with pytest.raises(UnavailableError) as caught:
            await run(client, "big")
        assert caught.value.reason == "NO_CAPACITY"
        assert "10240 MiB" in caught.value.message and "8192 MiB" in caught.value.message
        await client.load("s1")
        await client.load("s2")
        both = {m.alias: m for m in (await client.list_models()).models}
        assert both["s1"].state == both["s2"].state == "ready"
        assert both["s1"].device == both["s2"].device == "gpu:0"
        resources = await client.control.GetResources(mpb.GetResourcesRequest())
        [device] = resources.devices
        assert device.reserved_mib == 6144 and device.simulated and not resources.cpu_mode
        assert "big" not in resources.loadable_models
        await run(client, "s2")  # s1 is now the least recently used
        await client.load("s3")
        states = {m.alias: m.state for m in (await client.list_models()).models}
        assert states == {"big": "stopped", "s1": "stopped", "s2": "ready", "s3": "ready"}
        assert "cannot be loaded" in (await client.get_model("big")).last_error


async def test_best_fit_placement_across_gpus(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path,
        {"small": gib_model(tiny_chat, 3), "large": gib_model(tiny_chat, 6)},
        system={
            "simulated_gpus": [
                {"name": "Sim 24G", "total_mib": 24576},
                {"name": "Sim 4G", "total_mib": 4096},
                {"name": "Sim 8G", "total_mib": 8192, "used_mib": 1024},
            ],
            "gpu_devices": [0, 1, 2],
        },
    )
    async with running_router(settings) as (router, client):
        await client.load("small")
        await client.load("large")
        devices = {m.alias: m.device for m in (await client.list_models()).models}
        # Each child sees only the GPU it was placed on.
        visible = {alias: cuda_visible_devices(router.pool.get(alias).child) for alias in devices}
    assert devices == {"small": "gpu:1", "large": "gpu:2"}
    assert visible == {"small": "1", "large": "2"}


def cuda_visible_devices(child: ChildProcess | None) -> str | None:
    assert child is not None
    raw = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
    found = [item.split(b"=", 1)[1] for item in raw if item.startswith(b"CUDA_VISIBLE_DEVICES=")]
    return found[0].decode() if found else None


async def test_one_load_at_a_time_per_device_without_blocking_ready_models(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(
        tmp_path,
        {
            "ready": chat_model(tiny_chat),
            "slow1": chat_model(tiny_chat),
            "slow2": chat_model(tiny_chat),
        },
        system={"llama_server_path": fake_server(tmp_path, "--load-delay 1.5")},
    )
    async with running_router(settings) as (router, client):
        await client.load("ready")
        states: list[tuple[str, str]] = []
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(record_states(client, states, subscribed))
        await asyncio.wait_for(subscribed.wait(), 5)
        loads = [asyncio.create_task(client.load(m)) for m in ("slow1", "slow2")]
        await wait_until(lambda: router.pool.get("slow1").state.value != "stopped", 5)
        started = time.monotonic()
        events = await run(client, "ready", 4)  # a ready model is not held up by loads
        # Held up, it would wait for slot1's 1.5 s load; 1 s leaves a busy machine room.
        assert isinstance(events[-1], End) and time.monotonic() - started < 1.0
        await asyncio.gather(*loads)
        watcher.cancel()
    order = [(alias, state) for alias, state in states if alias.startswith("slow")]
    first_ready = next(i for i, (_, state) in enumerate(order) if state == "ready")
    starts_before = [a for a, state in order[:first_ready] if state == "starting"]
    assert len(starts_before) == 1, order  # the second spawn waited for the first to be ready


async def test_a_request_arriving_as_an_eviction_begins_waits_for_a_reload(
    tmp_path: Path, tiny_chat: Path
) -> None:
    """The eviction decided the model was idle; a request arriving right after must not get a
    slot on the child being stopped (it used to, and was then aborted with MODEL_UNLOADED)."""
    settings = settings_for(
        tmp_path,
        {"m": chat_model(tiny_chat)},
        system={"llama_server_path": fake_server(tmp_path)},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        supervisor = router.pool.get("m")
        evicted_pid = supervisor.child.pid  # type: ignore[union-attr]
        evicting = asyncio.create_task(supervisor.evict())
        await asyncio.sleep(0)  # evict() has run up to its first await: the decision is made
        ticket = supervisor.enter(Priority.NORMAL)
        try:
            progress = [event async for event in ticket.progress()]
            assert await evicting
            lease = ticket.lease
            assert lease.abort_error is None
            assert LoadStage.READY in progress  # it waited for a load, not the old child
            assert supervisor.state is ModelState.READY
            assert supervisor.child is not None and supervisor.child.pid != evicted_pid
            assert lease.upstream is supervisor.upstream
        finally:
            ticket.close()


@contextlib.asynccontextmanager
async def steady_stream(client: RouterClient, model: str, loops: int) -> AsyncIterator[None]:
    """``loops`` callers each sending ``model`` one request after another until the block ends:
    the model always has requests in flight and waiting."""
    stop = asyncio.Event()

    async def loop() -> int:
        served = 0
        while not stop.is_set():
            await run(client, model, 20)
            served += 1
        return served

    tasks = [asyncio.create_task(loop()) for _ in range(loops)]
    try:
        yield
    finally:
        stop.set()
        served = await asyncio.gather(*tasks)
    assert all(served), served  # the stream really ran (and none of it failed)


async def test_a_busy_model_on_another_device_holding_the_last_slot_is_budgeted(
    tmp_path: Path, tiny_chat: Path
) -> None:
    """The model-count limit is reached by a busy model on a GPU the cold model may not use.
    The plan used to wait with no blocker named, so the busy model got no swap budget and,
    kept busy by a steady stream, never went idle: the cold model timed out."""
    settings = settings_for(
        tmp_path,
        {
            "a": {**chat_model(tiny_chat), "devices": [1], "memory_mib": 1024},
            "b": {**chat_model(tiny_chat), "devices": [0], "memory_mib": 1024},
        },
        system={
            "llama_server_path": fake_server(tmp_path, "--token-delay 0.01"),
            "simulated_gpus": [
                {"name": "Sim 8G", "total_mib": 8192},
                {"name": "Sim 8G", "total_mib": 8192},
            ],
            "gpu_devices": [0, 1],
            "max_concurrent_models": 1,
            "swap_batch_limit": 3,
            "queue_timeout_sec": 8,
        },
    )
    async with running_router(settings) as (router, client):
        await client.load("a")
        assert router.pool.get("a").device == "gpu:1"
        async with steady_stream(client, "a", 4):
            await wait_until(lambda: router.pool.get("a").queue.waiting > 0, 5)
            started = time.monotonic()
            events = await run(client, "b", 5)
            waited = time.monotonic() - started
        assert isinstance(events[-1], End)
        assert router.pool.get("b").device == "gpu:0"
    assert waited < 4, waited


async def test_a_model_only_pinned_models_stand_in_the_way_of_is_refused_at_once(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(
        tmp_path,
        {"pinned": {**chat_model(tiny_chat), "pinned": True}, "other": chat_model(tiny_chat)},
        system={
            "llama_server_path": fake_server(tmp_path),
            "max_concurrent_models": 1,
            "queue_timeout_sec": 20,
        },
    )
    async with running_router(settings) as (_, client):
        await client.load("pinned")
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            await run(client, "other")
        assert time.monotonic() - started < 2  # not after the 20 s queue timeout
        assert caught.value.reason == "NO_CAPACITY"
        assert "pinned models (pinned)" in caught.value.message
        assert caught.value.retry_after is not None


async def test_a_cold_model_is_served_within_the_swap_budget_under_a_steady_stream(
    tmp_path: Path, tiny_chat: Path
) -> None:
    """Capacity for one model; resident A always has requests in flight and waiting. Without
    the swap budget A never goes idle and B times out (QUEUE_TIMEOUT after 6 s); with it A
    serves at most swap_batch_limit more, is evicted, and B loads (about 1.2 s measured)."""
    settings = settings_for(
        tmp_path,
        {"a": chat_model(tiny_chat), "b": chat_model(tiny_chat)},
        system={
            "llama_server_path": fake_server(tmp_path, "--token-delay 0.01"),
            "max_concurrent_models": 1,
            "swap_batch_limit": 3,
            "queue_timeout_sec": 6,
        },
    )
    async with running_router(settings) as (router, client):
        await client.load("a")
        async with steady_stream(client, "a", 4):
            await wait_until(lambda: router.pool.get("a").queue.waiting > 0, 5)
            started = time.monotonic()
            events = await run(client, "b", 5)
            waited = time.monotonic() - started
        assert isinstance(events[-1], End)
    assert waited < 4, waited
