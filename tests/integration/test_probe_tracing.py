"""/health probes stay out of traces: a request that loads its model is traced with its
upstream call, not with the readiness polls of the load or the liveness probes after it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from clients import End, RouterClient
from tests.e2e.test_observability import Span, otlp_receiver
from tests.helpers import chat_model, fake_server, free_port, router_process, write_config

CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-b7ad6b7169203331-01"
PROMPT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}


def url_of(span: Span) -> str:
    return str(span.attribute("http.url") or span.attribute("url.full") or "")


def test_a_traced_request_has_no_health_probe_spans(tmp_path: Path, tiny_chat: Path) -> None:
    port = free_port()
    with otlp_receiver() as (receiver, otlp_port):
        config = write_config(
            tmp_path,
            {"chat": chat_model(tiny_chat)},
            grpc_port=port,
            # A load of 0.3 s: its readiness polls see 503 first (error spans, when traced).
            system={
                "llama_server_path": fake_server(tmp_path, "--load-delay 0.3"),
                "probe_interval_sec": 0.1,
            },
            telemetry={"otlp_endpoint": f"http://127.0.0.1:{otlp_port}"},
        )
        with router_process(config, port):

            async def generate() -> None:
                async with RouterClient(f"127.0.0.1:{port}") as client:
                    events = [
                        e
                        async for e in client.generate(
                            "chat", PROMPT, metadata=(("traceparent", TRACEPARENT),)
                        )
                    ]
                    assert isinstance(events[-1], End)
                    await asyncio.sleep(1.0)  # liveness probes run every 0.1 s meanwhile

            asyncio.run(generate())
            receiver.wait_for(
                lambda spans: any(
                    s.trace_id == CALLER_TRACE_ID and url_of(s).endswith("/completions")
                    for s in spans
                )
            )
            time.sleep(1.0)  # spans are exported in batches every 0.5 s
    spans = receiver.spans()
    traced = [s for s in spans if s.trace_id == CALLER_TRACE_ID]
    assert any(url_of(s).endswith("/chat/completions") for s in traced)  # tracing is on
    probes = [(s.trace_id, s.span.name, url_of(s)) for s in spans if url_of(s).endswith("/health")]
    assert probes == []
