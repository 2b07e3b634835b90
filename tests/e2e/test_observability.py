"""Observability across real processes: one trace per request through facade, router and
llama-server, exported over OTLP to a receiver run here; the facade's combined /metrics."""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.stack import Stack, facade_process, get_json
from tests.helpers import chat_model, free_port, router_process, write_config

PROMTOOL = str(Path(sys.executable).parent / "promtool")
GENERATE = "/router.v1.InferenceService/Generate"
COMPLETE = "/router.v1.InferenceService/Complete"  # non-streamed requests
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}
CANCELLED = grpc.StatusCode.CANCELLED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class Span:
    service: str
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    def attribute(self, key: str) -> Any:
        for attribute in self.span.attributes:
            if attribute.key == key:
                return _value(attribute.value)
        return None


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                _value(a.value)
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                received += [Span(service, span) for span in scope_spans.spans]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, found: Callable[[list[Span]], Any], timeout: float = 10) -> Any:
        """Poll until `found(spans)` is truthy; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = found(self.spans())
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"spans not received within {timeout} s: {self.summary()}")

    def summary(self) -> list[tuple[str, str, str]]:
        return [(s.service, s.span.name, s.trace_id) for s in self.spans()]


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(None)


@dataclass(frozen=True)
class Observed:
    stack: Stack
    receiver: Receiver


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path) -> Iterator[Observed]:
    directory = tmp_path_factory.mktemp("observability")
    grpc_port, http_port = free_port(), free_port()
    with otlp_receiver() as (receiver, otlp_port):
        config = write_config(
            directory,
            # A context big enough for a generation that is still running when cancelled.
            {"chat": chat_model(tiny_chat, n_ctx=65536, parallel_override=1)},
            grpc_port=grpc_port,
            api={"port": http_port},
            telemetry={
                "otlp_endpoint": f"http://127.0.0.1:{otlp_port}",
                "metrics_port": free_port(),
            },
        )
        with router_process(config, grpc_port), facade_process(config, http_port):
            yield Observed(Stack(config, grpc_port, http_port), receiver)


def stream_chat(stack: Stack, **body: Any) -> bytes:
    """POST a streamed chat completion and read the whole answer."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=30)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**CHAT, **body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        connection.close()


def scrape(stack: Stack) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        connection.close()


def by_trace(spans: list[Span]) -> dict[str, list[Span]]:
    traces: dict[str, list[Span]] = collections.defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return traces


def is_upstream_call(span: Span) -> bool:
    return span.span.kind == CLIENT and str(span.attribute("http.url")).endswith("/completions")


def test_a_streamed_chat_is_one_trace_from_facade_to_llama_server(observed: Observed) -> None:
    answer = stream_chat(observed.stack, max_tokens=8)
    assert answer.endswith(b"data: [DONE]\n\n")

    def complete_trace(spans: list[Span]) -> dict[str, Span] | None:
        for trace in by_trace(spans).values():
            found = {
                "facade server": [s for s in trace if s.span.name == "POST /v1/chat/completions"],
                "facade client": [
                    s for s in trace if s.span.name == GENERATE and s.span.kind == CLIENT
                ],
                "router server": [
                    s for s in trace if s.span.name == GENERATE and s.span.kind == SERVER
                ],
                "upstream": [s for s in trace if is_upstream_call(s)],
            }
            if all(len(spans) == 1 for spans in found.values()):
                return {role: spans[0] for role, spans in found.items()}
        return None

    # One trace holds all four (the load the request started is shared work, in no trace).
    trace = observed.receiver.wait_for(complete_trace)

    facade_server, facade_client = trace["facade server"], trace["facade client"]
    router_server, upstream = trace["router server"], trace["upstream"]
    assert facade_server.service == facade_client.service == "routermodel-facade"
    assert router_server.service == upstream.service == "routermodel-router"
    assert facade_server.span.kind == SERVER
    assert not facade_server.span.parent_span_id  # the facade started the trace
    assert facade_client.span.parent_span_id == facade_server.span.span_id
    assert router_server.span.parent_span_id == facade_client.span.span_id
    assert upstream.span.parent_span_id == router_server.span.span_id
    for span in (facade_server, facade_client):
        assert span.attribute("routermodel.model") == "chat"
        assert span.attribute("routermodel.priority") == "normal"
    assert router_server.attribute("rpc.grpc.status_code") == 0
    assert router_server.attribute("routermodel.model") == "chat"
    assert router_server.attribute("routermodel.tokens_out") == 8
    assert router_server.attribute("routermodel.tokens_in") > 0
    assert router_server.attribute("routermodel.ttft_ms") > 0
    assert router_server.attribute("routermodel.queue_ms") >= 0
    assert router_server.attribute("routermodel.load_ms") >= 0
    assert router_server.attribute("routermodel.priority") == "normal"
    assert router_server.attribute("routermodel.finish_reason") == "length"  # max_tokens ran out
    assert [event.name for event in router_server.span.events] == []


def test_a_router_error_is_on_its_span_once_with_its_status(observed: Observed) -> None:
    # Longer than the context: the router refuses it (the facade does not know the context).
    connection = http.client.HTTPConnection("127.0.0.1", observed.stack.http_port, timeout=30)
    body = json.dumps({**CHAT, "max_tokens": 70000})
    headers = {"Content-Type": "application/json", "X-Request-Priority": "low"}
    connection.request("POST", "/v1/chat/completions", body, headers)
    assert connection.getresponse().status == 400
    connection.close()

    def refused(spans: list[Span]) -> Span | None:
        return next(
            (
                s
                for s in spans
                if s.span.name == COMPLETE
                and s.span.kind == SERVER
                and s.attribute("rpc.grpc.status_code") == INVALID_ARGUMENT
            ),
            None,
        )

    span = observed.receiver.wait_for(refused)
    assert span.attribute("routermodel.priority") == "low"
    assert span.attribute("routermodel.error_reason") == "INVALID_REQUEST"
    assert span.attribute("routermodel.finish_reason") is None
    # One exception event, the error itself (grpc's abort used to add two "Locally aborted.").
    events = [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.span.events]
    assert [name for name, _ in events] == ["exception"], events
    assert events[0][1]["exception.type"] == "router.errors.InvalidRequest"
    assert "70000" in events[0][1]["exception.message"]


def test_a_cancelled_request_frees_the_slot_and_its_router_span_says_cancelled(
    observed: Observed,
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", observed.stack.http_port, timeout=30)
    body = json.dumps({**CHAT, "max_tokens": 60000, "stream": True})
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")  # generating
    connection.close()

    def cancelled(spans: list[Span]) -> Span | None:
        return next(
            (
                s
                for s in spans
                if s.span.name == GENERATE
                and s.span.kind == SERVER
                and s.attribute("rpc.grpc.status_code") == CANCELLED
            ),
            None,
        )

    observed.receiver.wait_for(cancelled)

    def in_flight() -> int:
        _, status = get_json(observed.stack.base_url + "/v1/models/status/chat")
        return int(status["model"]["in_flight"])

    deadline = time.monotonic() + 5  # the generation left alone would take much longer
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight() == 0


def test_the_combined_exposition_passes_promtool_after_traffic(observed: Observed) -> None:
    stream_chat(observed.stack, max_tokens=4)

    text = scrape(observed.stack)

    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert [n for n, c in collections.Counter(families).items() if c > 1] == []
    assert "routermodel_requests_total" in families  # the router's
    assert "routermodel_facade_http_requests_total" in families  # the facade's
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unknown_alias_adds_no_series_and_no_queue(observed: Observed) -> None:
    stream_chat(observed.stack, max_tokens=2)  # every series of the route exists from here on
    before = series(scrape(observed.stack))

    for body in ({**CHAT, "model": "no-such-model"}, {**CHAT, "model": "other", "stream": True}):
        connection = http.client.HTTPConnection("127.0.0.1", observed.stack.http_port, timeout=10)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        assert connection.getresponse().status == 404
        connection.close()
    text = scrape(observed.stack)

    assert series(text) == before
    assert "no-such-model" not in text and 'model="other"' not in text
    _, stats = get_json(observed.stack.base_url + "/v1/queue/stats")
    assert set(stats["per_model"]) == {"chat"}


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
