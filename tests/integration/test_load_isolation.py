"""One model's trouble stays its own: stuck or abandoned loads, expired deadlines, a graceful stop.

- The seed's W1: a load cancelled by a timeout kept its lock, and every later load, status query
  and eject hung for good. Here a load of `stuck` (a fake llama-server that never becomes ready)
  times out or is cancelled, and `other` must then load *and* serve a real request, promptly.
- A Generate whose gRPC deadline expires mid-stream frees its slot on a 1-slot model.
- SIGTERM: health goes NOT_SERVING, new calls are refused, and a stream in flight still ends
  with its End event within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import (
    Chunk,
    DeadlineExceededError,
    End,
    GenerateEvent,
    RouterClient,
    UnavailableError,
)
from router.config import load_settings
from router.server import Router
from tests.helpers import (
    chat_model,
    fake_server,
    free_port,
    pid_alive,
    router_process,
    running_router,
    seconds_to_first_chunk,
    settings_for,
    wait_until,
    write_config,
)

PROMPT = {"messages": [{"role": "user", "content": "hello world the router"}], "temperature": 0}
# `other` is a fake llama-server: ready at once, a few tokens in milliseconds. Loading and
# serving it after the trouble with `stuck` takes well under this unless something is held.
PROMPT_BOUND_SEC = 3.0


async def collect(
    client: RouterClient, model: str, body: dict[str, Any], **kwargs: Any
) -> list[GenerateEvent]:
    return [event async for event in client.generate(model, body, **kwargs)]


def two_models(directory: Path, tiny_chat: Path) -> dict[str, Any]:
    """`stuck` never becomes ready (its /health says "Loading model"); `other` is ready at once."""
    models = {}
    for alias, knobs in (("stuck", ["--load-delay", "600"]), ("other", [])):
        path = directory / f"{alias}.gguf"
        path.symlink_to(tiny_chat)
        models[alias] = {"model_path": str(path), "params": {"n_ctx": 4096, "extra_args": knobs}}
    return models


@contextlib.asynccontextmanager
async def two_model_router(
    directory: Path, tiny_chat: Path, wait_ready_sec: float
) -> AsyncIterator[tuple[Router, RouterClient]]:
    settings = settings_for(
        directory,
        two_models(directory, tiny_chat),
        system={
            "llama_server_path": fake_server(directory),
            "wait_ready_sec": wait_ready_sec,
            "model_load_max_retries": 0,
            # One load at a time per device (the default): a load turn that leaked would keep
            # `other` from ever loading.
            "max_loads_per_device": 1,
        },
    )
    async with running_router(settings) as pair:
        yield pair


async def assert_other_loads_and_serves(router: Router, client: RouterClient) -> None:
    started = time.monotonic()
    model = await client.load("other", timeout=PROMPT_BOUND_SEC)
    assert model.state == "ready"
    events = await collect(client, "other", {**PROMPT, "max_tokens": 4, "stream": True})
    elapsed = time.monotonic() - started
    assert isinstance(events[-1], End) and events[-1].usage.completion_tokens == 4
    assert any(isinstance(e, Chunk) for e in events)
    assert elapsed < PROMPT_BOUND_SEC, f"other took {elapsed:.2f} s to load and serve"
    # Status answers at once, as it did throughout.
    started = time.monotonic()
    models = {m.alias: m.state for m in (await client.list_models()).models}
    assert time.monotonic() - started < 0.5
    assert models["other"] == "ready"


async def test_a_load_that_times_out_leaves_the_other_model_loadable_and_serving(
    tmp_path: Path, tiny_chat: Path
) -> None:
    async with two_model_router(tmp_path, tiny_chat, wait_ready_sec=1.5) as (router, client):
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            # Waits longer than the load may take: the load itself fails, not this wait.
            await client.load("stuck", timeout=1.5 + PROMPT_BOUND_SEC)
        assert caught.value.reason == "LOAD_FAILED"
        assert 1.4 < time.monotonic() - started < 1.5 + PROMPT_BOUND_SEC
        stuck = router.pool.get("stuck")
        # The stuck child was stopped, not left running with its load turn.
        await wait_until(lambda: stuck.child is None, 5)

        await assert_other_loads_and_serves(router, client)
        # And `stuck` itself is not wedged: eject answers at once.
        started = time.monotonic()
        await client.unload("stuck", timeout=2)
        assert time.monotonic() - started < 1.0


async def test_cancelled_loads_leave_the_other_model_loadable_and_serving(
    tmp_path: Path, tiny_chat: Path
) -> None:
    # wait_ready_sec is long: only the cancels below can end the load of `stuck` in time.
    async with two_model_router(tmp_path, tiny_chat, wait_ready_sec=120) as (router, client):
        stuck = router.pool.get("stuck")
        # W1's pattern: the waiting caller is cancelled by a timeout wrapper, mid-load.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.load("stuck"), 0.5)
        # A Generate whose deadline expires while the model loads.
        with pytest.raises(DeadlineExceededError):
            await collect(client, "stuck", {**PROMPT, "max_tokens": 4}, timeout=0.5)
        # The router sees that call end a moment later (a busy machine: much later); until
        # then the queued waiter counted below could be that one, not the next.
        await wait_until(lambda: stuck.queue.waiting == 0, 5)
        # A waiter still queued when the load is cancelled by an unload.
        waiter = asyncio.create_task(collect(client, "stuck", {**PROMPT, "max_tokens": 4}))
        await wait_until(lambda: stuck.queue.waiting == 1, 5)
        assert stuck.child is not None and stuck.state.name in {"STARTING", "LOADING"}
        child = stuck.child.pid

        started = time.monotonic()
        await client.unload("stuck", timeout=5)  # cancels the load
        assert time.monotonic() - started < 2.0
        with pytest.raises(UnavailableError) as caught:
            await waiter
        assert caught.value.reason == "MODEL_UNLOADED"
        assert stuck.state.name == "STOPPED" and stuck.queue.waiting == 0
        await wait_until(lambda: not pid_alive(child), 5)

        await assert_other_loads_and_serves(router, client)


async def test_a_deadline_expiring_mid_stream_frees_the_slot(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat, n_ctx=65536, parallel_override=1)}
    )
    async with running_router(settings) as (router, client):
        await client.load("chat")
        chunks = 0
        with pytest.raises(DeadlineExceededError):
            # ~60000 tokens: many seconds of streaming, cut by a 1 s deadline.
            async for event in client.generate(
                "chat", {**PROMPT, "max_tokens": 60000, "stream": True}, timeout=1.0
            ):
                chunks += isinstance(event, Chunk)
        assert chunks > 0, "the deadline must expire mid-stream, not before it"

        waited = await seconds_to_first_chunk(client, "chat", {**PROMPT, "max_tokens": 4})
        await wait_until(lambda: router.pool.get("chat").in_flight == 0, 2)
    assert waited < 1.0, f"the next request waited {waited:.2f} s for the slot"


TOKENS, TOKEN_DELAY, GRACE = (
    40,
    0.05,
    5.0,
)  # a 2 s stream: it outlives the stop's start, not the grace


def streaming_chat(directory: Path, tiny_chat: Path, port: int) -> Path:
    """A config with `chat` on the fake llama-server, streaming TOKENS tokens slowly."""
    return write_config(
        directory,
        {"chat": chat_model(tiny_chat, extra_args=["--token-delay", str(TOKEN_DELAY)])},
        system={"llama_server_path": fake_server(directory)},
        grpc={"host": "127.0.0.1", "port": port, "grace_sec": GRACE},
    )


SLOW_BODY = {**PROMPT, "max_tokens": TOKENS, "stream": True}


async def first_chunk(client: RouterClient) -> AsyncGenerator[GenerateEvent, None]:
    """A slow stream, read up to its first chunk (past queued/loading while `chat` loads)."""
    stream = client.generate("chat", SLOW_BODY, timeout=30)
    while not isinstance(await anext(stream), Chunk):
        pass
    return stream


async def assert_refused(client: RouterClient) -> None:
    with pytest.raises(UnavailableError):
        await collect(client, "chat", SLOW_BODY, timeout=5)


async def assert_ends_within_grace(
    stream: AsyncGenerator[GenerateEvent, None], since: float
) -> None:
    rest = [event async for event in stream]
    end = rest[-1]
    assert isinstance(end, End) and end.usage.completion_tokens == TOKENS
    ended = time.monotonic() - since
    assert ended < GRACE, f"the stream ended {ended:.2f} s after the stop began"


async def test_router_stop_is_graceful(tmp_path: Path, tiny_chat: Path) -> None:
    settings = load_settings(streaming_chat(tmp_path, tiny_chat, port=0), env={})
    async with running_router(settings) as (router, client):
        stream = await first_chunk(client)
        child = router.pool.get("chat").child
        assert child is not None

        stopping = time.monotonic()
        stop = asyncio.create_task(router.stop())
        request = health_pb2.HealthCheckRequest(service="")
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

        async def reports_not_serving() -> bool:
            return bool((await router.health.Check(request, None)).status == not_serving)

        await wait_until(reports_not_serving, 1)
        await assert_refused(client)
        await assert_ends_within_grace(stream, stopping)
        await asyncio.wait_for(stop, GRACE)
        assert not pid_alive(child.pid)


async def test_sigterm_is_graceful(tmp_path: Path, tiny_chat: Path) -> None:
    port = free_port()
    with router_process(streaming_chat(tmp_path, tiny_chat, port), port) as process:
        async with RouterClient(f"127.0.0.1:{port}") as client:
            stream = await first_chunk(client)

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="")
                serving = health_pb2.HealthCheckResponse.SERVING
                assert (await health.Check(request)).status == serving  # connected before

                async def stopping() -> bool:  # the signal reached the router's loop
                    try:
                        return bool((await health.Check(request)).status != serving)
                    except grpc.aio.AioRpcError as error:  # new calls are refused already
                        return bool(error.code() == grpc.StatusCode.UNAVAILABLE)

                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                await wait_until(stopping, 5)
            await assert_refused(client)
            await assert_ends_within_grace(stream, signalled)
        assert await asyncio.to_thread(process.wait, GRACE + 5) == 0


async def test_health_watch_reports_not_serving_on_sigterm(tmp_path: Path, tiny_chat: Path) -> None:
    port = free_port()
    with router_process(streaming_chat(tmp_path, tiny_chat, port), port) as process:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            statuses = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert (await statuses.read()).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)
            update = await asyncio.wait_for(statuses.read(), 2)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.to_thread(process.wait, GRACE + 5) == 0
