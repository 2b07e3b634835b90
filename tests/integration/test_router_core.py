"""The router core against real embedded llama-server children (issue: router core)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import (
    Chunk,
    End,
    GenerateEvent,
    ModelNotFoundError,
    RouterClient,
    UnavailableError,
    WatchEvent,
)
from clients.errors import InvalidRequestError, WrongModelKindError
from router.server import Router
from router.v1 import inference_service_pb2 as ipb
from router.v1 import inference_service_pb2_grpc
from router.v1 import model_control_service_pb2 as mpb
from tests.helpers import (
    chat_model,
    embed_model,
    established_connections,
    fake_server,
    running_router,
    seconds_to_first_chunk,
    settings_for,
    wait_until,
)

PROMPT = {"messages": [{"role": "user", "content": "hello world the router"}], "temperature": 0}


async def collect(
    client: RouterClient, model: str, body: dict[str, Any] | str, **kwargs: Any
) -> list[GenerateEvent]:
    return [event async for event in client.generate(model, body, **kwargs)]


async def test_generate_streams_chunks_then_end_with_usage(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with running_router(settings) as (_, client):
        events = await collect(client, "chat", {**PROMPT, "max_tokens": 16, "stream": True})
    chunks = [e for e in events if isinstance(e, Chunk)]
    end = events[-1]
    assert isinstance(end, End)
    assert end.finish_reason == "length"
    assert end.usage.completion_tokens == 16
    assert end.usage.prompt_tokens > 0
    # Every upstream chunk arrives verbatim: one per token, plus the role and the finish
    # chunks. How many messages carry them depends on how fast they were read (a busy
    # machine may read them all at once); that streaming is real is the next test's job.
    data = [json.loads(item) for c in chunks for item in c.data]
    assert len(data) >= 16 + 2
    assert all(item["object"] == "chat.completion.chunk" for item in data)
    text = "".join(c.text for c in chunks)
    assert text.strip() and text.isascii()


async def test_the_last_chunks_ride_with_the_end(tmp_path: Path, tiny_chat: Path) -> None:
    body = {**PROMPT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    request = ipb.GenerateRequest(model="chat", kind=ipb.GENERATE_KIND_CHAT, body=json.dumps(body))
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with (
        running_router(settings) as (_, client),
        grpc.aio.insecure_channel(client.target) as channel,
    ):
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        calls = []
        for _ in range(3):
            calls.append([response async for response in stub.Generate(request)])
    endings = []
    for *before, last in calls:
        assert last.WhichOneof("event") == "end"
        assert last.end.usage.completion_tokens == 8
        assert {event.WhichOneof("event") for event in before} <= {"queued", "loading", "chunk"}
        streamed = [json.loads(d) for event in before for d in event.chunk.data]
        ending = [json.loads(item) for item in last.end.chunk.data]
        assert len(streamed) + len(ending) >= 8 + 3  # role, 8 tokens, finish, usage
        endings.append(ending)
    # The batch that held [DONE] is in End: with the usage chunk, and the finish chunk unless
    # that was read on its own. ([DONE] read alone would leave End without chunks: allowed, so
    # this asks it of one call in three.)
    assert any(ending and ending[-1]["usage"]["completion_tokens"] == 8 for ending in endings)


async def test_non_stream_returns_one_complete_response(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with running_router(settings) as (_, client):
        events = await collect(client, "chat", {**PROMPT, "max_tokens": 8})
        completion = await collect(
            client, "chat", {"prompt": "hello world", "max_tokens": 4}, kind="completion"
        )
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert len(chunks) == 1 and len(chunks[0].data) == 1
    assert '"object":"chat.completion"' in chunks[0].data[0]
    assert isinstance(events[-1], End) and events[-1].usage.completion_tokens == 8
    assert isinstance(completion[-1], End) and completion[-1].usage.completion_tokens == 4


async def test_complete_answers_in_one_message_what_generate_streams_in_several(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    body = {**PROMPT, "max_tokens": 8, "seed": 1}
    async with running_router(settings) as (router, client):
        events = await collect(client, "chat", body)
        completion = await client.complete("chat", body)
        text = await client.complete(
            "chat", {"prompt": "hello world", "max_tokens": 4}, kind="completion"
        )
        with pytest.raises(InvalidRequestError, match="use Generate") as refused:
            await client.complete("chat", {**body, "stream": True})
        assert router.pool.get("chat").in_flight == 0
        outcomes = {
            (sample.labels["endpoint"], sample.labels["status"]): sample.value
            for family in router.metrics.registry.collect()
            if family.name == "routermodel_requests"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["model"] == "chat"
        }
    # Each call is one request with its real outcome (an early exit once read as cancelled).
    assert {key: n for key, n in outcomes.items() if n} == {
        ("chat", "2xx"): 2,
        ("completion", "2xx"): 1,
        ("chat", "4xx"): 1,
    }
    (chunk,) = [e for e in events if isinstance(e, Chunk)]
    generated, completed = json.loads(chunk.data[0]), json.loads(completion.body)
    for answer in (generated, completed):  # the second one found its prompt in the cache
        del answer["id"], answer["created"], answer["timings"], answer["usage"]
    assert completed == generated  # the same body, verbatim from llama-server
    assert completion.text == chunk.text and completion.text
    assert (completion.end.finish_reason, completion.end.usage.completion_tokens) == ("length", 8)
    assert completion.end.timing.total_ms >= completion.end.timing.ttft_ms > 0
    assert '"object":"text_completion"' in text.body and text.end.usage.completion_tokens == 4
    assert refused.value.metadata.get("param") == "stream"


async def test_cancelling_complete_frees_the_slot(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat, n_ctx=65536, parallel_override=1)}
    )
    async with running_router(settings) as (router, client):
        await client.load("chat")
        long = asyncio.create_task(client.complete("chat", {**PROMPT, "max_tokens": 60000}))
        await wait_until(lambda: router.pool.get("chat").in_flight == 1, 10)
        long.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await long
        await wait_until(lambda: router.pool.get("chat").in_flight == 0, 1)  # the router's slot
        waited = await seconds_to_first_chunk(client, "chat", {**PROMPT, "max_tokens": 4})
    # llama-server's own slot: it notices a closed non-streamed request only when its HTTP
    # thread next polls, once a second (measured: the next request finished 0.41-0.80 s after
    # closes 0.20-0.59 s into the request; a closed stream frees it in 2 ms). So the next
    # request may wait up to that second inside llama-server, and no longer.
    assert waited < 2.0, f"the next request waited {waited:.2f} s for the slot"


async def test_first_chunk_arrives_long_before_the_end(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat, n_ctx=8192)})
    async with running_router(settings) as (_, client):
        await client.load("chat")
        started = time.monotonic()
        first = 0.0
        async for event in client.generate("chat", {**PROMPT, "max_tokens": 3000, "stream": True}):
            if isinstance(event, Chunk) and not first:
                first = time.monotonic() - started
        total = time.monotonic() - started
    assert first < total / 4, f"first chunk at {first:.3f} s of {total:.3f} s"


async def test_concurrency_is_capped_at_the_slots(tmp_path: Path, tiny_chat: Path) -> None:
    slots, requests = 2, 7
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat, parallel_override=slots)})
    async with running_router(settings) as (router, client):
        await client.load("chat")
        child = router.pool.get("chat").child
        assert child is not None
        peak_upstream = peak_queued = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak_upstream, peak_queued
            while not done.is_set():
                # The router's side: a finished stream's socket leaves ESTABLISHED when the
                # router closes it, while llama-server's side lingers until its HTTP thread
                # gets the CPU to close it (seen as a third socket on a busy machine).
                open_now = established_connections(child.port, side="client")
                peak_upstream = max(peak_upstream, open_now)
                peak_queued = max(peak_queued, router.pool.get("chat").queue.waiting)
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(
            *(
                collect(client, "chat", {**PROMPT, "max_tokens": 400, "stream": True})
                for _ in range(requests)
            )
        )
        done.set()
        await sampler
    assert all(isinstance(r[-1], End) and r[-1].usage.completion_tokens == 400 for r in results)
    assert 1 <= peak_upstream <= slots
    assert peak_queued >= 1  # the excess really waited in the router


async def test_cancel_frees_the_slot_at_once(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat, n_ctx=65536, parallel_override=1)}
    )
    async with running_router(settings) as (router, client):
        await client.load("chat")
        stream = client.generate("chat", {**PROMPT, "max_tokens": 60000, "stream": True})
        async for event in stream:
            if isinstance(event, Chunk):
                break
        await stream.aclose()  # the caller goes away mid-generation
        waited = await seconds_to_first_chunk(client, "chat", {**PROMPT, "max_tokens": 4})
        await wait_until(lambda: router.pool.get("chat").in_flight == 0, 2)
    assert waited < 1.0, f"the next request waited {waited:.2f} s for the slot"


async def test_child_killed_mid_stream_gives_unavailable_then_recovers(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat, n_ctx=65536)})
    async with running_router(settings) as (router, client):
        await client.load("chat")
        child = router.pool.get("chat").child
        assert child is not None
        killed_at = 0.0
        with pytest.raises(UnavailableError) as caught:
            async for event in client.generate(
                "chat", {**PROMPT, "max_tokens": 60000, "stream": True}
            ):
                if isinstance(event, Chunk) and not killed_at:
                    os.kill(child.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert time.monotonic() - killed_at < 2.0
        assert caught.value.reason == "MODEL_CRASHED"
        assert caught.value.retry_after is not None
        events = await collect(client, "chat", {**PROMPT, "max_tokens": 4, "stream": True})
        assert isinstance(events[-1], End)
        model = await client.get_model("chat")
        assert model.state == "ready" and model.restarts == 1 and model.pid != child.pid


async def test_concurrent_cold_requests_start_one_process(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat, parallel_override=4)})
    async with running_router(settings) as (_, client):
        starts = 0
        pids: set[int] = set()

        subscribed = asyncio.Event()

        async def count_starts() -> None:
            nonlocal starts
            previous = "stopped"
            async for event in client.watch():
                subscribed.set()  # the first event is the full status
                if event.kind == "model_update" and event.model:
                    if event.model.state == "starting" and previous != "starting":
                        starts += 1  # a transition into STARTING, not a stage update
                    previous = event.model.state
                    if event.model.pid:
                        pids.add(event.model.pid)

        watcher = asyncio.create_task(count_starts())
        await asyncio.wait_for(subscribed.wait(), 5)
        results = await asyncio.gather(
            *(collect(client, "chat", {**PROMPT, "max_tokens": 4}) for _ in range(8))
        )
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        model = await client.get_model("chat")
    assert all(isinstance(r[-1], End) for r in results)
    assert starts == 1
    assert pids == {model.pid}
    assert model.restarts == 0


async def test_embeddings_batch_keeps_order(tmp_path: Path, tiny_embed: Path) -> None:
    settings = settings_for(tmp_path, {"embed": embed_model(tiny_embed)})
    texts = ["hello world", "the cat", "router moon day"]
    async with running_router(settings) as (_, client):
        batch = await client.embed("embed", texts)
        singles = [(await client.embed("embed", [text])).embeddings[0] for text in texts]
    assert len(batch.embeddings) == 3
    assert all(len(v) == 64 for v in batch.embeddings)
    for vector, single in zip(batch.embeddings, singles, strict=True):
        assert math.isclose(
            sum(a * b for a, b in zip(vector, single, strict=True)), 1.0, rel_tol=1e-3
        )
    assert batch.prompt_tokens > 0


async def test_unknown_model_is_not_found_and_creates_no_state(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with running_router(settings) as (router, client):
        with pytest.raises(ModelNotFoundError):
            await collect(client, "nope", PROMPT)
        with pytest.raises(ModelNotFoundError):
            await client.get_model("nope")
        stats = await client.control.GetQueueStats(mpb.GetQueueStatsRequest())
        assert set(stats.per_model) == {"chat"}
        assert [s.alias for s in router.pool.supervisors()] == ["chat"]


async def test_bad_requests_are_invalid_argument(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat), "embed": embed_model(tiny_embed)}
    )
    async with running_router(settings) as (router, client):
        with pytest.raises(InvalidRequestError):
            await collect(client, "chat", "{not json")
        with pytest.raises(InvalidRequestError):
            await collect(client, "chat", "[1, 2]")
        with pytest.raises(InvalidRequestError, match="nested too deeply"):
            await collect(client, "chat", "[" * 100_000)  # beyond json's recursion limit
        with pytest.raises(WrongModelKindError):
            await collect(client, "embed", PROMPT)
        with pytest.raises(WrongModelKindError):
            await client.embed("chat", ["hello"])
        # None of these loaded anything.
        assert all(s.child is None for s in router.pool.supervisors())


async def test_status_answers_while_a_model_loads(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path,
        {"chat": chat_model(tiny_chat)},
        system={"llama_server_path": fake_server(tmp_path, "--load-delay 2")},
    )
    async with running_router(settings) as (router, client):
        load = asyncio.create_task(client.load("chat"))
        await wait_until(lambda: router.pool.get("chat").state.value in ("starting", "loading"), 5)
        started = time.monotonic()
        models = await client.list_models()
        assert time.monotonic() - started < 1.0  # held up, it would wait for the 2 s load
        assert models.models[0].alias == "chat"
        assert models.models[0].state in ("starting", "loading")
        ready = await load
        assert ready.state == "ready" and ready.pid > 0 and ready.port > 0


async def test_a_graceful_stop_ends_open_status_streams(tmp_path: Path, tiny_chat: Path) -> None:
    # Before: an open WatchModels held every stop for all of grpc.grace_sec, then was cancelled.
    grace = 5.0
    grpc_section = {"host": "127.0.0.1", "port": 0, "grace_sec": grace}
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)}, grpc=grpc_section)
    router = Router(settings)
    port = await router.start()
    events: list[WatchEvent] = []
    subscribed = asyncio.Event()

    async def watch(client: RouterClient) -> None:
        async for event in client.watch():
            events.append(event)
            subscribed.set()

    try:
        async with RouterClient(f"127.0.0.1:{port}") as client:
            watcher = asyncio.create_task(watch(client))
            await asyncio.wait_for(subscribed.wait(), 5)
            started = time.monotonic()
            await router.stop()
            stopped_in = time.monotonic() - started
            await asyncio.wait_for(watcher, 1)  # ended, and without an error
    finally:
        await router.stop()
    assert stopped_in < grace / 2
    assert (events[-1].kind, events[-1].server_state) == ("server_update", "shutting_down")


async def test_embedding_inputs_are_bounded_by_the_context_not_a_default_batch(
    tmp_path: Path, tiny_embed: Path
) -> None:
    # Before: with no batch settings, inputs past llama-server's default batch (256 tokens)
    # failed, and as a retryable 503; now the default batch covers the context, and an input
    # past a configured micro-batch is the caller's 400.
    long_input = " ".join(["hello world the router"] * 80)  # some 300 tokens
    models = {
        "default": {"model_path": str(tiny_embed), "params": {"n_ctx": 512, "embedding": True}},
        "small": embed_model(tiny_embed, n_ctx=512, ubatch_size=128, batch_override=128),
    }
    async with running_router(settings_for(tmp_path, models)) as (_, client):
        result = await client.embed("default", [long_input])
        assert 128 < result.prompt_tokens <= 512
        with pytest.raises(InvalidRequestError, match=r"embeds at once \(128 tokens\)"):
            await client.embed("small", [long_input])


async def test_a_body_within_the_limit_is_never_too_large_for_the_router(
    tmp_path: Path, tiny_embed: Path
) -> None:
    # Before: one-token arrays take 5 bytes of protobuf for every 4 of JSON, and a body within
    # api.max_body_bytes got RESOURCE_EXHAUSTED (a 413) instead of the router's own answer.
    limit = 1024 * 1024
    inputs = [[0]] * (limit // 4 - 16)
    assert len(json.dumps({"model": "embed", "input": inputs}, separators=(",", ":"))) <= limit
    settings = settings_for(
        tmp_path, {"embed": embed_model(tiny_embed)}, api={"max_body_bytes": limit}
    )
    async with running_router(settings) as (router, _):
        async with RouterClient(f"127.0.0.1:{router.port}", max_message_bytes=2 * limit) as client:
            with pytest.raises(InvalidRequestError, match="too many inputs"):
                await client.embed("embed", inputs)


@pytest.mark.parametrize(
    ("part", "media"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ],
)
async def test_media_for_a_model_without_a_projector_is_the_callers_error(
    tmp_path: Path, tiny_chat: Path, part: dict[str, Any], media: str
) -> None:
    # Before: llama-server refuses it with a 500, which reached the caller as a retryable 503
    # (the OpenAI SDK retried it twice).
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    async with running_router(settings_for(tmp_path, {"chat": chat_model(tiny_chat)})) as (
        router,
        client,
    ):
        with pytest.raises(InvalidRequestError, match=f"does not take {media} input"):
            await client.complete("chat", body)
        assert router.pool.get("chat").state.value == "stopped"  # refused before a load


async def test_an_n_ctx_past_the_training_context_is_reported_at_start(
    tmp_path: Path, tiny_chat: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # llama-server caps each slot at the model's training context (tiny-chat: 2048): measured,
    # max_tokens 60000 at n_ctx 65536 ends after 2,022 tokens with "length". Say so at start.
    models = {"big": chat_model(tiny_chat, n_ctx=8192), "fits": chat_model(tiny_chat, n_ctx=2048)}
    with caplog.at_level(logging.WARNING, logger="router.pool.supervisor"):
        async with running_router(settings_for(tmp_path, models)) as (router, _):
            supervisors = router.pool.supervisors()
            await wait_until(lambda: all(s.estimate is not None for s in supervisors), 10)
    warned = [r.getMessage() for r in caplog.records if "training context" in r.getMessage()]
    assert warned == [
        "big: n_ctx 8192 is more than the model's training context, 2048: llama-server gives "
        "each request at most 2048 tokens"
    ]
