"""Fidelity: through the facade, a temperature-0 response equals llama-server's own.

The reference is a second embedded llama-server started with exactly the command line the
router gave its child (read from /proc), on another port. Both get the same requests; the
answers must match field by field except `id`, `created` and `timings` (per request), chunk
by chunk when streamed. Embedding vectors are compared at float precision: llama-server
computes float32 and the router carries them as `repeated float`.
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stack import Stack, get_json, post_json, running_stack, stop_process, wait_for_http
from tests.helpers import REPO, chat_model, embed_model, fake_server, free_port

VARYING = ("id", "created", "timings")
MESSAGES = [{"role": "user", "content": "hello world the router"}]
# cache_prompt off: otherwise the cached share of the prompt depends on each server's history.
SAMPLING = {"temperature": 0, "max_tokens": 16, "seed": 3, "cache_prompt": False}

CASES = [
    pytest.param("/v1/chat/completions", {"messages": MESSAGES}, id="chat"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": MESSAGES, "stop": [" the"], "logprobs": True, "top_logprobs": 2},
        id="chat-stop-logprobs",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                    },
                }
            ],
        },
        id="chat-tools",
    ),
    pytest.param("/v1/completions", {"prompt": "hello world"}, id="completion"),
]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path, tiny_embed: Path
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("fidelity")
    models = {"chat": chat_model(tiny_chat, parallel_override=2), "embed": embed_model(tiny_embed)}
    # No spare launcher: the reference server copies a child's command line from /proc, and a
    # child that was the spare got its flags on stdin (its command line does not show them).
    with running_stack(directory, models, system={"spare_launcher": False}) as running:
        yield running


@pytest.fixture(scope="module")
def reference(stack: Stack) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of a llama-server started like the router's chat child."""
    with started_like_child(stack, "chat") as running:
        yield running


@pytest.fixture(scope="module")
def embed_reference(stack: Stack) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of a llama-server started like the router's embedding child."""
    with started_like_child(stack, "embed") as running:
        yield running


@contextlib.contextmanager
def started_like_child(stack: Stack, alias: str) -> Iterator[tuple[str, str]]:
    """Load `alias` and start a second llama-server with its child's exact command line."""
    status, loaded = post_json(f"{stack.base_url}/v1/models/{alias}/load", {"wait": True})
    assert status == 200, loaded
    argv = Path(f"/proc/{loaded['model']['pid']}/cmdline").read_bytes().split(b"\0")[:-1]
    command = [arg.decode() for arg in argv]
    if Path(command[0]).name == "setpriv":  # the death-signal wrapper: keep what it runs
        command = command[command.index("--") + 1 :]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    api_key = Path(command[command.index("--api-key-file") + 1]).read_text().strip()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout=20)
        yield f"http://127.0.0.1:{port}", api_key
    finally:
        stop_process(process)


def send(url: str, body: dict[str, Any], api_key: str = "", status: int = 200) -> bytes:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answered, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        answered, payload = error.code, error.read()
    assert answered == status, payload
    return bytes(payload)


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key not in VARYING}


def sse_payloads(body: bytes) -> list[str]:
    events = [event for event in body.decode().split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


@pytest.mark.parametrize(("path", "extra"), CASES)
def test_a_response_equals_llama_servers_own(
    stack: Stack, reference: tuple[str, str], path: str, extra: dict[str, Any]
) -> None:
    body = {"model": "chat", **SAMPLING, **extra}
    direct_url, api_key = reference

    ours = json.loads(send(stack.base_url + path, body))
    theirs = json.loads(send(direct_url + path, body, api_key))

    assert ours["model"] == "chat"
    assert comparable(ours) == comparable(theirs)
    assert set(ours) == set(theirs)


@pytest.mark.parametrize(("path", "extra"), CASES)
@pytest.mark.parametrize("usage", [False, True], ids=["", "include-usage"])
def test_a_stream_equals_llama_servers_own_chunk_by_chunk(
    stack: Stack, reference: tuple[str, str], path: str, extra: dict[str, Any], usage: bool
) -> None:
    body = {"model": "chat", **SAMPLING, **extra, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    direct_url, api_key = reference

    ours = sse_payloads(send(stack.base_url + path, body))
    theirs = sse_payloads(send(direct_url + path, body, api_key))

    assert ours[-1] == theirs[-1] == "[DONE]"
    assert len(ours) == len(theirs) > 3
    for mine, original in zip(ours[:-1], theirs[:-1], strict=True):
        assert comparable(json.loads(mine)) == comparable(json.loads(original))
    assert {json.loads(chunk)["model"] for chunk in ours[:-1]} == {"chat"}


def test_a_refusal_carries_llama_servers_message(stack: Stack, reference: tuple[str, str]) -> None:
    # The tiny vocabulary cannot build a JSON grammar, so llama-server refuses the request.
    body = {
        "model": "chat",
        **SAMPLING,
        "messages": MESSAGES,
        "response_format": {"type": "json_object"},
    }
    direct_url, api_key = reference

    ours = json.loads(send(stack.base_url + "/v1/chat/completions", body, status=400))
    theirs = json.loads(send(direct_url + "/v1/chat/completions", body, api_key, status=400))

    assert ours["error"]["message"] == theirs["error"]["message"]
    assert ours["error"]["type"] == theirs["error"]["type"] == "invalid_request_error"


def test_the_model_ids_agree(stack: Stack, reference: tuple[str, str]) -> None:
    direct_url, api_key = reference
    request = urllib.request.Request(
        direct_url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        theirs = json.loads(response.read())

    status, ours = get_json(f"{stack.base_url}/v1/models")

    assert status == 200
    # The child reports its --alias; the facade lists every configured model, chat among them.
    assert [m["id"] for m in theirs["data"]] == ["chat"]
    assert [model["id"] for model in ours["data"]] == ["chat", "embed"]


EMBED_INPUTS = ["hello world", "the router batches inputs", "x"]


def as_float32(vector: list[float]) -> list[float]:
    """`vector` rounded to float32, the precision llama-server computes and the router carries."""
    return list(struct.unpack(f"{len(vector)}f", struct.pack(f"{len(vector)}f", *vector)))


def test_embeddings_equal_llama_servers_own(stack: Stack, embed_reference: tuple[str, str]) -> None:
    body = {"model": "embed", "input": EMBED_INPUTS}
    direct_url, api_key = embed_reference

    ours = json.loads(send(stack.base_url + "/v1/embeddings", body))
    theirs = json.loads(send(direct_url + "/v1/embeddings", body, api_key))

    assert ours["model"] == theirs["model"] == "embed"
    assert ours["usage"] == theirs["usage"]
    assert ours["usage"]["prompt_tokens"] > len(EMBED_INPUTS)  # counted, not one per input
    assert [d["index"] for d in ours["data"]] == [0, 1, 2]
    assert len(ours["data"]) == len(theirs["data"]) == len(EMBED_INPUTS)
    for mine, original in zip(ours["data"], theirs["data"], strict=True):
        assert {k: v for k, v in mine.items() if k != "embedding"} == {
            k: v for k, v in original.items() if k != "embedding"
        }
        assert all(type(x) is float for x in mine["embedding"])
        assert as_float32(mine["embedding"]) == as_float32(original["embedding"])
    # Different inputs, different vectors: the comparison above is not between constants.
    assert ours["data"][0]["embedding"] != ours["data"][1]["embedding"]
    assert set(ours) == set(theirs)


def test_an_embeddings_batch_is_one_upstream_call(tmp_path: Path, tiny_embed: Path) -> None:
    """Three inputs reach the child in one POST (the seed sent one request per input)."""
    stats = tmp_path / "stats.json"
    server = fake_server(tmp_path, f"--stats-file {stats}")
    with running_stack(
        tmp_path, {"embed": embed_model(tiny_embed)}, system={"llama_server_path": server}
    ) as running:
        status, answer = post_json(
            f"{running.base_url}/v1/embeddings", {"model": "embed", "input": EMBED_INPUTS}
        )
        assert status == 200, answer
        counted = json.loads(stats.read_text())
    assert counted["requests"] == 1
    assert counted["embedding_inputs"] == [len(EMBED_INPUTS)]
    # The fake's vectors are [len(input), index, 1]: each answer came from that one call.
    assert [d["embedding"] for d in answer["data"]] == [
        [float(len(text)), float(i), 1.0] for i, text in enumerate(EMBED_INPUTS)
    ]
