"""Keys, scopes, limits and TLS through real facade and router processes.

The router alone enforces keys, scopes, model allow-lists, priority rights and rate limits
(tests/integration/test_security.py covers it over gRPC); these tests check that HTTP callers
meet the same rules through the facade, that grpcurl sees them too, and the transport security
of both processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.certs import Pki, make_pki
from tests.disclosure import assert_no_disclosure
from tests.e2e.stack import Stack, facade_process, running_stack, stop_process, wait_for_http
from tests.helpers import (
    REPO,
    chat_model,
    embed_model,
    free_port,
    router_process,
    spawn_logged,
    write_config,
)

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
KEYS = {
    "inference": "inf-key-0123456789",
    "monitor": "mon-key-0123456789",
    "admin": "adm-key-0123456789",
    "high": "high-key-0123456789",
    "limited": "lim-key-0123456789",
    "tokens": "tok-key-0123456789",
    "monitor-chat": "mon-chat-key-0123456789",
    "admin-chat": "adm-chat-key-0123456789",
    "wrong": "not-a-configured-key",
}
AUTH = {
    "api_keys": [
        {"key": KEYS["inference"], "scopes": ["inference"], "models": ["chat", "embed"]},
        {"key": KEYS["monitor"], "scopes": ["monitor"]},
        {"key": KEYS["admin"], "scopes": ["admin"]},
        {"key": KEYS["high"], "scopes": ["inference"], "allow_high_priority": True},
        {"key": KEYS["limited"], "scopes": ["inference"], "requests_per_minute": 2},
        {"key": KEYS["tokens"], "scopes": ["inference"], "tokens_per_minute": 5},
        {"key": KEYS["monitor-chat"], "scopes": ["monitor"], "models": ["chat"]},
        {"key": KEYS["admin-chat"], "scopes": ["admin"], "models": ["chat"]},
    ]
}
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
COMPLETION = {"model": "chat", "prompt": "hi", "max_tokens": 2}
EMBED = {"model": "embed", "input": "hi"}
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path, tiny_embed: Path
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("security")
    models = {
        "chat": {**chat_model(tiny_chat), "max_tokens_cap": 6},
        "other": chat_model(tiny_chat),
        "embed": embed_model(tiny_embed),
    }
    system = {"max_messages": 3, "max_embedding_inputs": 4}
    with running_stack(
        directory, models, system=system, api={"max_body_bytes": BODY_LIMIT}, auth=AUTH
    ) as running:
        yield running


def key_headers(who: str | None, header: str = "Authorization") -> dict[str, str]:
    if who is None:
        return {}
    key = KEYS[who]
    return {header: f"Bearer {key}" if header == "Authorization" else key}


@contextlib.asynccontextmanager
async def session_for(base_url: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url, timeout=timeout, **kwargs) as session:
        yield session


async def call(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    """(status, decoded body, headers); a stream answers with its first event's bytes."""
    async with session.request(method, path, json=body, headers=headers) as response:
        if response.content_type == "text/event-stream":
            first = await response.content.readuntil(b"\n\n")
            return response.status, first.decode(), response.headers
        return response.status, await response.json(), response.headers


def assert_envelope(status: int, body: Any, *, echo: str = "") -> dict[str, Any]:
    """An error is OpenAI's envelope and discloses nothing (not even the keys)."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert_no_disclosure(json.dumps(body), echo=echo, secrets=KEYS.values(), where=str(status))
    return error


# Who may do what (README `auth`, router/auth.py): (method, path, body, expected status).
SCOPES: dict[str | None, list[tuple[str, str, Any, int]]] = {
    None: [
        ("GET", "/health", None, 200),
        ("POST", "/v1/chat/completions", CHAT, 401),
        ("POST", "/v1/completions", COMPLETION, 401),
        ("POST", "/v1/embeddings", EMBED, 401),
        ("GET", "/v1/models", None, 401),
        ("GET", "/v1/models/chat", None, 401),
        ("GET", "/v1/models/status", None, 401),
        ("GET", "/v1/queue/stats", None, 401),
        ("GET", "/metrics/stream", None, 401),
        ("GET", "/vram/summary", None, 401),
        ("POST", "/v1/models/chat/load", {}, 401),
    ],
    "wrong": [
        ("GET", "/health", None, 200),
        ("POST", "/v1/chat/completions", CHAT, 401),
        ("GET", "/v1/models", None, 401),
        ("POST", "/v1/models/eject", {"model": "chat"}, 401),
    ],
    "inference": [
        ("POST", "/v1/chat/completions", CHAT, 200),
        ("POST", "/v1/completions", COMPLETION, 200),
        ("POST", "/v1/embeddings", EMBED, 200),
        ("GET", "/v1/models/chat", None, 200),
        ("GET", "/v1/models/status/chat", None, 200),
        # Outside the key's allow-list: as if the model did not exist, as OpenAI does.
        ("POST", "/v1/chat/completions", {**CHAT, "model": "other"}, 404),
        ("GET", "/v1/models/other", None, 404),
        ("GET", "/v1/models/status/other", None, 404),
        ("GET", "/v1/queue/stats", None, 403),
        ("GET", "/vram", None, 403),
        ("GET", "/vram/summary", None, 403),
        ("GET", "/v1/health/models", None, 403),
        ("GET", "/v1/telemetry/summary", None, 403),
        ("GET", "/v1/models/failed", None, 403),
        ("GET", "/v1/models/status/stream", None, 403),
        ("GET", "/metrics/stream", None, 403),
        ("POST", "/v1/models/chat/load", {}, 403),
        ("POST", "/v1/models/eject", {"model": "chat"}, 403),
        ("POST", "/v1/models/chat/reset", {}, 403),
        ("GET", "/v1/models/chat/logs", None, 403),
    ],
    "monitor": [
        ("GET", "/v1/models", None, 200),
        ("GET", "/v1/models/other", None, 200),
        ("GET", "/v1/models/status", None, 200),
        ("GET", "/v1/queue/stats", None, 200),
        ("GET", "/vram", None, 200),
        ("GET", "/vram/summary", None, 200),
        ("GET", "/vram/models/other", None, 200),
        ("GET", "/v1/health/models", None, 200),
        ("GET", "/v1/telemetry/summary", None, 200),
        ("GET", "/v1/models/failed", None, 200),
        ("GET", "/v1/models/status/stream", None, 200),
        ("GET", "/metrics/stream", None, 200),
        ("POST", "/v1/chat/completions", CHAT, 403),
        ("POST", "/v1/completions", COMPLETION, 403),
        ("POST", "/v1/embeddings", EMBED, 403),
        ("POST", "/v1/models/chat/load", {}, 403),
        ("POST", "/v1/models/chat/unload", {}, 403),
        ("POST", "/v1/models/chat/reset", {}, 403),
        ("GET", "/v1/models/chat/logs", None, 403),
    ],
    # In order: the admin loads a model, uses it, reads its logs, resets and ejects it.
    "admin": [
        ("POST", "/v1/models/other/load", {"wait": True}, 200),
        ("POST", "/v1/chat/completions", {**CHAT, "model": "other"}, 200),
        ("POST", "/v1/embeddings", EMBED, 200),
        ("GET", "/v1/models/other/logs?lines=3", None, 200),
        ("POST", "/v1/models/other/reset", {}, 200),
        ("POST", "/v1/models/eject", {"model": "other"}, 200),
        ("GET", "/v1/queue/stats", None, 200),
        ("GET", "/vram", None, 200),
        ("GET", "/vram/summary", None, 200),
        ("GET", "/v1/models/status/stream", None, 200),
        ("GET", "/metrics/stream", None, 200),
    ],
    # Allow-lists bind monitor and admin keys too: a model outside one does not exist for them.
    "monitor-chat": [
        ("GET", "/v1/models/chat", None, 200),
        ("GET", "/v1/models/status/chat", None, 200),
        ("GET", "/vram/models/chat", None, 200),
        ("GET", "/v1/queue/stats", None, 200),
        ("GET", "/vram/summary", None, 200),
        ("GET", "/metrics/stream", None, 200),
        ("GET", "/v1/models/other", None, 404),
        ("GET", "/v1/models/status/other", None, 404),
        ("GET", "/vram/models/other", None, 404),
        ("POST", "/v1/chat/completions", CHAT, 403),
        ("POST", "/v1/models/chat/load", {}, 403),
    ],
    "admin-chat": [
        ("POST", "/v1/chat/completions", CHAT, 200),
        ("GET", "/v1/models/chat/logs?lines=3", None, 200),
        ("GET", "/metrics/stream", None, 200),
        ("POST", "/v1/chat/completions", {**CHAT, "model": "other"}, 404),
        ("POST", "/v1/embeddings", EMBED, 404),
        ("GET", "/v1/models/other", None, 404),
        ("POST", "/v1/models/other/load", {"wait": True}, 404),
        ("POST", "/v1/models/other/unload", {}, 404),
        ("POST", "/v1/models/eject", {"model": "other"}, 404),
        ("POST", "/v1/models/other/reset", {}, 404),
        ("GET", "/v1/models/other/logs", None, 404),
        ("GET", "/vram/models/other", None, 404),
    ],
}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


@pytest.mark.parametrize("who", list(SCOPES), ids=lambda who: who or "no-key")
@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
async def test_each_scope_through_http(stack: Stack, who: str | None, header: str) -> None:
    async with session_for(stack.base_url) as session:
        for method, path, body, expected in SCOPES[who]:
            status, answer, _ = await call(session, method, path, body, key_headers(who, header))
            assert status == expected, (who, method, path, answer)
            if expected >= 400:
                error = assert_envelope(status, answer, echo=path)
                assert error["type"] == ERROR_TYPES[expected], (path, error)
                if expected == 404:
                    assert error["code"] == "model_not_found"
                if expected == 401:
                    assert error["code"] == "invalid_api_key"


async def test_a_key_sees_only_its_models(stack: Stack) -> None:
    async with session_for(stack.base_url) as session:
        _, limited, _ = await call(session, "GET", "/v1/models", None, key_headers("inference"))
        _, everything, _ = await call(session, "GET", "/v1/models", None, key_headers("monitor"))
        _, status, _ = await call(session, "GET", "/v1/models/status", None, key_headers("high"))

    assert [model["id"] for model in limited["data"]] == ["chat", "embed"]
    assert [model["id"] for model in everything["data"]] == ["chat", "other", "embed"]
    assert len(status["models"]) == 3


@pytest.mark.parametrize("who", ["monitor-chat", "admin-chat"])
async def test_monitor_and_admin_keys_see_only_their_models(stack: Stack, who: str) -> None:
    headers = key_headers(who)
    async with session_for(stack.base_url) as session:
        answers = {
            path: (await call(session, "GET", path, None, headers))[1]
            for path in ("/v1/models", "/v1/models/status", "/v1/queue/stats", "/vram",
                         "/v1/health/models", "/v1/telemetry/summary", "/metrics/stream")
        }  # fmt: skip

    assert [model["id"] for model in answers["/v1/models"]["data"]] == ["chat"]
    assert [model["alias"] for model in answers["/v1/models/status"]["models"]] == ["chat"]
    assert set(answers["/v1/queue/stats"]["per_model"]) == {"chat"}
    assert {model["model"] for model in answers["/vram"]["models"]} <= {"chat"}
    assert set(answers["/v1/health/models"]["models"]) == {"chat"}
    assert set(answers["/v1/telemetry/summary"]["per_model"]) <= {"chat"}
    metrics = json.loads(answers["/metrics/stream"].split("data: ", 1)[1])
    assert [model["alias"] for model in metrics["models"]] == ["chat"]


async def test_high_priority_only_for_keys_allowed_it(stack: Stack) -> None:
    high = {"X-Request-Priority": "high"}
    async with session_for(stack.base_url) as session:
        denied = await call(session, "POST", "/v1/chat/completions", CHAT, {
            **key_headers("inference"), **high})  # fmt: skip
        allowed = await call(session, "POST", "/v1/chat/completions", CHAT, {
            **key_headers("high"), **high})  # fmt: skip
        low = await call(session, "POST", "/v1/chat/completions", CHAT, {
            **key_headers("inference"), "X-Request-Priority": "low"})  # fmt: skip

    assert denied[0] == 403
    assert assert_envelope(denied[0], denied[1])["type"] == "permission_error"
    assert allowed[0] == 200 and low[0] == 200


async def test_the_rate_limit_is_429_with_retry_after(stack: Stack) -> None:
    headers = key_headers("limited")
    async with session_for(stack.base_url) as session:
        first = await call(session, "POST", "/v1/embeddings", EMBED, headers)
        second = await call(session, "POST", "/v1/chat/completions", CHAT, headers)
        refused = await call(session, "POST", "/v1/embeddings", EMBED, headers)
        others = await call(session, "POST", "/v1/embeddings", EMBED, key_headers("inference"))

    assert (first[0], second[0], others[0]) == (200, 200, 200)
    status, body, response_headers = refused
    assert status == 429
    error = assert_envelope(status, body)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert int(response_headers["Retry-After"]) >= 1


async def test_the_token_rate_limit_is_429_with_retry_after(stack: Stack) -> None:
    headers = key_headers("tokens")
    async with session_for(stack.base_url) as session:
        # 5 tokens a minute: the prompt and 6 generated tokens put the key in debt.
        used = await call(
            session, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 6}, headers
        )
        refused = await call(session, "POST", "/v1/chat/completions", CHAT, headers)
        streamed = await call(
            session, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, headers
        )

    assert used[0] == 200 and used[1]["usage"]["total_tokens"] > 5
    for status, body, response_headers in (refused, streamed):
        assert status == 429, body
        error = assert_envelope(status, body)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert "tokens" in error["message"]
        # In debt by (total - 5) tokens, repaid at 5 a minute.
        debt = used[1]["usage"]["total_tokens"] - 5
        assert debt * 12 - 1 <= int(response_headers["Retry-After"]) <= debt * 12 + 1


# Limits


async def test_an_oversized_body_is_413_with_content_length_or_chunked(stack: Stack) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    data = json.dumps(big).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 512):
            yield data[start : start + 512]

    headers = {**key_headers("admin"), "Content-Type": "application/json"}
    results = []
    async with session_for(stack.base_url) as session:
        for path, body in (
            ("/v1/chat/completions", data),
            ("/v1/chat/completions", chunked()),
            ("/v1/embeddings", chunked()),
            ("/v1/models/chat/load", chunked()),
        ):
            async with session.post(path, data=body, headers=headers) as response:
                results.append((response.status, await response.json()))
        # Just under the limit is served.
        small = {**CHAT, "messages": [{"role": "user", "content": "hello " * 300}]}
        status, served, _ = await call(session, "POST", "/v1/chat/completions", small, headers)

    assert status == 200, served
    for status, answer in results:
        assert status == 413
        assert assert_envelope(status, answer)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "header",
    [b"Content-Length: abc", b"Content-Length: -1", b"Content-Length: 99999999999999999999"],
)
def test_a_malformed_content_length_is_400_not_500(stack: Stack, header: bytes) -> None:
    # The seed answered 500 (W14). aiohttp's parser refuses it before the app sees a request,
    # so the body is its own text, not the envelope.
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n{}")
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"400", status_line


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 7}, "max_tokens", "at most 6"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 5000}, "max_tokens", "context"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 7}, "max_tokens", "at most 6"),
        ("/v1/chat/completions", {**CHAT, "messages": MESSAGES * 4}, "messages", "messages"),
        ("/v1/embeddings", {**EMBED, "input": ["a"] * 5}, "input", "inputs"),
    ],
    ids=["max-tokens-cap", "context", "completion-cap", "messages", "embedding-inputs"],
)
async def test_limits_are_400_envelopes_naming_the_param(
    stack: Stack, path: str, body: dict[str, Any], param: str, words: str
) -> None:
    async with session_for(stack.base_url) as session:
        for stream in (False, True):
            payload = {**body, "stream": True} if stream and "messages" in body else body
            status, answer, _ = await call(session, "POST", path, payload, key_headers("admin"))
            assert status == 400, answer
            error = assert_envelope(status, answer)
            assert (error["type"], error["param"]) == ("invalid_request_error", param)
            assert words in error["message"]


# gRPC: the same rules seen by grpcurl, with and without a key

HEALTH_PROTO = """syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse { int32 status = 1; }
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"""
_GENERATE = {"model": "chat", "kind": "GENERATE_KIND_CHAT", "body": json.dumps(CHAT)}
_CONTROL = "router.v1.ModelControlService/"
# (key, method, request, expected grpcurl status name or "OK").
GRPC_SCOPES: list[tuple[str | None, str, dict[str, Any], str]] = [
    (None, "grpc.health.v1.Health/Check", {}, "OK"),
    (None, "router.v1.InferenceService/Generate", _GENERATE, "Unauthenticated"),
    (None, "router.v1.InferenceService/Complete", _GENERATE, "Unauthenticated"),
    (None, _CONTROL + "ListModels", {}, "Unauthenticated"),
    (None, _CONTROL + "GetQueueStats", {}, "Unauthenticated"),
    (None, _CONTROL + "LoadModel", {"model": "chat"}, "Unauthenticated"),
    (None, _CONTROL + "WatchModels", {}, "Unauthenticated"),
    (None, _CONTROL + "GetModelHealth", {}, "Unauthenticated"),
    ("wrong", _CONTROL + "ListModels", {}, "Unauthenticated"),
    ("inference", "router.v1.InferenceService/Generate", _GENERATE, "OK"),
    ("inference", "router.v1.InferenceService/Complete", _GENERATE, "OK"),
    ("inference", "router.v1.InferenceService/Embed", {"model": "embed", "inputs": ["a"]}, "OK"),
    ("inference", _CONTROL + "ListModels", {}, "OK"),
    ("inference", _CONTROL + "GetModel", {"model": "other"}, "NotFound"),
    (
        "inference",
        "router.v1.InferenceService/Generate",
        {**_GENERATE, "model": "other"},
        "NotFound",
    ),  # fmt: skip
    ("inference", _CONTROL + "GetQueueStats", {}, "PermissionDenied"),
    ("inference", _CONTROL + "GetResources", {}, "PermissionDenied"),
    ("inference", _CONTROL + "WatchModels", {}, "PermissionDenied"),
    ("inference", _CONTROL + "GetModelHealth", {}, "PermissionDenied"),
    ("inference", _CONTROL + "GetTelemetrySummary", {}, "PermissionDenied"),
    ("inference", _CONTROL + "ListFailedModels", {}, "PermissionDenied"),
    ("inference", _CONTROL + "GetModelLogs", {"model": "chat"}, "PermissionDenied"),
    ("inference", _CONTROL + "LoadModel", {"model": "chat"}, "PermissionDenied"),
    (
        "inference",
        "router.v1.InferenceService/Generate",
        {**_GENERATE, "priority": "PRIORITY_HIGH"},
        "PermissionDenied",
    ),  # fmt: skip
    (
        "high",
        "router.v1.InferenceService/Generate",
        {**_GENERATE, "priority": "PRIORITY_HIGH"},
        "OK",
    ),  # fmt: skip
    ("monitor", _CONTROL + "GetQueueStats", {}, "OK"),
    ("monitor", _CONTROL + "GetResources", {}, "OK"),
    ("monitor", _CONTROL + "ListFailedModels", {}, "OK"),
    ("monitor", _CONTROL + "GetModelHealth", {}, "OK"),
    ("monitor", _CONTROL + "GetTelemetrySummary", {}, "OK"),
    ("monitor", _CONTROL + "GetModel", {"model": "other"}, "OK"),
    ("monitor", "router.v1.InferenceService/Generate", _GENERATE, "PermissionDenied"),
    ("monitor", "router.v1.InferenceService/Complete", _GENERATE, "PermissionDenied"),
    (
        "monitor",
        "router.v1.InferenceService/Embed",
        {"model": "embed", "inputs": ["a"]},
        "PermissionDenied",
    ),  # fmt: skip
    ("monitor", _CONTROL + "LoadModel", {"model": "chat"}, "PermissionDenied"),
    ("monitor", _CONTROL + "ResetModel", {"model": "chat"}, "PermissionDenied"),
    ("monitor", _CONTROL + "UnloadModel", {"model": "chat"}, "PermissionDenied"),
    ("monitor", _CONTROL + "GetModelLogs", {"model": "chat"}, "PermissionDenied"),
    ("admin", _CONTROL + "LoadModel", {"model": "chat", "wait": True}, "OK"),
    ("admin", _CONTROL + "GetModelLogs", {"model": "chat", "lines": 2}, "OK"),
    ("admin", _CONTROL + "ResetModel", {"model": "chat"}, "OK"),
    ("admin", _CONTROL + "GetModelHealth", {}, "OK"),
    ("admin", _CONTROL + "GetTelemetrySummary", {}, "OK"),
    ("admin", "router.v1.InferenceService/Embed", {"model": "embed", "inputs": ["a"]}, "OK"),
    # Allow-lists bind monitor and admin keys too.
    ("monitor-chat", _CONTROL + "GetModel", {"model": "chat"}, "OK"),
    ("monitor-chat", _CONTROL + "GetQueueStats", {}, "OK"),
    ("monitor-chat", _CONTROL + "GetModel", {"model": "other"}, "NotFound"),
    ("monitor-chat", _CONTROL + "GetResources", {"model": "other"}, "NotFound"),
    ("monitor-chat", _CONTROL + "LoadModel", {"model": "chat"}, "PermissionDenied"),
    ("admin-chat", _CONTROL + "GetModelLogs", {"model": "chat", "lines": 2}, "OK"),
    ("admin-chat", _CONTROL + "LoadModel", {"model": "other"}, "NotFound"),
    ("admin-chat", _CONTROL + "UnloadModel", {"model": "other"}, "NotFound"),
    ("admin-chat", _CONTROL + "ResetModel", {"model": "other"}, "NotFound"),
    ("admin-chat", _CONTROL + "GetModelLogs", {"model": "other"}, "NotFound"),
    (
        "admin-chat",
        "router.v1.InferenceService/Embed",
        {"model": "embed", "inputs": ["a"]},
        "NotFound",
    ),  # fmt: skip
]


def proto_args(directory: Path) -> list[str]:
    """grpcurl's arguments to read the router's protos (and a minimal health.proto)."""
    (directory / "health.proto").write_text(HEALTH_PROTO)
    protos = ["-import-path", str(REPO / "protos"), "-import-path", str(directory)]
    for name in ("router/v1/inference_service.proto", "router/v1/model_control_service.proto"):
        protos += ["-proto", name]
    return [*protos, "-proto", "health.proto"]


def test_each_scope_through_grpcurl(stack: Stack, tmp_path: Path) -> None:
    # From the proto sources rather than reflection, so a call without a key reaches the RPC
    # itself (reflection needs a key too; tests/integration/test_security.py checks that).
    protos = proto_args(tmp_path)
    for who, method, request, expected in GRPC_SCOPES:
        headers = [] if who is None else ["-H", f"authorization: Bearer {KEYS[who]}"]
        result = subprocess.run(
            [GRPCURL, "-plaintext", "-max-time", "30", *protos, *headers, "-d",
             json.dumps(request), stack.grpc_target, method],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if expected == "OK":
            assert result.returncode == 0, (who, method, result.stderr)
        else:
            assert result.returncode != 0, (who, method, result.stdout)
            assert f"Code: {expected}" in result.stderr, (who, method, result.stderr)
            assert_no_disclosure(result.stderr, secrets=KEYS.values(), where=method)


@pytest.mark.parametrize(
    ("who", "visible"),
    [("monitor", ["chat", "other", "embed"]), ("admin", ["chat", "other", "embed"]),
     ("monitor-chat", ["chat"]), ("admin-chat", ["chat"])],
)  # fmt: skip
def test_watch_models_through_grpcurl_shows_a_keys_models(
    stack: Stack, tmp_path: Path, who: str, visible: list[str]
) -> None:
    # The stream never ends by itself: grpcurl gives up after its first events.
    result = subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "2", *proto_args(tmp_path), "-H",
         f"authorization: Bearer {KEYS[who]}", "-d", "{}", stack.grpc_target,
         _CONTROL + "WatchModels"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Code: DeadlineExceeded" in result.stderr, result.stderr
    first = json.loads(result.stdout[: result.stdout.index("\n}\n") + 2])
    assert [model["alias"] for model in first["fullStatus"]["models"]] == visible


# Transport security


def tls_config(pki: Pki, *, client_ca: bool = False, **extra: Path) -> dict[str, str]:
    files = {"cert_file": pki.server_cert, "key_file": pki.server_key, **extra}
    if client_ca:
        files["client_ca_file"] = pki.ca
    return {name: str(path) for name, path in files.items()}


def trusting(pki: Pki, *, with_cert: bool = False) -> grpc.ChannelCredentials:
    """Credentials to reach a TLS router (presenting the client certificate `with_cert`)."""
    if not with_cert:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )


def facade_config(
    directory: Path, models: Mapping[str, Any], grpc_port: int, **kwargs: Any
) -> Path:
    directory.mkdir()
    return write_config(directory, models, grpc_port=grpc_port, **kwargs)


async def chat_status(base_url: str, ssl_context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None
    async with session_for(base_url, connector=connector) as session:
        status, body, _ = await call(session, "POST", "/v1/chat/completions", CHAT)
    return status, body


async def test_a_tls_router_serves_the_facade_with_the_ca_and_refuses_plaintext(
    tmp_path: Path, tiny_chat: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    models = {"chat": chat_model(tiny_chat)}
    grpc_port, secure_port, plain_port = free_port(), free_port(), free_port()
    router = write_config(
        tmp_path, models, grpc_port=grpc_port, grpc_tls=tls_config(pki, ca_file=pki.ca)
    )
    secure = facade_config(tmp_path / "secure", models, grpc_port, api={"port": secure_port},
                           grpc_tls=tls_config(pki, ca_file=pki.ca))  # fmt: skip
    plain = facade_config(tmp_path / "plain", models, grpc_port, api={"port": plain_port})
    with (
        router_process(router, grpc_port, credentials=trusting(pki)),
        facade_process(secure, secure_port),
        facade_process(plain, plain_port, health=503),
    ):
        status, body = await chat_status(f"http://127.0.0.1:{secure_port}")
        assert status == 200 and body["object"] == "chat.completion"

        status, body = await chat_status(f"http://127.0.0.1:{plain_port}")
        assert status == 503
        assert assert_envelope(status, body)["code"] == "router_unavailable"
        # Refused at once, or left hanging (the TLS handshake waiting for a record the
        # plaintext client never sends) until grpcurl gives up: never served either way.
        plaintext = [GRPCURL, "-plaintext", "-max-time", "2", f"127.0.0.1:{grpc_port}", "list"]
        result = await asyncio.to_thread(
            subprocess.run, plaintext, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0 and "router.v1" not in result.stdout


async def test_mutual_tls_to_the_router_and_https_with_client_certificates(
    tmp_path: Path, tiny_chat: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    models = {"chat": chat_model(tiny_chat)}
    grpc_port, https_port, anonymous_port = free_port(), free_port(), free_port()
    router = write_config(tmp_path, models, grpc_port=grpc_port,
                          grpc_tls=tls_config(pki, client_ca=True))  # fmt: skip
    with_cert = tls_config(pki, ca_file=pki.ca, client_cert_file=pki.client_cert,
                           client_key_file=pki.client_key)  # fmt: skip
    https = facade_config(
        tmp_path / "https", models, grpc_port, grpc_tls=with_cert,
        api={"port": https_port, "tls": tls_config(pki, client_ca=True)},
    )  # fmt: skip
    anonymous = facade_config(tmp_path / "anonymous", models, grpc_port,
                              api={"port": anonymous_port},
                              grpc_tls=tls_config(pki, ca_file=pki.ca))  # fmt: skip
    client = ssl.create_default_context(cafile=pki.ca)
    client.load_cert_chain(pki.client_cert, pki.client_key)
    with (
        router_process(router, grpc_port, credentials=trusting(pki, with_cert=True)),
        facade_process(https, https_port, context=client),
        facade_process(anonymous, anonymous_port, health=503),
    ):
        status, body = await chat_status(f"https://127.0.0.1:{https_port}", client)
        assert status == 200 and body["object"] == "chat.completion"

        # The router wants the facade's client certificate.
        status, body = await chat_status(f"http://127.0.0.1:{anonymous_port}")
        assert status == 503 and assert_envelope(status, body)["code"] == "router_unavailable"

        # The facade wants HTTPS, and the caller's client certificate.
        no_cert = ssl.create_default_context(cafile=pki.ca)
        for url, context in (
            (f"https://127.0.0.1:{https_port}", no_cert),
            (f"http://127.0.0.1:{https_port}", None),
        ):
            with pytest.raises(aiohttp.ClientError):
                await chat_status(url, context)


def test_the_facade_refuses_a_public_address_without_keys(tmp_path: Path, tiny_chat: Path) -> None:
    config = write_config(
        tmp_path, {"chat": chat_model(tiny_chat)}, api={"host": "0.0.0.0", "port": free_port()}
    )
    result = subprocess.run(
        [sys.executable, "-m", "facade", "-c", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert result.returncode != 0
    assert "api.host '0.0.0.0' is not a loopback address" in result.stderr
    assert "auth.api_keys" in result.stderr and "--insecure-listen" in result.stderr


def test_insecure_listen_runs_with_a_warning(tmp_path: Path, tiny_chat: Path) -> None:
    # Each process binds only its own loopback listener here; the other section's non-loopback
    # host (never bound by this process) is what the check sees.
    models = {"chat": chat_model(tiny_chat)}
    grpc_port, http_port = free_port(), free_port()
    router_config = write_config(tmp_path, models, grpc_port=grpc_port, api={"host": "0.0.0.0"})
    facade_dir = tmp_path / "facade"
    facade_dir.mkdir()
    facade_config = write_config(facade_dir, models, grpc_port=grpc_port, api={"port": http_port})
    config = json.loads(facade_config.read_text())
    config["grpc"]["host"] = "0.0.0.0"  # reached on loopback by the facade
    facade_config.write_text(json.dumps(config))
    warning = "--insecure-listen: serving a non-loopback address with no API keys"
    router_log, facade_log = tmp_path / "router.log", tmp_path / "facade.log"
    with router_process(router_config, grpc_port, "--insecure-listen", log=router_log):
        facade = spawn_logged(
            [sys.executable, "-m", "facade", "-c", str(facade_config), "--insecure-listen"],
            facade_log,
        )
        try:
            wait_for_http(f"http://127.0.0.1:{http_port}/health", facade, timeout=20)
        finally:
            stop_process(facade)
    assert warning in router_log.read_text()
    assert warning in facade_log.read_text()
