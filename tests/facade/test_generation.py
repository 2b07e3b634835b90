"""Chat and text completions through the facade: exact SSE bytes, pass-through, cancellation."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web

from router.v1 import inference_service_pb2, model_pb2
from tests.clients.fake_router import (
    FakeRouter,
    chunk,
    end,
    loading,
    queued,
    rich_status,
)
from tests.facade.conftest import Facade, MakeFacade

CHUNK_1 = (
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    '"created":1,"id":"chatcmpl-1","model":"chat","object":"chat.completion.chunk"}'
)
CHUNK_2 = (
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" hello"}}],'
    '"created":1,"id":"chatcmpl-1","model":"chat","object":"chat.completion.chunk"}'
)
CHUNK_3 = (
    '{"choices":[{"finish_reason":"stop","index":0,"delta":{}}],'
    '"created":1,"id":"chatcmpl-1","model":"chat","object":"chat.completion.chunk"}'
)
RESPONSE = (
    '{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    '"content":" one small"}}],"created":1,"model":"chat","object":"chat.completion",'
    '"usage":{"completion_tokens":2,"prompt_tokens":5,"total_tokens":7},"id":"chatcmpl-2"}'
)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class PacedRouter(FakeRouter):
    """Yields `generate_events`, sleeping `pauses[i]` seconds before event i."""

    def __init__(self, pauses: list[float]) -> None:
        super().__init__()
        self.pauses = pauses

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        with self._noting_cancel("Generate"):
            await self._start("Generate", request, context)
            for pause, event in zip(self.pauses, self.generate_events, strict=True):
                await asyncio.sleep(pause)
                yield event


def error_frame(message: str, error_type: str, code: str | None) -> bytes:
    error = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"


# Streaming


async def test_a_stream_is_the_chunks_as_data_frames_then_done(facade: Facade) -> None:
    facade.fake.generate_events = [
        queued(1, 1),
        loading(model_pb2.LOAD_STAGE_READY, 0.1),
        chunk(CHUNK_1, CHUNK_2, text=" hello"),
        chunk(CHUNK_3),
        end("stop"),
    ]

    response = await facade.http.post("/v1/chat/completions", json=STREAM)

    assert response.status == 200
    assert {key: response.headers[key] for key in SSE_HEADERS} == SSE_HEADERS
    assert await response.read() == (
        f"data: {CHUNK_1}\n\ndata: {CHUNK_2}\n\ndata: {CHUNK_3}\n\ndata: [DONE]\n\n".encode()
    )


async def test_each_grpc_message_is_one_write(
    facade: Facade, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    original = web.StreamResponse.write

    async def recording_write(self: web.StreamResponse, data: bytes) -> None:
        writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", recording_write)
    facade.fake.generate_events = [chunk(CHUNK_1, CHUNK_2), chunk(CHUNK_3), end()]

    response = await facade.http.post("/v1/chat/completions", json=STREAM)
    await response.read()

    assert writes == [
        f"data: {CHUNK_1}\n\ndata: {CHUNK_2}\n\n".encode(),
        f"data: {CHUNK_3}\n\n".encode(),
    ]


async def test_keep_alive_comments_while_queued_and_loading(make_facade: MakeFacade) -> None:
    fake = PacedRouter([0, 0.25, 0.25, 0])
    fake.generate_events = [
        queued(1, 1),
        loading(model_pb2.LOAD_STAGE_SPAWNING, 0),
        chunk(CHUNK_2),
        end(),
    ]
    facade = await make_facade(fake, keepalive_sec=0.1)

    response = await facade.http.post("/v1/chat/completions", json=STREAM)
    body = await response.read()

    assert response.status == 200
    assert re.fullmatch(
        rb"(: keep-alive\n\n)+data: " + re.escape(CHUNK_2.encode()) + rb"\n\ndata: \[DONE\]\n\n",
        body,
    ), body


async def test_keep_alive_comments_fill_an_idle_gap(make_facade: MakeFacade) -> None:
    fake = PacedRouter([0, 0.35, 0])
    fake.generate_events = [chunk(CHUNK_1), chunk(CHUNK_2), end()]
    facade = await make_facade(fake, keepalive_sec=0.1)

    body = await (await facade.http.post("/v1/chat/completions", json=STREAM)).read()

    first, _, rest = body.partition(b"\n\n")
    assert first == f"data: {CHUNK_1}".encode()
    assert re.fullmatch(
        rb"(: keep-alive\n\n)+data: " + re.escape(CHUNK_2.encode()) + rb"\n\ndata: \[DONE\]\n\n",
        rest,
    ), rest


async def test_a_failure_while_waiting_keeps_its_http_status(facade: Facade) -> None:
    # The headers wait for the first chunk (or a keep-alive), so an early failure is a real 503.
    facade.fake.generate_events = [queued(1, 1), loading(model_pb2.LOAD_STAGE_SPAWNING, 0)]
    facade.fake.errors["Generate"] = rich_status(
        grpc.StatusCode.UNAVAILABLE,
        "model 'chat' failed to load",
        reason="LOAD_FAILED",
        retry_after=30,
    )

    response = await facade.http.post("/v1/chat/completions", json=STREAM)

    assert response.status == 503
    assert response.headers["Retry-After"] == "30"
    assert (await response.json())["error"]["code"] == "load_failed"


async def test_a_mid_stream_failure_is_an_error_frame_then_done(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(CHUNK_1)]
    facade.fake.errors["Generate"] = rich_status(
        grpc.StatusCode.UNAVAILABLE, "model 'chat' crashed", reason="MODEL_CRASHED", retry_after=1
    )

    response = await facade.http.post("/v1/chat/completions", json=STREAM)

    assert response.status == 200
    assert await response.read() == (
        f"data: {CHUNK_1}\n\n".encode()
        + error_frame("model 'chat' crashed", "server_error", "model_crashed")
        + b"data: [DONE]\n\n"
    )


async def test_completions_stream_the_same_way(facade: Facade) -> None:
    text_chunk = '{"choices":[{"text":" i","index":0,"logprobs":null,"finish_reason":null}]}'
    facade.fake.generate_events = [chunk(text_chunk), end("length")]

    response = await facade.http.post(
        "/v1/completions", json={"model": "chat", "prompt": "hello", "stream": True}
    )

    assert await response.read() == f"data: {text_chunk}\n\ndata: [DONE]\n\n".encode()
    request = facade.fake.calls[0].request
    assert isinstance(request, inference_service_pb2.GenerateRequest)
    assert request.kind == inference_service_pb2.GENERATE_KIND_COMPLETION


# Non-streamed


async def test_a_non_streamed_answer_is_the_upstream_body_verbatim(facade: Facade) -> None:
    facade.fake.generate_events = [queued(1, 1), chunk(RESPONSE, text=" one small"), end("length")]

    response = await facade.http.post("/v1/chat/completions", json=CHAT)

    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.text() == RESPONSE


async def test_an_empty_answer_from_the_router_is_a_500_not_an_empty_200(facade: Facade) -> None:
    facade.fake.responses["Complete"] = inference_service_pb2.CompleteResponse()

    response = await facade.http.post("/v1/chat/completions", json=CHAT)

    assert response.status == 500
    assert (await response.json())["error"]["message"] == "internal server error"


async def test_the_body_reaches_the_router_unchanged(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(RESPONSE), end()]
    body = (
        '{ "model" : "chat", "messages": [{"role": "user", "content": "weather?"}],\n'
        '  "tools": [{"type": "function",\n'
        '             "function": {"name": "get_weather", "parameters": {}}}],\n'
        '  "response_format": {"type": "json_object"}, "logprobs": true, "top_logprobs": 2,\n'
        '  "stop": ["\\n"], "seed": 7, "temperature": 0.0, "unknown_extension": [1, 2.50] }'
    )

    response = await facade.http.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )

    assert response.status == 200
    request = facade.fake.calls[0].request
    assert isinstance(request, inference_service_pb2.CompleteRequest)
    assert request.body == body
    assert request.model == "chat"
    assert request.kind == inference_service_pb2.GENERATE_KIND_CHAT


# Validation: nothing reaches the router


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/chat/completions", "{not json", None, "not valid JSON"),
        ("/v1/chat/completions", "[1, 2]", None, "must be a JSON object"),
        ("/v1/chat/completions", '"text"', None, "must be a JSON object"),
        ("/v1/chat/completions", '{"messages": [{"role": "user"}]}', "model", "model"),
        ("/v1/chat/completions", '{"model": 7, "messages": [{}]}', "model", "string"),
        ("/v1/chat/completions", '{"model": "", "messages": [{}]}', "model", "model"),
        ("/v1/chat/completions", '{"model": "chat", "messages": []}', "messages", "non-empty"),
        ("/v1/chat/completions", '{"model": "chat"}', "messages", "non-empty"),
        ("/v1/chat/completions", '{"model": "chat", "messages": ["hi"]}', "messages", "object"),
        (
            "/v1/chat/completions",
            '{"model": "chat", "messages": [{}], "stream": "yes"}',
            "stream",
            "boolean",
        ),
        # Shapes llama-server answers with a 500 rather than a 400.
        ("/v1/chat/completions", '{"model": "chat", "messages": [{"content": "hi"}]}',
         "messages", "role"),
        ("/v1/chat/completions", '{"model": "chat", "messages": [{"role": 1}]}',
         "messages", "role"),
        ("/v1/chat/completions", '{"model": "chat", "messages": [{"role": "user", "name": []}]}',
         "messages", "'name'"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "tool", "tool_call_id": null}]}',
         "messages", "'tool_call_id'"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
         "messages", "'text'"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "user", "content": ["hi"]}]}',
         "messages", "object"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "assistant", "tool_calls": [{}]}]}',
         "messages", "'function'"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "assistant", "tool_calls": [{"type": '
         '"function", "function": {"name": "f"}}]}]}', "messages", "arguments"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "assistant", "tool_calls": "x"}]}',
         "messages", "array"),
        ("/v1/chat/completions", '{"model": "chat", "messages": [{"role": "user"}], "tools": "x"}',
         "tools", "array"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "user"}], "tools": [{"type": "function"}]}',
         "tools", "name"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "user"}], "tools": [{"type": "x", '
         '"function": {"name": "f"}}]}', "tools", "'function'"),
        ("/v1/chat/completions",
         '{"model": "chat", "messages": [{"role": "user"}], "tools": [{"type": "function", '
         '"function": {"name": "f", "description": null}}]}', "tools", "'description'"),
        ("/v1/completions", '{"model": "chat"}', "prompt", "prompt"),
        ("/v1/completions",
         '{"model": "chat", "prompt": "hi", "grammar": "root ::= \\"a\\"", "json_schema": {}}',
         "grammar", "not both"),
        ("/v1/completions", '{"model": "chat", "prompt": null}', "prompt", "prompt"),
        ("/v1/completions", '{"prompt": "hi"}', "model", "model"),
    ],
)  # fmt: skip
async def test_invalid_bodies_are_400_before_any_call(
    facade: Facade, path: str, body: str, param: str | None, message: str
) -> None:
    response = await facade.http.post(path, data=body)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] is None
    assert message in error["message"]
    assert facade.fake.calls == []


async def test_a_body_that_is_not_utf8_is_400(facade: Facade) -> None:
    response = await facade.http.post("/v1/chat/completions", data=b'{"model": "\xff"}')

    assert response.status == 400
    assert "UTF-8" in (await response.json())["error"]["message"]


# Headers


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("high", inference_service_pb2.PRIORITY_HIGH),
        ("LOW", inference_service_pb2.PRIORITY_LOW),
        (" Normal ", inference_service_pb2.PRIORITY_NORMAL),
        (None, inference_service_pb2.PRIORITY_NORMAL),
    ],
)
async def test_the_priority_header_sets_the_priority(
    facade: Facade, header: str | None, expected: int
) -> None:
    facade.fake.generate_events = [chunk(RESPONSE), end()]
    headers = {} if header is None else {"X-Request-Priority": header}

    response = await facade.http.post("/v1/chat/completions", json=CHAT, headers=headers)

    assert response.status == 200
    request = facade.fake.calls[0].request
    assert isinstance(request, inference_service_pb2.CompleteRequest)
    assert request.priority == expected


@pytest.mark.parametrize("header", ["urgent", "", "1"])
async def test_any_other_priority_is_400(facade: Facade, header: str) -> None:
    response = await facade.http.post(
        "/v1/chat/completions", json=CHAT, headers={"X-Request-Priority": header}
    )

    assert response.status == 400
    assert "X-Request-Priority" in (await response.json())["error"]["message"]
    assert facade.fake.calls == []


async def test_a_valid_request_id_is_echoed_and_sent_to_the_router(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(CHUNK_1), end()]

    response = await facade.http.post(
        "/v1/chat/completions", json=STREAM, headers={"X-Request-ID": "req-42/abc"}
    )
    await response.read()

    assert response.headers["X-Request-ID"] == "req-42/abc"
    call = facade.fake.calls[0]
    assert isinstance(call.request, inference_service_pb2.GenerateRequest)
    assert call.request.request_id == "req-42/abc"
    assert call.header("x-request-id") == ["req-42/abc"]


@pytest.mark.parametrize("given", ["x" * 129, "has space", "tab\there", "é"])
async def test_an_invalid_request_id_is_replaced(facade: Facade, given: str) -> None:
    facade.fake.generate_events = [chunk(RESPONSE), end()]

    response = await facade.http.post(
        "/v1/chat/completions", json=CHAT, headers={"X-Request-ID": given}
    )

    generated = response.headers["X-Request-ID"]
    assert re.fullmatch("[0-9a-f]{32}", generated)
    assert facade.fake.calls[0].header("x-request-id") == [generated]


async def test_errors_carry_a_request_id_too(facade: Facade) -> None:
    response = await facade.http.get("/nowhere", headers={"X-Request-ID": "abc"})

    assert response.status == 404
    assert response.headers["X-Request-ID"] == "abc"


async def test_the_callers_authorization_is_forwarded(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(RESPONSE), end()]

    await facade.http.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-caller"}
    )
    await facade.http.post("/v1/chat/completions", json=CHAT)

    assert facade.fake.calls[0].header("authorization") == ["Bearer sk-caller"]
    assert facade.fake.calls[1].header("authorization") == []


async def test_an_x_api_key_is_forwarded_too(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(RESPONSE), end()]

    await facade.http.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "sk-caller"})

    assert facade.fake.calls[0].header("x-api-key") == ["sk-caller"]
    assert facade.fake.calls[0].header("authorization") == []


# Cancellation and shutdown


async def test_a_client_leaving_a_stream_cancels_the_call(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(CHUNK_1)]
    facade.fake.hold_streams_open = True

    response = await facade.http.post("/v1/chat/completions", json=STREAM)
    assert await response.content.readuntil(b"\n\n") == f"data: {CHUNK_1}\n\n".encode()
    response.close()

    await asyncio.wait_for(facade.fake.cancelled.wait(), timeout=1)
    assert facade.fake.cancelled_methods == ["Generate"]


async def test_a_client_leaving_while_queued_cancels_the_call(facade: Facade) -> None:
    facade.fake.generate_events = [queued(3, 3)]
    facade.fake.hold_streams_open = True

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(facade.http.post("/v1/chat/completions", json=CHAT), 0.3)

    await asyncio.wait_for(facade.fake.cancelled.wait(), timeout=1)
    assert facade.fake.cancelled_methods == ["Complete"]  # a non-streamed request's one call


async def test_shutdown_ends_open_streams_with_an_error_frame(facade: Facade) -> None:
    facade.fake.generate_events = [chunk(CHUNK_1)]
    facade.fake.hold_streams_open = True
    response = await facade.http.post("/v1/chat/completions", json=STREAM)
    await response.content.readuntil(b"\n\n")

    await facade.http.app.shutdown()

    rest = await asyncio.wait_for(response.read(), timeout=2)
    assert rest == error_frame("the server is shutting down", "server_error", None) + (
        b"data: [DONE]\n\n"
    )
    await asyncio.wait_for(facade.fake.cancelled.wait(), timeout=1)
