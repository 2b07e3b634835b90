"""Router telemetry: every metric fed, bounded labels, promtool, summary, status file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from clients import Chunk, End, GenerateEvent, ModelNotFoundError, RateLimitError, RouterClient
from clients.errors import DeadlineExceededError, UnavailableError, WrongModelKindError
from facade.app import create_app
from router.server import Router
from router.v1 import model_control_service_pb2 as mpb
from tests.e2e.test_observability import otlp_receiver
from tests.helpers import (
    REPO,
    chat_model,
    embed_model,
    fake_server,
    free_port,
    router_process,
    running_router,
    settings_for,
    wait_until,
    write_config,
)

PROMPT = {"messages": [{"role": "user", "content": "hello world"}], "temperature": 0}
PROMTOOL = str(Path(sys.executable).parent / "promtool")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(router: Router) -> str:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{router.metrics_port}/metrics"
        async with session.get(url) as response:
            assert response.status == 200
            return await response.text()


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def run(client: RouterClient, model: str, **body: Any) -> list[GenerateEvent]:
    return [e async for e in client.generate(model, {**PROMPT, **body})]


def telemetry_models(tiny_chat: Path, tiny_embed: Path) -> dict[str, Any]:
    return {
        "chat": chat_model(tiny_chat, n_ctx=65536, parallel_override=1),
        "spare": chat_model(tiny_chat),
        "brief": {**chat_model(tiny_chat), "ttl_sec": 0.2},
        "embed": embed_model(tiny_embed),
    }


async def drive_traffic(router: Router, client: RouterClient) -> list[Samples]:
    """Exercise every path that feeds a metric; return scrapes taken along the way."""
    scrapes = [samples(await scrape(router))]
    # Long enough to arrive in several reads even on a busy machine: a stream read all at once
    # has no measurable gap between tokens, and the inter-token histogram skips it. (256
    # tokens, ~0.4 s, once came in one read with the whole suite running on 2 cores.)
    await run(client, "chat", max_tokens=1024, stream=True)
    await run(client, "chat", max_tokens=8)
    completion = {"prompt": "hello world", "max_tokens": 8}
    [_ async for _ in client.generate("chat", completion, kind="completion")]
    await client.embed("embed", ["hello world", "the cat"])
    with pytest.raises(WrongModelKindError):
        await run(client, "embed", max_tokens=2)
    # A long generation holds the only slot; one waits; the next is refused.
    long = asyncio.create_task(run(client, "chat", max_tokens=60000, stream=True))
    supervisor = router.pool.get("chat")
    await wait_until(lambda: supervisor.in_flight == 1, 5)
    waiting = asyncio.create_task(run(client, "chat", max_tokens=2))
    await wait_until(lambda: supervisor.queue.waiting == 1, 5)
    scrapes.append(samples(await scrape(router)))  # in flight and queued right now
    with pytest.raises(RateLimitError):
        await run(client, "chat", max_tokens=2)
    # Kill the child under the running request: a crash, then a restart for the waiter.
    assert supervisor.child is not None
    os.kill(supervisor.child.pid, signal.SIGKILL)
    with pytest.raises(UnavailableError):
        await long
    await waiting
    # Three chat models with room for two: the least recently used one is evicted.
    await run(client, "brief", max_tokens=2)
    await wait_until(lambda: router.pool.get("brief").state.value == "stopped", 5)  # idle TTL
    await run(client, "spare", max_tokens=2)
    await run(client, "brief", max_tokens=2)
    scrapes.append(samples(await scrape(router)))
    return scrapes


# Every family the router defines (router/telemetry/metrics.py), named so a family dropped from the
# exposition fails here rather than quietly leaving the "all fed" check with less to check.
ROUTER_FAMILIES = {
    "routermodel_requests": "counter",
    "routermodel_rejections": "counter",
    "routermodel_prompt_tokens": "counter",
    "routermodel_completion_tokens": "counter",
    "routermodel_queue_wait_seconds": "histogram",
    "routermodel_load_seconds": "histogram",
    "routermodel_time_to_first_token_seconds": "histogram",
    "routermodel_inter_token_seconds": "histogram",
    "routermodel_request_duration_seconds": "histogram",
    "routermodel_model_restarts": "counter",
    "routermodel_model_evictions": "counter",
    "routermodel_model_idle_unloads": "counter",
    "routermodel_model_crashes": "counter",
    "routermodel_model_state": "gauge",
    "routermodel_in_flight_requests": "gauge",
    "routermodel_queued_requests": "gauge",
    "routermodel_model_slots": "gauge",
    "routermodel_model_memory_bytes": "gauge",
    "routermodel_device_memory_used_bytes": "gauge",
    "routermodel_device_memory_free_bytes": "gauge",
}
# prometheus_client's process collector: constants such as the start time and the fd limit
# cannot move, and none of it is ours to feed.
PROCESS_PREFIX = "routermodel_router_process_"


def real_samples(scrape: Samples, family: str) -> Samples:
    """The samples of ``family`` that carry a measurement.

    ``<name>_created`` is the Unix time a series was created: nonzero from the start, so a
    check that accepted it would pass for a counter or histogram nobody ever fed.
    """
    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    names = {family + suffix for suffix in suffixes}
    return {key: value for key, value in scrape.items() if key[0] in names}


def moved_families(scrapes: list[Samples], families: set[str]) -> set[str]:
    """Families with a real sample that differs, in some later scrape, from the first scrape."""
    first = scrapes[0]
    moved = set()
    for family in families:
        for later in scrapes[1:]:
            current = real_samples(later, family)
            if any(value != first.get(key, 0.0) for key, value in current.items()):
                moved.add(family)
                break
    return moved


async def test_every_metric_family_is_fed(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = settings_for(
        tmp_path,
        telemetry_models(tiny_chat, tiny_embed),
        system={"max_concurrent_models": 3, "max_queue_size_per_model": 1},
        telemetry={"metrics_port": 0},
    )
    async with running_router(settings) as (router, client):
        scrapes = await drive_traffic(router, client)
        text = await scrape(router)
        defined = {
            family.name: family.type
            for family in router.metrics.registry.collect()
            if not family.name.startswith(PROCESS_PREFIX)
        }
    assert defined == ROUTER_FAMILIES
    exposed = {family.name for family in text_string_to_metric_families(text)}
    assert set(ROUTER_FAMILIES) <= exposed
    dead = sorted(set(ROUTER_FAMILIES) - moved_families(scrapes, set(ROUTER_FAMILIES)))
    assert dead == [], f"metric families never fed: {dead}"

    first, busy, last = scrapes[0], scrapes[1], scrapes[-1]

    def value(scrape: Samples, name: str, **labels: str) -> float:
        return scrape[(name, tuple(sorted(labels.items())))]

    # Counters of the traffic driven at "chat": one stream, one plain chat, one completion
    # before the busy scrape; tokens both ways.
    assert value(last, "routermodel_requests_total", model="chat", endpoint="chat", status="2xx")
    assert value(
        last, "routermodel_requests_total", model="chat", endpoint="completion", status="2xx"
    )
    assert value(
        last, "routermodel_requests_total", model="embed", endpoint="embeddings", status="2xx"
    )
    assert value(last, "routermodel_prompt_tokens_total", model="chat") > 0
    assert value(last, "routermodel_completion_tokens_total", model="chat") >= 256 + 8 + 8
    # Every histogram observed something for the model driven.
    for histogram, labels in (
        ("routermodel_queue_wait_seconds", {"model": "chat"}),
        ("routermodel_load_seconds", {"model": "chat"}),
        ("routermodel_time_to_first_token_seconds", {"model": "chat"}),
        ("routermodel_inter_token_seconds", {"model": "chat"}),
        ("routermodel_request_duration_seconds", {"model": "chat", "endpoint": "chat"}),
        ("routermodel_request_duration_seconds", {"model": "chat", "endpoint": "completion"}),
        ("routermodel_request_duration_seconds", {"model": "embed", "endpoint": "embeddings"}),
    ):
        assert value(last, histogram + "_count", **labels) > 0, (histogram, labels)
        assert value(last, histogram + "_sum", **labels) > 0, (histogram, labels)
    # Slots open to requests: none before anything loaded, the model's one while it serves.
    assert value(first, "routermodel_model_slots", model="chat") == 0
    assert value(busy, "routermodel_model_slots", model="chat") == 1
    # Model memory: estimated once placed, measured once running.
    assert value(first, "routermodel_model_memory_bytes", model="chat", kind="estimate") == 0
    assert value(busy, "routermodel_model_memory_bytes", model="chat", kind="estimate") > 0
    measured = [
        value(s, "routermodel_model_memory_bytes", model="chat", kind="measured") for s in scrapes
    ]
    assert max(measured) > 0
    # CPU mode: the host is the one device.
    assert value(last, "routermodel_device_memory_used_bytes", device="cpu") > 0
    assert value(last, "routermodel_device_memory_free_bytes", device="cpu") > 0

    assert (
        last[("routermodel_rejections_total", (("model", "chat"), ("reason", "queue_full")))] == 1
    )
    assert last[("routermodel_model_crashes_total", (("model", "chat"),))] == 1
    assert last[("routermodel_model_restarts_total", (("model", "chat"),))] == 1
    assert last[("routermodel_model_idle_unloads_total", (("model", "brief"),))] == 1
    # The embedding model was the least recently used of the three loaded.
    assert last[("routermodel_model_evictions_total", (("model", "embed"),))] == 1
    assert last[("routermodel_model_state", (("model", "embed"), ("state", "stopped")))] == 1
    assert last[("routermodel_model_state", (("model", "brief"), ("state", "ready")))] == 1
    in_flight = ("routermodel_in_flight_requests", (("model", "chat"),))
    assert busy[in_flight] == 1
    assert busy[("routermodel_queued_requests", (("model", "chat"),))] == 1


def test_created_samples_alone_do_not_count_as_fed() -> None:
    """The check above must not be satisfied by an untouched counter's ``_created`` sample."""
    untouched = samples(
        "# TYPE routermodel_x counter\n"
        'routermodel_x_total{model="a"} 0.0\n'
        'routermodel_x_created{model="a"} 1.7e9\n'
    )
    later = samples(
        "# TYPE routermodel_x counter\n"
        'routermodel_x_total{model="a"} 0.0\n'
        'routermodel_x_created{model="a"} 1.7e9\n'
        'routermodel_x_total{model="b"} 0.0\n'
        'routermodel_x_created{model="b"} 1.8e9\n'
    )
    assert moved_families([untouched, later], {"routermodel_x"}) == set()
    fed = {**later, ("routermodel_x_total", (("model", "a"),)): 1.0}
    assert moved_families([untouched, fed], {"routermodel_x"}) == {"routermodel_x"}


async def test_exposition_passes_promtool(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat)}, telemetry={"metrics_port": 0}
    )
    async with running_router(settings) as (router, client):
        await run(client, "chat", max_tokens=8, stream=True)
        text = await scrape(router)
    assert promtool_check(text) == ""


def promtool_check(text: str) -> str:
    """Problems promtool finds in an exposition ("" when none)."""
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


async def test_unknown_alias_adds_no_series_and_no_queue(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat)}, telemetry={"metrics_port": 0}
    )
    async with running_router(settings) as (router, client):
        before = await scrape(router)
        for _ in range(3):
            with pytest.raises(ModelNotFoundError):
                await run(client, "not-a-model", max_tokens=2)
            with pytest.raises(ModelNotFoundError):
                await client.embed("nope", ["x"])
        after = await scrape(router)
        stats = await client.control.GetQueueStats(mpb.GetQueueStatsRequest())
    assert "not-a-model" not in after and "nope" not in after
    assert set(samples(after)) == set(samples(before))
    assert set(stats.per_model) == {"chat"}


IDLE_TTL = 0.3
# Room for the idle timer's evict task to run on a busy 2-core machine; far below the time a
# scrape every SCRAPE_EVERY seconds would keep a timer that resets on scrapes from firing.
IDLE_MARGIN = 0.5
SCRAPE_EVERY = 0.02


async def read_everything(router: Router, client: RouterClient) -> None:
    """One round of every read-only view: the Prometheus scrape and the status RPCs."""
    await scrape(router)
    await client.control.ListModels(mpb.ListModelsRequest())
    await client.control.GetModel(mpb.GetModelRequest(model="chat"))
    await client.control.GetQueueStats(mpb.GetQueueStatsRequest())
    await client.control.GetResources(mpb.GetResourcesRequest())
    await client.control.GetTelemetrySummary(mpb.GetTelemetrySummaryRequest())


async def test_scrapes_never_load_or_keep_a_model_awake(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path,
        {"chat": {**chat_model(tiny_chat), "ttl_sec": IDLE_TTL}},
        telemetry={"metrics_port": 0},
    )
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("chat")
        await read_everything(router, client)
        assert supervisor.state.value == "stopped"
        await run(client, "chat", max_tokens=2)
        last_request = time.monotonic()
        # Scrape far more often than the TTL until the model leaves READY: a scrape that
        # re-armed the idle timer would keep it READY until the deadline below.
        deadline = last_request + IDLE_TTL + IDLE_MARGIN
        while supervisor.state.value == "ready" and time.monotonic() < deadline:
            await read_everything(router, client)
            await asyncio.sleep(SCRAPE_EVERY)
        left_ready = time.monotonic()
        assert supervisor.state.value != "ready", "scrapes kept the model awake"
    assert IDLE_TTL / 2 <= left_ready - last_request <= IDLE_TTL + IDLE_MARGIN


def assert_numbers(stats: dict[str, Any]) -> None:
    """Every field of a summary's stats is a JSON number (the seed sent "0.123s" strings)."""
    for name, number in stats.items():
        assert type(number) in (int, float), (name, number)


async def test_summary_counts_numbers_and_errors(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = settings_for(
        tmp_path,
        {"chat": chat_model(tiny_chat, n_ctx=65536), "embed": embed_model(tiny_embed)},
    )
    async with running_router(settings) as (router, client):
        for _ in range(3):
            await run(client, "chat", max_tokens=16, stream=True)
        with pytest.raises(WrongModelKindError):
            await run(client, "embed", max_tokens=2)
        supervisor = router.pool.get("chat")
        # A crash under a running request: 5xx.
        crashed = asyncio.create_task(run(client, "chat", max_tokens=60000, stream=True))
        await wait_until(lambda: supervisor.in_flight == 1, 5)
        assert supervisor.child is not None
        os.kill(supervisor.child.pid, signal.SIGKILL)
        with pytest.raises(UnavailableError):
            await crashed
        # A caller that leaves mid-generation: cancelled, not an error.
        cancelled = asyncio.create_task(run(client, "chat", max_tokens=60000, stream=True))
        await wait_until(lambda: supervisor.in_flight == 1, 10)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

        async def recorded() -> bool:
            reply = await client.control.GetTelemetrySummary(mpb.GetTelemetrySummaryRequest())
            return reply.total.requests == 6

        await wait_until(recorded, 5)
        summary = await client.control.GetTelemetrySummary(mpb.GetTelemetrySummaryRequest())
        # The same numbers over HTTP, through the facade's bridge route.
        app = create_app(settings, client=client)
        async with TestClient(TestServer(app, host="127.0.0.1")) as http:
            response = await http.get("/v1/telemetry/summary")
            assert response.status == 200
            body = await response.json()
    chat, embed, total = summary.per_model["chat"], summary.per_model["embed"], summary.total
    assert chat.requests == 5 and chat.completion_tokens >= 48
    assert chat.errors_4xx == 0 and chat.errors_5xx == 1 and chat.cancelled == 1
    assert chat.error_rate == pytest.approx(1 / 5)
    assert 0 < chat.ttft_p50_ms <= chat.latency_p50_ms <= chat.latency_p95_ms
    assert chat.tokens_per_second > 0
    assert embed.requests == 1 and embed.errors_4xx == 1 and embed.error_rate == 1.0
    assert total.requests == 6 and total.errors_4xx == 1 and total.errors_5xx == 1
    assert total.cancelled == 1 and total.error_rate == pytest.approx(2 / 6)

    assert type(body["window_sec"]) in (int, float) and body["window_sec"] > 0
    assert set(body["per_model"]) == {"chat", "embed"}
    for stats in (body["total"], *body["per_model"].values()):
        assert_numbers(stats)
    assert body["total"]["requests"] == 6
    assert body["total"]["errors_4xx"] == 1
    assert body["total"]["errors_5xx"] == 1
    assert body["total"]["cancelled"] == 1
    assert body["per_model"]["chat"]["errors_5xx"] == 1
    assert body["per_model"]["chat"]["cancelled"] == 1
    assert body["per_model"]["chat"]["latency_p95_ms"] == pytest.approx(chat.latency_p95_ms)
    assert body["total"]["error_rate"] == pytest.approx(2 / 6)


async def test_status_file_follows_every_change(tmp_path: Path, tiny_chat: Path) -> None:
    path = tmp_path / "status" / "model_status.json"
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat)}, telemetry={"model_status_path": str(path)}
    )

    def status() -> dict[str, Any]:
        return dict(json.loads(path.read_text()))

    async with running_router(settings) as (_, client):
        await wait_until(lambda: path.exists(), 2)
        assert status()["models"]["chat"]["status"] == "off"  # the seed's word
        assert status()["models"]["chat"]["state"] == "stopped"
        await client.load("chat")
        await wait_until(lambda: status()["models"]["chat"]["status"] == "ready", 2)
        assert status()["models"]["chat"]["port"]
        await client.unload("chat")
        await wait_until(lambda: status()["models"]["chat"]["status"] == "off", 2)
    assert status()["server"]["status"] == "shutting_down"
    assert not list(path.parent.glob(".*.tmp"))  # written by rename, nothing left behind


async def test_chunks_count_as_output_for_ttft(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with running_router(settings) as (_, client):
        events = await run(client, "chat", max_tokens=8, stream=True)
    chunks = [e for e in events if isinstance(e, Chunk)]
    end = events[-1]
    assert chunks and end.timing.ttft_ms > 0  # type: ignore[union-attr]
    assert end.timing.ttft_ms <= end.timing.total_ms  # type: ignore[union-attr]


# A caller's W3C trace context: the router continues this trace, so its id is known here.
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"


def test_json_logs_carry_request_and_trace_ids(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router process with STRUCTURED_LOGS, DEBUG and tracing on: the line a Generate logs
    names that call's request and trace; the cold load it started is shared work (other
    callers wait for it too, and its child outlives the call), so its lines name no request."""
    port = free_port()
    log = tmp_path / "router.log"
    monkeypatch.setenv("STRUCTURED_LOGS", "true")  # the seed's switch, inherited by the router
    monkeypatch.setenv("DEBUG", "true")  # one line per request
    with otlp_receiver() as (receiver, otlp_port):
        config = write_config(
            tmp_path,
            {"chat": chat_model(tiny_chat)},
            grpc_port=port,
            telemetry={"otlp_endpoint": f"http://127.0.0.1:{otlp_port}"},
        )
        with router_process(config, port, log=log):
            before = log.stat().st_size

            async def generate() -> None:
                async with RouterClient(f"127.0.0.1:{port}") as client:
                    metadata = (
                        ("x-request-id", "req-json-logs-1"),
                        ("traceparent", CALLER_TRACEPARENT),
                    )
                    events = await run_with(client, metadata)
                    assert isinstance(events[-1], End)

                def request_logged() -> bool:  # the line is written as the call ends
                    return b'"logger": "router.inference"' in log.read_bytes()[before:]

                await wait_until(request_logged, 5)

            asyncio.run(generate())
            during = log.read_bytes()[before:].decode().splitlines()
        receiver.wait_for(
            lambda spans: any(
                s.service == "routermodel-router" and s.trace_id == CALLER_TRACE_ID for s in spans
            )
        )
    lines = [json.loads(line) for line in during]  # every line is one JSON object
    [request] = [line for line in lines if line["logger"] == "router.inference"]
    assert request["message"].startswith("chat chat: ok in "), request
    assert request["request_id"] == "req-json-logs-1", request
    assert request["trace_id"] == CALLER_TRACE_ID, request
    load = [line for line in lines if line["logger"].startswith(("router.pool", "router.child"))]
    assert len(load) >= 3, during  # the cold start logs its transitions and the child's output
    for line in load:
        assert line["request_id"] == "" and line["trace_id"] == "", line


async def run_with(client: RouterClient, metadata: tuple[tuple[str, str], ...]) -> list[Any]:
    return [
        e async for e in client.generate("chat", {**PROMPT, "max_tokens": 4}, metadata=metadata)
    ]


CHILD_LINES = 3000  # more than the RPC's cap, fewer than the ring configured below


async def test_child_logs_rpc_is_capped(tmp_path: Path, tiny_chat: Path) -> None:
    """Asking for a million lines of a child's log returns the last 2000, however many the
    ring holds: one admin call cannot make the router build an unbounded reply."""
    server = tmp_path / "chatty-llama-server"
    # A real child that writes CHILD_LINES numbered lines to stderr, then serves normally.
    server.write_text(
        f'#!/bin/sh\nseq 1 {CHILD_LINES} | sed "s/^/line /" >&2\n'
        f'cd "{REPO}"\nexec "{sys.executable}" -m tests.fakes.llama_server "$@"\n'
    )
    server.chmod(0o755)
    settings = settings_for(
        tmp_path,
        {"chat": chat_model(tiny_chat)},
        system={"llama_server_path": str(server), "log_ring_lines": 2 * CHILD_LINES},
    )
    async with running_router(settings) as (router, client):
        await client.load("chat")
        supervisor = router.pool.get("chat")
        await wait_until(lambda: len(supervisor.tail_log(10 * CHILD_LINES)) >= CHILD_LINES, 5)
        held = len(supervisor.tail_log(10 * CHILD_LINES))

        async def logs(lines: int) -> list[str]:
            request = mpb.GetModelLogsRequest(model="chat", lines=lines)
            return list((await client.control.GetModelLogs(request)).lines)

        huge = await logs(10**6)
        newest = supervisor.tail_log(2000)  # the child is idle: nothing logged in between
        default = await logs(0)
        few = await logs(5)
        with pytest.raises(grpc.aio.AioRpcError) as negative:
            await logs(-1)
    assert held > 2000  # the ring really holds more than the cap
    assert len(huge) == 2000
    assert huge == newest and huge[0].startswith("line ")
    assert len(default) == 200 and few == huge[-5:]
    assert negative.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def sample(router: Router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


def requests_by_status(router: Router, model: str) -> dict[str, float]:
    return {
        status: sample(
            router, "routermodel_requests_total", model=model, endpoint="chat", status=status
        )
        for status in ("2xx", "4xx", "5xx", "cancelled")
    }


async def test_early_ends_keep_their_ttft_deadline_and_queue_wait(
    tmp_path: Path, tiny_chat: Path
) -> None:
    # Found by review; each failed before its fix: a stream that ended early (cancelled, or
    # its caller's deadline passed) after output recorded no TTFT; a passed deadline (the
    # caller saw DEADLINE_EXCEEDED, a 504) counted as cancelled; a request that timed out in
    # the queue was left out of the queue-wait histogram.
    fake = fake_server(tmp_path, "--token-delay", "0.02")
    model = chat_model(tiny_chat, parallel_override=1)  # the fake serves it; one slot
    system = {"llama_server_path": fake, "queue_timeout_sec": 0.3}
    stream = {**PROMPT, "stream": True, "max_tokens": 200}
    async with running_router(settings_for(tmp_path, {"m": model}, system=system)) as (
        router,
        client,
    ):
        await client.load("m")
        # A caller that leaves after its first chunks.
        async for event in client.generate("m", stream):
            if isinstance(event, Chunk) and event.text:
                break
        await wait_until(lambda: router.pool.get("m").in_flight == 0, 5)
        assert sample(router, "routermodel_time_to_first_token_seconds_count", model="m") == 1
        assert requests_by_status(router, "m")["cancelled"] == 1

        # A caller whose deadline passes mid-stream.
        with pytest.raises(DeadlineExceededError):
            async for _ in client.generate("m", stream, timeout=0.3):
                pass
        await wait_until(lambda: router.pool.get("m").in_flight == 0, 5)
        assert requests_by_status(router, "m") == {"2xx": 0, "4xx": 0, "5xx": 1, "cancelled": 1}
        assert sample(router, "routermodel_time_to_first_token_seconds_count", model="m") == 2

        # A request that times out waiting while another holds the only slot.
        holder = client.generate("m", stream)
        await anext(holder)
        with pytest.raises(DeadlineExceededError):
            await run(client, "m", max_tokens=2)
        await holder.aclose()
        await wait_until(lambda: router.pool.get("m").in_flight == 0, 5)
        waits = sample(router, "routermodel_queue_wait_seconds_count", model="m")
        slow = sample(router, "routermodel_queue_wait_seconds_bucket", model="m", le="0.25")
        assert waits == 4  # the timed-out one included
        assert waits - slow == 1  # it waited its 0.3 s
