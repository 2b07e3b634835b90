"""Tracing and log context in the facade: spans, context into gRPC metadata, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pytest_aiohttp import AiohttpClient

from facade.app import create_app
from router import logs
from tests.clients.fake_router import FakeRouter, chunk, end, rich_status, serve_fake_router
from tests.helpers import chat_model, embed_model, settings_for, wait_until

CHUNK = '{"id":"c1","object":"chat.completion.chunk","choices":[]}'
STREAM = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
# A W3C traceparent a caller could send: version, trace id, parent span id, sampled.
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@dataclass
class TracedFacade:
    http: TestClient[Any, Any]
    fake: FakeRouter
    exporter: InMemorySpanExporter

    def spans(self, kind: SpanKind) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.kind is kind]


@pytest.fixture
async def traced(aiohttp_client: AiohttpClient, tmp_path: Path) -> AsyncIterator[TracedFacade]:
    """A traced facade that opens its own (instrumented) client to a fake router."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with serve_fake_router() as (fake, target):
        port = int(target.rsplit(":", 1)[1])
        models = {
            "chat": chat_model(tmp_path / "c.gguf"),
            "embed": embed_model(tmp_path / "e.gguf"),
        }
        settings = settings_for(tmp_path, models, grpc_port=port)
        http = await aiohttp_client(create_app(settings, tracer_provider=provider))
        yield TracedFacade(http, fake, exporter)
    provider.shutdown()


async def test_a_request_is_one_trace_carried_to_the_router(traced: TracedFacade) -> None:
    traced.fake.generate_events = [chunk(CHUNK), end()]

    response = await traced.http.post(
        "/v1/chat/completions", json=STREAM, headers={"X-Request-Priority": "high"}
    )
    await response.read()
    # The server span ends when the handler returns, which may be just after the body's end
    # reached the client.
    await wait_until(
        lambda: len(traced.spans(SpanKind.CLIENT)) == len(traced.spans(SpanKind.SERVER)) == 1, 2
    )

    (server,) = traced.spans(SpanKind.SERVER)
    (client,) = traced.spans(SpanKind.CLIENT)
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes is not None and server.attributes["http.status_code"] == 200
    assert client.name == "/router.v1.InferenceService/Generate"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    for span in (server, client):
        assert span.attributes is not None
        assert span.attributes["routermodel.model"] == "chat"
        assert span.attributes["routermodel.priority"] == "high"
    (traceparent,) = traced.fake.calls[0].header("traceparent")
    assert isinstance(traceparent, str)
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert trace_id == format(server.context.trace_id, "032x")
    assert parent_id == format(client.context.span_id, "016x")


async def test_an_incoming_traceparent_continues_its_trace(traced: TracedFacade) -> None:
    response = await traced.http.get("/v1/models", headers={"traceparent": TRACEPARENT})
    assert response.status == 200

    (server,) = traced.spans(SpanKind.SERVER)
    assert format(server.context.trace_id, "032x") == TRACE_ID


async def test_errors_are_recorded_with_their_grpc_status(traced: TracedFacade) -> None:
    traced.fake.errors["Complete"] = rich_status(
        grpc.StatusCode.UNAVAILABLE, "the model crashed", reason="MODEL_CRASHED"
    )

    response = await traced.http.post("/v1/chat/completions", json={**STREAM, "stream": False})
    assert response.status == 503
    await wait_until(lambda: len(traced.spans(SpanKind.CLIENT)) == 1, 2)

    (server,) = traced.spans(SpanKind.SERVER)
    (client,) = traced.spans(SpanKind.CLIENT)
    assert server.status.status_code is StatusCode.ERROR
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes is not None
    assert client.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


# opentelemetry-python-contrib#3271 reports aio client interceptors swallowing CancelledError,
# which would leave the router's slot busy after the client left.


async def test_leaving_a_stream_still_cancels_the_router_call(traced: TracedFacade) -> None:
    traced.fake.generate_events = [chunk(CHUNK)]
    traced.fake.hold_streams_open = True

    response = await traced.http.post("/v1/chat/completions", json=STREAM)
    await response.content.readuntil(b"\n\n")
    response.close()

    await asyncio.wait_for(traced.fake.cancelled.wait(), timeout=1)
    assert traced.fake.cancelled_methods == ["Generate"]


async def test_leaving_an_embedding_request_still_cancels_the_router_call(
    traced: TracedFacade,
) -> None:
    traced.fake.delay = 30  # the router is slow to answer
    body = {"model": "embed", "input": "hello"}

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(traced.http.post("/v1/embeddings", json=body), 0.3)

    await asyncio.wait_for(traced.fake.cancelled.wait(), timeout=1)
    assert traced.fake.cancelled_methods == ["Embed"]


# Log context


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The root logger as `setup_logging(structured=True)` makes it, writing to a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.setup_logging(structured=True)
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        root.handlers[:], root.level = saved


async def test_log_lines_carry_the_request_id_and_trace_id(traced: TracedFacade) -> None:
    traced.fake.errors["Complete"] = rich_status(grpc.StatusCode.DATA_LOSS, "router bug")

    with json_logs() as buffer:
        response = await traced.http.post(
            "/v1/chat/completions",
            json={**STREAM, "stream": False},
            headers={"X-Request-ID": "req-42", "traceparent": TRACEPARENT},
        )
        assert response.status == 500

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    failure = next(line for line in lines if line["logger"] == "facade.errors")
    assert failure["request_id"] == "req-42"
    assert failure["trace_id"] == TRACE_ID
