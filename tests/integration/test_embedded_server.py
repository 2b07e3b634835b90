"""`python -m router.embedded` as a real process: llama-server's HTTP API on the tiny models."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.embedded_helpers import (
    HOST,
    EmbeddedServer,
    embedded_server,
    get_json,
    post_json,
    spawn_embedded,
    sse_data,
    wait_for_log,
    wait_healthy,
)

SERVER_FLAGS = ("--kv-unified", "-np", "2", "-t", "1", "-c", "4096")


@pytest.fixture(scope="module")
def chat_server(
    tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    log = tmp_path_factory.mktemp("embedded-chat") / "server.log"
    with embedded_server(tiny_chat, *SERVER_FLAGS, log_path=log) as server:
        yield server


def chat_body(prompt: str, max_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def test_ready_server_announces_its_address(chat_server: EmbeddedServer) -> None:
    wait_for_log(chat_server, rf"^listening on http://{re.escape(HOST)}:{chat_server.port}\n")
    assert get_json(chat_server.port, "/health") == (200, {"status": "ok"})


def test_streamed_chat_sends_one_data_chunk_per_token_then_done(
    chat_server: EmbeddedServer,
) -> None:
    events = sse_data(
        chat_server.port, "/v1/chat/completions", chat_body("hello world", 16, stream=True)
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert len(chunks) >= 16
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text.isascii()
    assert len(text.split()) >= 8


def test_greedy_answer_is_plain_varied_words_and_exactly_max_tokens_long(
    chat_server: EmbeddedServer,
) -> None:
    status, reply = post_json(
        chat_server.port, "/v1/chat/completions", chat_body("the cat is on the tree", 32)
    )
    assert status == 200, reply
    text = reply["choices"][0]["message"]["content"]
    assert text.isascii()
    assert len(set(text.split())) >= 3
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 32


def test_greedy_answer_repeats_for_the_same_request(chat_server: EmbeddedServer) -> None:
    replies = [
        post_json(chat_server.port, "/v1/chat/completions", chat_body("big moon", 12))[1]
        for _ in range(2)
    ]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embedding_batch_returns_one_vector_per_input_in_order(
    tiny_embed: Path, tmp_path: Path
) -> None:
    texts = ["hello world", "the cat sat on the tree", "moon"]
    with embedded_server(
        tiny_embed, "--embedding", *SERVER_FLAGS, log_path=tmp_path / "server.log"
    ) as server:
        status, batch = post_json(server.port, "/v1/embeddings", {"input": texts})
        assert status == 200, batch
        singles = [post_json(server.port, "/v1/embeddings", {"input": t})[1] for t in texts]

    vectors = [item["embedding"] for item in batch["data"]]
    assert [item["index"] for item in batch["data"]] == [0, 1, 2]
    assert [len(v) for v in vectors] == [64, 64, 64]
    for vector, single in zip(vectors, singles, strict=True):
        assert cosine(vector, single["data"][0]["embedding"]) > 0.999
    assert cosine(vectors[0], vectors[1]) < 0.99


def test_api_key_guards_the_api_but_not_health(tiny_chat: Path, tmp_path: Path) -> None:
    with embedded_server(
        tiny_chat, "--api-key", "K", *SERVER_FLAGS, log_path=tmp_path / "server.log"
    ) as server:
        assert get_json(server.port, "/v1/models")[0] == 401
        assert get_json(server.port, "/v1/models", {"Authorization": "Bearer nope"})[0] == 401
        status, models = get_json(server.port, "/v1/models", {"Authorization": "Bearer K"})
        assert status == 200
        assert models["data"][0]["id"] == str(tiny_chat)
        assert get_json(server.port, "/health")[0] == 200


def test_sigterm_exits_with_status_zero_within_two_seconds(tiny_chat: Path, tmp_path: Path) -> None:
    with embedded_server(tiny_chat, *SERVER_FLAGS, log_path=tmp_path / "server.log") as server:
        post_json(server.port, "/v1/chat/completions", chat_body("hello", 4))
        os.kill(server.process.pid, signal.SIGTERM)
        started = time.monotonic()
        assert server.process.wait(timeout=2) == 0
        assert time.monotonic() - started < 2


def assert_exits_one_quickly(server: EmbeddedServer, reason: str) -> None:
    try:
        assert server.process.wait(timeout=10) == 1
        assert reason in server.log()
    finally:
        server.kill()


def test_missing_model_file_exits_one_without_hanging(tmp_path: Path) -> None:
    server = spawn_embedded(tmp_path / "absent.gguf", log_path=tmp_path / "server.log")
    assert_exits_one_quickly(server, "error: model file not found")


def test_file_that_is_not_a_model_exits_one_without_hanging(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))
    server = spawn_embedded(junk, log_path=tmp_path / "server.log")
    assert_exits_one_quickly(server, "error: server did not start")


def test_busy_port_exits_one_without_hanging(tiny_chat: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        server = spawn_embedded(
            tiny_chat, log_path=tmp_path / "server.log", port=taken.getsockname()[1]
        )
        assert_exits_one_quickly(server, "error: server did not start")


def test_zero_port_serves_on_the_announced_ephemeral_port(tiny_chat: Path, tmp_path: Path) -> None:
    server = spawn_embedded(tiny_chat, log_path=tmp_path / "server.log", port=0)
    try:
        # Not anchored: llama.cpp threads may leave a partial line just before it.
        server.port = int(wait_for_log(server, r"listening on http://[\d.]+:(\d+)\n").group(1))
        assert server.port != 0
        wait_healthy(server)
    finally:
        server.kill()
