"""The router's server interceptors for tracing, on a real grpc.aio server: a call that ends
early records its status on the span, however the cancellation reaches the handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from clients import (
    Chunk,
    DeadlineExceededError,
    InvalidRequestError,
    RouterClient,
    UnavailableError,
)
from router.errors import InvalidRequest, Unavailable
from router.interceptors import CancelledCallInterceptor, ErrorInterceptor
from router.v1 import inference_service_pb2
from tests.clients.fake_router import FakeRouter, chunk, serve_fake_router

CANCELLED = grpc.StatusCode.CANCELLED.value[0]
BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


class EndlessRouter(FakeRouter):
    """Generate streams chunks without pause: the handler spends its time at `yield`, where a
    cancellation does not reach it as CancelledError."""

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        while True:
            yield chunk('{"id":"c"}', text="x" * 64)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def serve_traced(fake: FakeRouter, exporter: InMemorySpanExporter) -> Any:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    interceptors = [aio_server_interceptor(tracer_provider=provider), CancelledCallInterceptor()]
    return serve_fake_router(fake, interceptors=interceptors)


async def status_code_of(exporter: InMemorySpanExporter, method: str) -> object:
    for _ in range(100):
        spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
        for span in spans:
            if span.name.endswith(method) and span.attributes is not None:
                return span.attributes["rpc.grpc.status_code"]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {method} span")


async def test_a_stream_cancelled_while_its_handler_waits(exporter: InMemorySpanExporter) -> None:
    fake = FakeRouter()
    fake.generate_events = [chunk('{"id":"c"}')]
    fake.hold_streams_open = True
    async with serve_traced(fake, exporter) as (_, target), RouterClient(target) as client:
        events = client.generate("chat", BODY)
        await anext(events)
        await events.aclose()

        assert await status_code_of(exporter, "Generate") == CANCELLED


async def test_a_stream_cancelled_while_its_response_is_written(
    exporter: InMemorySpanExporter,
) -> None:
    async with (
        serve_traced(EndlessRouter(), exporter) as (_, target),
        RouterClient(target) as client,
    ):
        events = client.generate("chat", BODY)
        assert isinstance(await anext(events), Chunk)
        await events.aclose()

        assert await status_code_of(exporter, "Generate") == CANCELLED


async def test_a_unary_call_cancelled_and_one_past_its_deadline(
    exporter: InMemorySpanExporter,
) -> None:
    fake = FakeRouter()
    fake.delay = 30
    async with serve_traced(fake, exporter) as (_, target), RouterClient(target) as client:
        call = asyncio.create_task(client.embed("embed", ["hello"]))
        await asyncio.wait_for(fake.called.wait(), timeout=1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await status_code_of(exporter, "Embed") == CANCELLED

        exporter.clear()
        with pytest.raises(DeadlineExceededError):
            await client.list_models(timeout=0.1)
        assert (
            await status_code_of(exporter, "ListModels")
            == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        )


GENERATE_ERROR = "'max_tokens' must be a positive integer"
EMBED_ERROR = "model 'embed' failed to load"


class FailingRouter(FakeRouter):
    """Generate and Embed fail the way the router's engine does: by raising its domain errors,
    which the router's ErrorInterceptor maps to statuses."""

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        yield chunk('{"id":"c"}', text="x")
        raise InvalidRequest(GENERATE_ERROR)

    async def Embed(
        self, request: inference_service_pb2.EmbedRequest, context: Any
    ) -> inference_service_pb2.EmbedResponse:
        raise Unavailable(EMBED_ERROR, retry_after=1.0)


async def finished_span(exporter: InMemorySpanExporter, method: str) -> ReadableSpan:
    for _ in range(100):
        for span in exporter.get_finished_spans():
            if span.name.endswith(method):
                return span
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {method} span")


async def test_a_router_error_is_recorded_once_with_its_status(
    exporter: InMemorySpanExporter,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    interceptors = [
        aio_server_interceptor(tracer_provider=provider),
        CancelledCallInterceptor(),
        ErrorInterceptor(),
    ]
    async with (
        serve_fake_router(FailingRouter(), interceptors=interceptors) as (_, target),
        RouterClient(target) as client,
    ):
        with pytest.raises(InvalidRequestError) as invalid:
            [event async for event in client.generate("chat", BODY)]
        with pytest.raises(UnavailableError) as unavailable:
            await client.embed("embed", ["hello"])
        # The caller's status is whole: code, message, ErrorInfo and RetryInfo details.
        assert str(invalid.value) == GENERATE_ERROR and invalid.value.reason == "INVALID_REQUEST"
        assert unavailable.value.reason == "LOAD_FAILED" and unavailable.value.retry_after == 1

        # OpenTelemetry's convention: a server span is an error for the server's own failures
        # (UNAVAILABLE), not for the caller's (INVALID_ARGUMENT).
        for method, code, status, error, message in (
            ("Generate", grpc.StatusCode.INVALID_ARGUMENT, StatusCode.UNSET, InvalidRequest,
             GENERATE_ERROR),
            ("Embed", grpc.StatusCode.UNAVAILABLE, StatusCode.ERROR, Unavailable, EMBED_ERROR),
        ):  # fmt: skip
            span = await finished_span(exporter, method)
            assert span.attributes is not None
            assert span.attributes["rpc.grpc.status_code"] == code.value[0], method
            assert span.status.status_code is status, method
            exceptions = [event for event in span.events if event.name == "exception"]
            assert len(exceptions) == 1, (method, [e.attributes for e in exceptions])
            recorded = exceptions[0].attributes or {}
            assert recorded["exception.type"] == f"router.errors.{error.__name__}"
            assert recorded["exception.message"] == message
