"""Keys, scopes, model allow-lists, priority rights, rate limits, request limits, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import (
    AuthenticationError,
    Chunk,
    DeadlineExceededError,
    End,
    GenerateEvent,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RouterClient,
    UnavailableError,
)
from clients.errors import InvalidRequestError
from router.v1 import model_control_service_pb2 as mpb
from tests.certs import make_pki
from tests.helpers import chat_model, embed_model, running_router, settings_for, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]
PROMPT = {"messages": MESSAGES, "max_tokens": 4}
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
KEYS = {
    "inference": "inf-key-0123456789",
    "monitor": "mon-key-0123456789",
    "admin": "adm-key-0123456789",
    "high": "high-key-0123456789",
    "limited": "lim-key-0123456789",
    "tokens": "tok-key-0123456789",
}
TOKENS_PER_MINUTE = 10


def keyed_settings(tmp_path: Path, tiny_chat: Path, tiny_embed: Path, **extra: Any) -> Any:
    return settings_for(
        tmp_path,
        {
            "chat": chat_model(tiny_chat),
            "other": chat_model(tiny_chat),
            "embed": embed_model(tiny_embed),
        },
        auth={
            "api_keys": [
                {"key": KEYS["inference"], "scopes": ["inference"], "models": ["chat", "embed"]},
                {"key": KEYS["monitor"], "scopes": ["monitor"]},
                {"key": KEYS["admin"], "scopes": ["admin"], "name": "ops"},
                {"key": KEYS["high"], "scopes": ["inference"], "allow_high_priority": True},
                {"key": KEYS["limited"], "scopes": ["inference"], "requests_per_minute": 2},
                {
                    "key": KEYS["tokens"],
                    "scopes": ["inference"],
                    "tokens_per_minute": TOKENS_PER_MINUTE,
                },
            ]
        },
        **extra,
    )


async def generate(client: RouterClient, model: str = "chat", **kwargs: Any) -> list[GenerateEvent]:
    return [e async for e in client.generate(model, PROMPT, **kwargs)]


async def test_scopes_over_grpc(tmp_path: Path, tiny_chat: Path, tiny_embed: Path) -> None:
    settings = keyed_settings(tmp_path, tiny_chat, tiny_embed)
    async with running_router(settings) as (router, anonymous):
        target = f"127.0.0.1:{router.port}"
        with pytest.raises(AuthenticationError):
            await generate(anonymous)
        with pytest.raises(AuthenticationError):
            await anonymous.list_models()
        with pytest.raises(AuthenticationError):
            await generate(RouterClient(target, api_key="wrong-key"))

        with pytest.raises(AuthenticationError):
            await anonymous.complete("chat", PROMPT)

        async with RouterClient(target, api_key=KEYS["inference"]) as inference:
            assert isinstance((await generate(inference))[-1], End)
            assert (await inference.complete("chat", PROMPT)).end.usage.completion_tokens == 4
            with pytest.raises(ModelNotFoundError):
                await inference.complete("other", PROMPT)
            assert (await inference.embed("embed", ["hello"])).embeddings
            assert [m.alias for m in (await inference.list_models()).models] == ["chat", "embed"]
            with pytest.raises(ModelNotFoundError):  # outside its allow-list: as if absent
                await generate(inference, "other")
            with pytest.raises(ModelNotFoundError):
                await inference.get_model("other")
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await inference.control.GetQueueStats(
                    mpb.GetQueueStatsRequest(),
                    metadata=(("authorization", "Bearer " + KEYS["inference"]),),
                )
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(PermissionDeniedError):
                await inference.load("chat")
            with pytest.raises(PermissionDeniedError):
                await generate(inference, priority="high")

        async with RouterClient(target, api_key=KEYS["monitor"]) as monitor:
            assert len((await monitor.list_models()).models) == 3
            metadata = (("x-api-key", KEYS["monitor"]),)
            stats = await monitor.control.GetQueueStats(
                mpb.GetQueueStatsRequest(), metadata=metadata
            )
            assert set(stats.per_model) == {"chat", "other", "embed"}
            await monitor.control.GetTelemetrySummary(
                mpb.GetTelemetrySummaryRequest(), metadata=metadata
            )
            with pytest.raises(PermissionDeniedError):
                await generate(monitor)
            with pytest.raises(PermissionDeniedError):
                await monitor.complete("chat", PROMPT)
            with pytest.raises(PermissionDeniedError):
                await monitor.unload("chat")

        async with RouterClient(target, api_key=KEYS["admin"]) as admin:
            assert (await admin.load("other")).state == "ready"
            assert isinstance((await generate(admin, "other"))[-1], End)
            metadata = (("authorization", "Bearer " + KEYS["admin"]),)
            logs = await admin.control.GetModelLogs(
                mpb.GetModelLogsRequest(model="other"), metadata=metadata
            )
            assert logs.lines
            await admin.unload("other")

        async with RouterClient(target, api_key=KEYS["high"]) as high:
            assert isinstance((await generate(high, priority="high"))[-1], End)


async def test_rate_limit_refuses_with_retry_after(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = keyed_settings(tmp_path, tiny_chat, tiny_embed)
    async with running_router(settings) as (router, _):
        async with RouterClient(f"127.0.0.1:{router.port}", api_key=KEYS["limited"]) as limited:
            await generate(limited)
            await generate(limited)
            with pytest.raises(RateLimitError) as caught:
                await generate(limited)
        assert caught.value.reason == "RATE_LIMITED"
        assert caught.value.retry_after is not None and caught.value.retry_after >= 1
        # Other keys are not affected.
        async with RouterClient(f"127.0.0.1:{router.port}", api_key=KEYS["inference"]) as other:
            await generate(other)


@pytest.mark.parametrize("call", ["generate", "complete"])
async def test_token_rate_limit_refuses_with_retry_after(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path, call: str
) -> None:
    settings = keyed_settings(tmp_path, tiny_chat, tiny_embed)
    async with running_router(settings) as (router, _):
        async with RouterClient(f"127.0.0.1:{router.port}", api_key=KEYS["tokens"]) as client:
            body = {"messages": MESSAGES, "max_tokens": TOKENS_PER_MINUTE}
            if call == "generate":
                used = (await collect(client, body))[-1]
            else:
                used = (await client.complete("chat", body)).end
            assert isinstance(used, End) and used.usage.total_tokens > TOKENS_PER_MINUTE
            with pytest.raises(RateLimitError) as caught:
                await collect(client, PROMPT)
            with pytest.raises(RateLimitError):
                await client.complete("chat", PROMPT)
            with pytest.raises(RateLimitError):
                await client.embed("embed", ["hello"])
        assert caught.value.reason == "RATE_LIMITED" and "tokens" in str(caught.value)
        # In debt by what the request used beyond the bucket: that long at 10 a minute.
        debt = used.usage.total_tokens - TOKENS_PER_MINUTE
        assert caught.value.retry_after is not None
        assert debt * 6 - 1 <= caught.value.retry_after <= debt * 6 + 1
        async with RouterClient(f"127.0.0.1:{router.port}", api_key=KEYS["inference"]) as other:
            await generate(other)


@pytest.mark.parametrize("how", ["aclose", "deadline"])
async def test_leaving_a_stream_early_is_charged(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path, how: str
) -> None:
    # The audit's bypass: streams left before their End were never charged, so a key could
    # draw any number of tokens by reading part of each response.
    settings = keyed_settings(tmp_path, tiny_chat, tiny_embed)
    async with running_router(settings) as (router, _):
        bucket = router.authenticator.principal(KEYS["tokens"]).tokens  # type: ignore[union-attr]
        assert bucket is not None
        async with RouterClient(f"127.0.0.1:{router.port}", api_key=KEYS["admin"]) as admin:
            await admin.load("chat")  # so the deadline below runs out while tokens flow
        async with RouterClient(f"127.0.0.1:{router.port}", api_key=KEYS["tokens"]) as client:
            body = {"messages": MESSAGES, "max_tokens": 4000, "stream": True}
            received = 0
            events = client.generate("chat", body, timeout=None if how == "aclose" else 0.3)
            with contextlib.suppress(DeadlineExceededError):
                async for event in events:
                    assert not isinstance(event, End)  # 4000 tokens take ~0.7 s or more
                    if isinstance(event, Chunk):
                        received += len(event.data)
                        # More than the bucket holds, so the key is in debt whatever the
                        # refill meanwhile (exactly 10 left it at +0.02 on a busy first run).
                        if how == "aclose" and received > TOKENS_PER_MINUTE:
                            break
            await events.aclose()
            assert received > TOKENS_PER_MINUTE
            await wait_until(lambda: bucket.level <= 0, timeout=5)
            with pytest.raises(RateLimitError):
                await collect(client, PROMPT)


async def test_health_is_open_and_reflection_needs_a_key(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = keyed_settings(tmp_path, tiny_chat, tiny_embed)
    async with running_router(settings) as (router, _):
        address = f"127.0.0.1:{router.port}"

        def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30
            )

        async with grpc.aio.insecure_channel(address) as channel:  # no key at all
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refused = await asyncio.to_thread(grpcurl, address, "list")
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
        header = f"authorization: Bearer {KEYS['monitor']}"
        listed = await asyncio.to_thread(grpcurl, "-H", header, address, "list")
        assert listed.returncode == 0 and "router.v1.InferenceService" in listed.stdout
        body = json.dumps(
            {"model": "chat", "kind": "GENERATE_KIND_CHAT", "body": json.dumps(PROMPT)}
        )
        call = ["-d", body, address, "router.v1.InferenceService/Generate"]
        denied = await asyncio.to_thread(grpcurl, "-H", header, *call)
        assert denied.returncode != 0 and "PermissionDenied" in denied.stderr
        allowed = await asyncio.to_thread(grpcurl, "-H", f"x-api-key: {KEYS['inference']}", *call)
        assert allowed.returncode == 0 and '"end"' in allowed.stdout


async def test_protected_metrics_need_a_monitor_key(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = keyed_settings(
        tmp_path, tiny_chat, tiny_embed, telemetry={"metrics_port": 0, "metrics_open": False}
    )
    async with running_router(settings) as (router, _):
        url = f"http://127.0.0.1:{router.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 401
            headers = {"Authorization": f"Bearer {KEYS['inference']}"}
            async with session.get(url, headers=headers) as response:
                assert response.status == 403
            headers = {"Authorization": f"Bearer {KEYS['monitor']}"}
            async with session.get(url, headers=headers) as response:
                assert (
                    response.status == 200 and "routermodel_requests_total" in await response.text()
                )


async def test_request_limits_before_queueing(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    settings = settings_for(
        tmp_path,
        {"chat": {**chat_model(tiny_chat), "max_tokens_cap": 6}, "embed": embed_model(tiny_embed)},
        system={"max_messages": 3, "max_embedding_inputs": 4},
    )
    async with running_router(settings) as (router, client):
        with pytest.raises(InvalidRequestError, match="at most 6"):
            await collect(client, {"messages": MESSAGES, "max_tokens": 7})
        with pytest.raises(InvalidRequestError, match="context"):
            await collect(client, {"messages": MESSAGES, "max_tokens": 5000})
        with pytest.raises(InvalidRequestError, match="positive integer") as caught:
            await collect(client, {"messages": MESSAGES, "max_tokens": "ten"})
        assert caught.value.metadata["param"] == "max_tokens"
        with pytest.raises(InvalidRequestError, match="too many messages"):
            await collect(client, {"messages": MESSAGES * 4, "max_tokens": 2})
        with pytest.raises(InvalidRequestError, match="too many inputs"):
            await client.embed("embed", ["a"] * 5)
        assert router.pool.get("chat").child is None  # refused before loading anything
        events = await collect(client, {"messages": MESSAGES})  # the cap applies
        assert isinstance(events[-1], End) and events[-1].usage.completion_tokens == 6


@pytest.mark.parametrize(
    "lengths",
    [
        {"n_predict": -1},
        {"max_tokens": -1},
        {"max_completion_tokens": -1},
        {"max_tokens": 3, "n_predict": -1},
        {"max_tokens": 3, "max_completion_tokens": -1},
    ],
    ids=lambda lengths: ",".join(f"{k}={v}" for k, v in lengths.items()),
)
@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_minus_one_cannot_exceed_the_cap(
    tmp_path: Path, tiny_chat: Path, lengths: dict[str, int], kind: Any
) -> None:
    # The tiny model never stops on its own: without the cap it fills the 512-token context.
    settings = settings_for(
        tmp_path, {"chat": {**chat_model(tiny_chat, n_ctx=512), "max_tokens_cap": 6}}
    )
    body: dict[str, Any] = {"messages": MESSAGES} if kind == "chat" else {"prompt": "hi"}
    async with running_router(settings) as (_, client):
        for stream in (False, True):
            events = [
                e
                async for e in client.generate(
                    "chat", {**body, **lengths, "stream": stream}, kind=kind
                )
            ]
            assert isinstance(events[-1], End)
            assert 1 <= events[-1].usage.completion_tokens <= 6, (stream, events[-1].usage)


async def collect(client: RouterClient, body: dict[str, Any]) -> list[GenerateEvent]:
    return [e async for e in client.generate("chat", body)]


async def test_tls_router_needs_the_ca_and_refuses_plaintext(
    tmp_path: Path, tiny_chat: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = settings_for(
        tmp_path,
        {"chat": chat_model(tiny_chat)},
        grpc_tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
    )
    async with running_router(settings) as (router, plaintext):
        with pytest.raises(UnavailableError):
            await plaintext.list_models()
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with RouterClient(f"127.0.0.1:{router.port}", credentials=credentials) as secure:
            assert isinstance((await generate(secure))[-1], End)


async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, tiny_chat: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = settings_for(
        tmp_path,
        {"chat": chat_model(tiny_chat)},
        grpc_tls={
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            "client_ca_file": str(pki.ca),
        },
    )
    async with running_router(settings) as (router, _):
        target = f"127.0.0.1:{router.port}"
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with RouterClient(target, credentials=no_cert) as anonymous:
            with pytest.raises(UnavailableError):
                await anonymous.list_models()
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with RouterClient(target, credentials=with_cert) as client:
            assert (await client.list_models()).models[0].alias == "chat"


def test_non_loopback_without_keys_is_refused(tmp_path: Path, tiny_chat: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"grpc": {"host": "0.0.0.0"}, "models": {"chat": chat_model(tiny_chat)}})
    )
    result = subprocess.run(
        [sys.executable, "-m", "router", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "auth.api_keys" in result.stderr and "--insecure-listen" in result.stderr


def refusals(router: Any, model: str, endpoint: str) -> tuple[float, dict[str, float]]:
    """A model's 4xx count on ``endpoint``, and its rejections by reason (non-zero ones)."""
    registry = router.metrics.registry
    labels = {"model": model, "endpoint": endpoint, "status": "4xx"}
    errors = registry.get_sample_value("routermodel_requests_total", labels) or 0.0
    reasons = {
        s.labels["reason"]: s.value
        for family in router.metrics.rejections.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels["model"] == model and s.value
    }
    return errors, reasons


async def test_calls_a_key_cannot_make_count_for_their_model(
    tmp_path: Path, tiny_chat: Path, tiny_embed: Path
) -> None:
    # Before: refused in the interceptor, they counted nowhere in the router's metrics or
    # summary (its rejections{reason="rate_limited"} could never appear).
    settings = keyed_settings(tmp_path, tiny_chat, tiny_embed)
    async with running_router(settings) as (router, anonymous):
        target = f"127.0.0.1:{router.port}"
        with pytest.raises(AuthenticationError):
            await generate(anonymous)
        async with RouterClient(target, api_key=KEYS["limited"]) as limited:
            for _ in range(2):
                await generate(limited)
            with pytest.raises(RateLimitError):
                await generate(limited)
            with pytest.raises(RateLimitError):
                await limited.embed("embed", ["hello"])
        async with RouterClient(target, api_key=KEYS["inference"]) as inference:
            with pytest.raises(ModelNotFoundError):
                await generate(inference, "unconfigured")  # no series for a name never set up

        assert refusals(router, "chat", "chat") == (
            2,
            {"unauthenticated": 1, "rate_limited": 1},
        )
        assert refusals(router, "embed", "embeddings") == (1, {"rate_limited": 1})
        assert "unconfigured" not in {
            s.labels["model"] for f in router.metrics.requests.collect() for s in f.samples
        }
        summary = router.summary.summary().per_model["chat"]
        assert (summary.requests, summary.errors_4xx) == (4, 2)
