"""RouterClient against the fake router, over a real grpc.aio server and channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.instrumentation.grpc import aio_client_interceptors

import clients
from clients import (
    Chunk,
    End,
    Loading,
    ModelInfo,
    Queued,
    RouterClient,
    ServerInfo,
    StatusSummary,
    Timing,
    Usage,
    WatchEvent,
)
from router.v1 import inference_service_pb2, model_control_service_pb2, model_pb2
from tests.clients.fake_router import (
    FakeRouter,
    chunk,
    end,
    loading,
    make_model,
    queued,
    rich_status,
    serve_fake_router,
)

STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
CREATED = datetime(2025, 12, 1, 8, 0, 0, tzinfo=timezone.utc)
# A bound against hanging, not a latency claim: a busy 2-core first run has taken over 1 s to
# deliver a cancellation to the in-process fake router.
EVENTUALLY = 10.0
CHAT_BODY = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


@pytest.fixture
async def router() -> AsyncIterator[tuple[FakeRouter, RouterClient]]:
    async with serve_fake_router() as (fake, target), RouterClient(target) as client:
        yield fake, client


async def test_wait_ready_returns_once_connected(router: tuple[FakeRouter, RouterClient]) -> None:
    _, client = router
    await client.wait_ready(timeout=5)


# Generate


async def test_generate_yields_typed_events_in_order(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.generate_events = [
        queued(2, 3),
        queued(1, 2),
        loading(model_pb2.LOAD_STAGE_LOADING_WEIGHTS, 0.5),
        chunk('{"id":"c1"}', '{"id":"c2"}', text="Hel"),
        inference_service_pb2.GenerateResponse(),  # an event kind newer than the client
        chunk('{"id":"c3"}', text="lo"),
        end(
            "stop",
            usage=inference_service_pb2.Usage(
                prompt_tokens=5, completion_tokens=2, total_tokens=7, cached_tokens=1
            ),
            timing=inference_service_pb2.Timing(
                queue_ms=1.0, load_ms=2.0, ttft_ms=3.0, total_ms=4.0
            ),
        ),
    ]

    events = [event async for event in client.generate("chat", CHAT_BODY)]

    assert events == [
        Queued(position=2, queue_length=3),
        Queued(position=1, queue_length=2),
        Loading(stage="loading_weights", elapsed_sec=0.5),
        Chunk(data=['{"id":"c1"}', '{"id":"c2"}'], text="Hel"),
        Chunk(data=['{"id":"c3"}'], text="lo"),
        End(
            finish_reason="stop",
            usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7, cached_tokens=1),
            timing=Timing(queue_ms=1.0, load_ms=2.0, ttft_ms=3.0, total_ms=4.0),
        ),
    ]


async def test_the_last_chunks_riding_with_the_end_come_as_a_chunk_before_it(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    last = inference_service_pb2.Chunk(data=['{"id":"c2"}', '{"id":"c3"}'], text="lo")
    fake.generate_events = [chunk('{"id":"c1"}', text="Hel"), end("length", chunk=last)]

    events = [event async for event in client.generate("chat", CHAT_BODY)]

    assert events[:2] == [
        Chunk(data=['{"id":"c1"}'], text="Hel"),
        Chunk(data=['{"id":"c2"}', '{"id":"c3"}'], text="lo"),
    ]
    assert isinstance(events[2], End) and events[2].finish_reason == "length"
    assert len(events) == 3


async def test_generate_sends_the_request(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router

    _ = [
        event
        async for event in client.generate(
            "writer",
            {"prompt": "Once", "max_tokens": 3},
            kind="completion",
            priority="high",
            request_id="req-1",
        )
    ]

    request = fake.calls[0].request
    assert isinstance(request, inference_service_pb2.GenerateRequest)
    assert request.model == "writer"
    assert request.kind == inference_service_pb2.GENERATE_KIND_COMPLETION
    assert request.body == '{"prompt":"Once","max_tokens":3}'
    assert request.priority == inference_service_pb2.PRIORITY_HIGH
    assert request.request_id == "req-1"


async def test_generate_sends_a_str_body_unchanged(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    body = json.dumps(CHAT_BODY, indent=2)

    _ = [event async for event in client.generate("chat", body, priority="low")]

    request = fake.calls[0].request
    assert isinstance(request, inference_service_pb2.GenerateRequest)
    assert request.body == body
    assert request.kind == inference_service_pb2.GENERATE_KIND_CHAT
    assert request.priority == inference_service_pb2.PRIORITY_LOW
    assert request.request_id == ""


async def test_generate_rejects_an_unknown_kind(router: tuple[FakeRouter, RouterClient]) -> None:
    _, client = router
    with pytest.raises(ValueError, match="kind must be one of chat, completion"):
        client.generate("chat", CHAT_BODY, kind=cast(Any, "edit"))


async def test_generate_does_not_call_until_iterated(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    events = client.generate("chat", CHAT_BODY)
    await asyncio.sleep(0.05)
    assert fake.calls == []
    await events.aclose()


async def test_breaking_out_of_generate_cancels_the_call(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.generate_events = [chunk('{"id":"c1"}', text="Hi")]
    fake.hold_streams_open = True

    async for event in client.generate("chat", CHAT_BODY):
        assert isinstance(event, Chunk)
        break

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)
    assert fake.cancelled_methods == ["Generate"]


async def test_closing_generate_cancels_the_call(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router
    fake.generate_events = [queued(1, 1)]
    fake.hold_streams_open = True

    async with contextlib.aclosing(client.generate("chat", CHAT_BODY)) as events:
        assert await anext(events) == Queued(position=1, queue_length=1)

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)


async def test_cancelling_the_consumer_task_cancels_the_call(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.hold_streams_open = True
    consumer = asyncio.create_task(_drain(client.generate("chat", CHAT_BODY)))
    await asyncio.wait_for(fake.called.wait(), timeout=EVENTUALLY)

    consumer.cancel()

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)
    with pytest.raises(asyncio.CancelledError):
        await consumer


async def test_cancel_passes_through_tracing_interceptors() -> None:
    # opentelemetry-python-contrib#3271: aio client interceptors were reported to swallow
    # CancelledError, which would leave the router's upstream request running.
    async with serve_fake_router() as (fake, target):
        fake.hold_streams_open = True
        async with RouterClient(target, interceptors=aio_client_interceptors()) as client:
            consumer = asyncio.create_task(_drain(client.generate("chat", CHAT_BODY)))
            await asyncio.wait_for(fake.called.wait(), timeout=EVENTUALLY)

            consumer.cancel()

            await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)
            with pytest.raises(asyncio.CancelledError):
                await consumer


async def test_generate_error_after_chunks_raises_the_mapped_error(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.generate_events = [chunk('{"id":"c1"}', text="Hi")]
    fake.errors["Generate"] = rich_status(
        grpc.StatusCode.UNAVAILABLE, "the model crashed", reason="MODEL_CRASHED"
    )
    received = []

    with pytest.raises(clients.UnavailableError) as caught:
        async for event in client.generate("chat", CHAT_BODY):
            received.append(event)

    assert received == [Chunk(data=['{"id":"c1"}'], text="Hi")]
    assert caught.value.reason == "MODEL_CRASHED"


async def test_generate_timeout_is_the_call_deadline(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.hold_streams_open = True

    with pytest.raises(clients.DeadlineExceededError):
        await _drain(client.generate("chat", CHAT_BODY, timeout=0.2))

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)


# Metadata


async def test_api_key_and_call_metadata_reach_the_router() -> None:
    async with serve_fake_router() as (fake, target):
        async with RouterClient(target, api_key="sk-test") as client:
            await client.list_models(metadata=[("x-request-id", "req-7")])
            await _drain(client.generate("chat", CHAT_BODY))

    for call in fake.calls:
        assert call.header("authorization") == ["Bearer sk-test"]
    assert fake.calls[0].header("x-request-id") == ["req-7"]


async def test_without_api_key_no_authorization_is_sent(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    await client.list_models()
    assert fake.calls[0].header("authorization") == []


async def test_forwarded_caller_key_travels_as_call_metadata(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    await client.list_models(metadata=[("authorization", "Bearer caller-key")])
    assert fake.calls[0].header("authorization") == ["Bearer caller-key"]


async def test_interceptors_run_on_every_call() -> None:
    # grpc-stubs makes the interceptor classes generic; at runtime they are not subscriptable.
    class AddHeader(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
        async def intercept_unary_unary(
            self,
            continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
            details: grpc.aio.ClientCallDetails,
            request: Any,
        ) -> Any:
            metadata = grpc.aio.Metadata(*(details.metadata or ()), ("x-intercepted", "yes"))
            return await continuation(
                grpc.aio.ClientCallDetails(
                    details.method,
                    details.timeout,
                    metadata,
                    details.credentials,
                    details.wait_for_ready,
                ),
                request,
            )

    # grpc-stubs types ClientInterceptor as an opaque placeholder that real interceptors
    # must be cast to.
    interceptor = cast(grpc.aio.ClientInterceptor, AddHeader())
    async with serve_fake_router() as (fake, target):
        async with RouterClient(target, interceptors=[interceptor]) as client:
            await client.list_models()

    assert fake.calls[0].header("x-intercepted") == ["yes"]


# Complete


async def test_complete_returns_the_body_text_and_end(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.generate_events = [
        chunk('{"object":"chat.completion"}', text="Hi there"),
        end("length", usage=inference_service_pb2.Usage(prompt_tokens=3, completion_tokens=2)),
    ]

    completion = await client.complete(
        "chat", {"messages": []}, kind="completion", priority="low", request_id="c-1"
    )

    assert completion.body == '{"object":"chat.completion"}'
    assert completion.text == "Hi there"
    assert completion.end.finish_reason == "length"
    assert (completion.end.usage.prompt_tokens, completion.end.usage.completion_tokens) == (3, 2)
    request = fake.calls[0].request
    assert isinstance(request, inference_service_pb2.CompleteRequest)
    assert (request.model, request.body, request.request_id) == ("chat", '{"messages":[]}', "c-1")
    assert request.kind == inference_service_pb2.GENERATE_KIND_COMPLETION
    assert request.priority == inference_service_pb2.PRIORITY_LOW


async def test_complete_maps_errors_and_deadlines(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router
    fake.errors["Complete"] = rich_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", reason="QUEUE_FULL", retry_after=2
    )
    with pytest.raises(clients.RateLimitError) as caught:
        await client.complete("chat", CHAT_BODY)
    assert (caught.value.reason, caught.value.retry_after) == ("QUEUE_FULL", 2)

    del fake.errors["Complete"]
    fake.hold_streams_open = True
    with pytest.raises(clients.DeadlineExceededError):
        await client.complete("chat", CHAT_BODY, timeout=0.2)
    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)


async def test_cancelling_complete_cancels_the_call(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.hold_streams_open = True
    call = asyncio.create_task(client.complete("chat", CHAT_BODY))
    await asyncio.wait_for(fake.called.wait(), timeout=EVENTUALLY)

    call.cancel()

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)
    assert fake.cancelled_methods == ["Complete"]
    with pytest.raises(asyncio.CancelledError):
        await call


# Embed


async def test_embed_returns_one_vector_per_input_in_order(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router

    result = await client.embed("bge", ["a", "bbb", "cc"], priority="high", request_id="e-1")

    assert result == clients.EmbedResult(
        embeddings=[[0.0, 1.0], [1.0, 3.0], [2.0, 2.0]], prompt_tokens=6, total_tokens=6
    )
    request = fake.calls[0].request
    assert isinstance(request, inference_service_pb2.EmbedRequest)
    assert (request.model, list(request.inputs), request.request_id) == (
        "bge",
        ["a", "bbb", "cc"],
        "e-1",
    )
    assert request.priority == inference_service_pb2.PRIORITY_HIGH


async def test_embed_orders_vectors_by_input_index(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.responses["Embed"] = inference_service_pb2.EmbedResponse(
        embeddings=[
            inference_service_pb2.Embedding(index=2, values=[2.0]),
            inference_service_pb2.Embedding(index=0, values=[0.0]),
            inference_service_pb2.Embedding(index=1, values=[1.0]),
        ]
    )

    result = await client.embed("bge", ["a", "b", "c"])

    assert result.embeddings == [[0.0], [1.0], [2.0]]


async def test_embed_sends_token_inputs(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router

    result = await client.embed("bge", [[1, 2, 3], [4]])

    request = fake.calls[0].request
    assert isinstance(request, inference_service_pb2.EmbedRequest)
    assert [list(tokens.ids) for tokens in request.token_inputs] == [[1, 2, 3], [4]]
    assert list(request.inputs) == []
    assert result.embeddings == [[0.0, 3.0], [1.0, 1.0]]


async def test_embed_rejects_a_single_str(router: tuple[FakeRouter, RouterClient]) -> None:
    _, client = router
    with pytest.raises(TypeError):
        await client.embed("bge", "hello")


# ModelControl


async def test_list_models_converts_models_server_and_summary(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.models = {
        "chat": make_model(
            "chat",
            port=41001,
            pid=123,
            slots=2,
            in_flight=1,
            queued=3,
            n_ctx=4096,
            pinned=True,
            state_since=timestamp(STARTED),
            restarts=1,
            device="gpu:0",
            memory_estimate_mib=900,
            memory_measured_mib=880,
            load_seconds=1.5,
            ttl_sec=600,
            created_at=timestamp(CREATED),
        ),
        "bge": make_model(
            "bge",
            state=model_pb2.MODEL_STATE_LOADING,
            kind=model_pb2.MODEL_KIND_EMBEDDING,
            load_stage=model_pb2.LOAD_STAGE_LOADING_WEIGHTS,
        ),
    }
    fake.server.started_at.CopyFrom(timestamp(STARTED))

    listing = await client.list_models()

    assert [model.alias for model in listing.models] == ["chat", "bge"]
    assert listing.models[0] == ModelInfo(
        alias="chat",
        state="ready",
        kind="chat",
        port=41001,
        pid=123,
        slots=2,
        in_flight=1,
        queued=3,
        n_ctx=4096,
        pinned=True,
        last_error="",
        state_since=STARTED,
        last_used_at=None,
        retry_at=None,
        consecutive_failures=0,
        restarts=1,
        device="gpu:0",
        memory_estimate_mib=900,
        memory_measured_mib=880,
        load_seconds=1.5,
        ttl_sec=600,
        load_stage="unspecified",
        created_at=CREATED,
    )
    embedder = listing.models[1]
    assert (embedder.state, embedder.kind, embedder.load_stage) == (
        "loading",
        "embedding",
        "loading_weights",
    )
    assert listing.server == ServerInfo(
        state="serving",
        started_at=STARTED,
        epoch="fake-epoch",
        version="0.0.0-fake",
        cpu_mode=False,
        updated_at=None,
    )
    assert listing.summary == StatusSummary(total=2, by_state={"ready": 1, "loading": 1})


async def test_get_model_returns_one_model(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router
    fake.models = {"chat": make_model("chat", state=model_pb2.MODEL_STATE_STOPPED)}

    model = await client.get_model("chat")

    assert (model.alias, model.state) == ("chat", "stopped")


async def test_get_unknown_model_raises_model_not_found(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    _, client = router

    with pytest.raises(clients.ModelNotFoundError) as caught:
        await client.get_model("nope")

    assert (caught.value.reason, caught.value.metadata) == ("MODEL_NOT_FOUND", {"model": "nope"})


async def test_load_waits_with_the_timeout_and_returns_the_model(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.models = {"chat": make_model("chat", state=model_pb2.MODEL_STATE_STOPPED)}

    model = await client.load("chat", timeout=30)

    assert model.state == "ready"
    request = fake.calls[0].request
    assert isinstance(request, model_control_service_pb2.LoadModelRequest)
    assert (request.model, request.wait, request.timeout_sec) == ("chat", True, 30.0)


async def test_load_without_wait_or_timeout_sends_the_defaults(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.models = {"chat": make_model("chat", state=model_pb2.MODEL_STATE_STOPPED)}

    await client.load("chat", wait=False)

    request = fake.calls[0].request
    assert isinstance(request, model_control_service_pb2.LoadModelRequest)
    assert (request.wait, request.timeout_sec) == (False, 0.0)


async def test_unload_sends_force_and_drain_timeout(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.models = {"chat": make_model("chat")}

    model = await client.unload("chat", force=True, drain_timeout=2.5)

    assert model.state == "stopped"
    request = fake.calls[0].request
    assert isinstance(request, model_control_service_pb2.UnloadModelRequest)
    assert (request.model, request.force, request.drain_timeout_sec) == ("chat", True, 2.5)


async def test_reset_clears_the_failure(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router
    fake.models = {
        "chat": make_model(
            "chat",
            state=model_pb2.MODEL_STATE_FAILED,
            last_error="exited with 1",
            consecutive_failures=3,
            retry_at=timestamp(STARTED),
        )
    }

    model = await client.reset("chat")

    request = fake.calls[0].request
    assert isinstance(request, model_control_service_pb2.ResetModelRequest)
    assert request.model == "chat"
    assert (model.state, model.last_error, model.consecutive_failures, model.retry_at) == (
        "stopped",
        "",
        0,
        None,
    )


async def test_unary_timeout_is_the_call_deadline(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.delay = 5

    with pytest.raises(clients.DeadlineExceededError):
        await client.reset("chat", timeout=0.1)

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)


# WatchModels


async def test_watch_yields_each_kind_of_event(router: tuple[FakeRouter, RouterClient]) -> None:
    fake, client = router
    server = model_pb2.ServerStatus(
        state=model_pb2.SERVER_STATE_STARTING, epoch="e1", started_at=timestamp(STARTED)
    )
    chat = make_model("chat")
    fake.watch_events = [
        model_control_service_pb2.WatchModelsResponse(
            revision=1,
            event_id="e1-1",
            full_status=model_control_service_pb2.FullStatus(
                server=server,
                models=[chat],
                summary=model_pb2.StatusSummary(total=1, by_state={"ready": 1}),
            ),
        ),
        model_control_service_pb2.WatchModelsResponse(
            revision=2, event_id="e1-2", model_update=chat
        ),
        model_control_service_pb2.WatchModelsResponse(
            revision=3, event_id="e1-3", server_update=server
        ),
        model_control_service_pb2.WatchModelsResponse(
            revision=3,
            event_id="e1-3",
            heartbeat=model_control_service_pb2.Heartbeat(
                timestamp=timestamp(STARTED), server_state=model_pb2.SERVER_STATE_SERVING
            ),
        ),
    ]

    events = [event async for event in client.watch(last_event_id="e0-9")]

    server_info = ServerInfo(
        state="starting",
        started_at=STARTED,
        epoch="e1",
        version="",
        cpu_mode=False,
        updated_at=None,
    )
    chat_info = _default_model_info("chat")
    assert events == [
        WatchEvent(
            1,
            "e1-1",
            "full_status",
            server=server_info,
            models=(chat_info,),
            summary=StatusSummary(total=1, by_state={"ready": 1}),
            server_state="starting",
        ),
        WatchEvent(2, "e1-2", "model_update", model=chat_info),
        WatchEvent(3, "e1-3", "server_update", server=server_info, server_state="starting"),
        WatchEvent(3, "e1-3", "heartbeat", timestamp=STARTED, server_state="serving"),
    ]
    request = fake.calls[0].request
    assert isinstance(request, model_control_service_pb2.WatchModelsRequest)
    assert request.last_event_id == "e0-9"


async def test_breaking_out_of_watch_cancels_the_call(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.watch_events = [
        model_control_service_pb2.WatchModelsResponse(
            revision=1, event_id="e1-1", heartbeat=model_control_service_pb2.Heartbeat()
        )
    ]
    fake.hold_streams_open = True

    async for event in client.watch():
        assert event.kind == "heartbeat"
        break

    await asyncio.wait_for(fake.cancelled.wait(), timeout=EVENTUALLY)
    assert fake.cancelled_methods == ["WatchModels"]


# Raw stubs


async def test_raw_stubs_reach_the_router_through_the_client(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.models = {"chat": make_model("chat")}

    listing = await client.control.ListModels(model_control_service_pb2.ListModelsRequest())
    embedded = await client.inference.Embed(inference_service_pb2.EmbedRequest(inputs=["a"]))

    assert [model.alias for model in listing.models] == ["chat"]
    assert len(embedded.embeddings) == 1


# Helpers


async def _drain(events: AsyncIterator[object]) -> None:
    async for _ in events:
        pass


def _default_model_info(alias: str) -> ModelInfo:
    """What make_model(alias) reads as: a ready chat model with every other field unset."""
    return ModelInfo(
        alias=alias,
        state="ready",
        kind="chat",
        port=0,
        pid=0,
        slots=0,
        in_flight=0,
        queued=0,
        n_ctx=0,
        pinned=False,
        last_error="",
        state_since=None,
        last_used_at=None,
        retry_at=None,
        consecutive_failures=0,
        restarts=0,
        device="",
        memory_estimate_mib=0,
        memory_measured_mib=0,
        load_seconds=0.0,
        ttl_sec=0,
        load_stage="unspecified",
        created_at=None,
    )


# Found by review; each failed before its fix


async def test_a_reply_larger_than_the_request_limit_is_received() -> None:
    # Before: the request limit (8 MiB by default) bounded replies too, and a large batch of
    # embeddings, computed by the router, failed as RequestTooLargeError.
    dims, count = 1024, 2048
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]  # as the router's
    async with serve_fake_router(options=options) as (fake, target):
        fake.responses["Embed"] = inference_service_pb2.EmbedResponse(
            embeddings=[
                inference_service_pb2.Embedding(index=i, values=[0.5] * dims) for i in range(count)
            ]
        )
        assert fake.responses["Embed"].ByteSize() > 8 * 1024 * 1024
        async with RouterClient(target) as client:
            result = await client.embed("embed", ["hello"] * count)
    assert len(result.embeddings) == count


async def test_calls_cut_by_close_fail_as_cancelled_requests(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    # Before: they raised a bare asyncio.CancelledError in tasks nobody had cancelled.
    fake, client = router
    fake.hold_streams_open = True

    async def stream() -> None:
        async for _ in client.generate("chat", CHAT_BODY):
            pass

    calls = [
        asyncio.create_task(stream()),
        asyncio.create_task(client.complete("chat", {**CHAT_BODY, "stream": False})),
    ]
    await wait_for_calls(fake, 2)
    await client.close()

    for call in calls:
        with pytest.raises(clients.RequestCancelledError):
            await call
        assert not call.cancelled()


async def wait_for_calls(fake: FakeRouter, count: int) -> None:
    async def reached() -> None:
        while len(fake.calls) < count:
            fake.called.clear()
            await fake.called.wait()

    await asyncio.wait_for(reached(), EVENTUALLY)


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
async def test_a_duration_that_is_not_positive_is_refused(
    router: tuple[FakeRouter, RouterClient], value: float
) -> None:
    # Before: 0 travelled as "the router's default" (the proto's unset value); a load's
    # deadline was then 5 s while the router waited its whole wait_ready_sec.
    fake, client = router
    fake.models = {"chat": make_model("chat")}
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        await client.load("chat", timeout=value)
    with pytest.raises(ValueError, match="drain_timeout must be a positive number"):
        await client.unload("chat", drain_timeout=value)
    assert fake.calls == []
