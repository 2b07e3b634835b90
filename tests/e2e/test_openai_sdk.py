"""The official openai SDK against real router + facade processes and embedded llama-servers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.stack import Stack, get_json, post_json, running_stack
from tests.helpers import chat_model, embed_model

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world the router"}]
ALIASES = ["chat", "embed", "slow", "broken"]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path, tiny_embed: Path, slow_chat: Path
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("sdk")
    broken = directory / "broken.gguf"
    broken.write_bytes(b"not a GGUF file")
    models = {
        "chat": chat_model(tiny_chat, parallel_override=2),
        "embed": embed_model(tiny_embed),
        "slow": chat_model(slow_chat, parallel_override=1),
        "broken": chat_model(broken),
    }
    system = {"max_queue_size_per_model": 1, "queue_timeout_sec": 1}
    with running_stack(directory, models, system=system) as running:
        yield running


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def async_client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


# Chat and completions


def test_chat_non_stream(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="chat",
        messages=PROMPT,
        max_tokens=8,
        temperature=0,
    )

    assert completion.model == "chat"
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="chat",
        messages=PROMPT,
        max_tokens=12,
        temperature=0,
    )
    stream = client.chat.completions.create(
        model="chat",
        messages=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )

    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert {chunk.model for chunk in chunks} == {"chat"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="chat", prompt="hello world", max_tokens=6, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="chat", prompt="hello world", max_tokens=6, temperature=0, stream=True
        )
    )

    assert whole.object == "text_completion" and whole.model == "chat"
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == (
        whole.choices[0].text
    )


async def test_async_client_chat_and_completions(stack: Stack) -> None:
    async with async_client(stack) as sdk:
        completion = await sdk.chat.completions.create(
            model="chat",
            messages=PROMPT,
            max_tokens=5,
            temperature=0,
        )
        stream = await sdk.chat.completions.create(
            model="chat",
            messages=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        legacy = await sdk.completions.create(model="chat", prompt="the", max_tokens=3)

    assert text == completion.choices[0].message.content
    assert legacy.usage is not None and legacy.usage.completion_tokens == 3


async def test_async_client_lists_models_and_raises_not_found(stack: Stack) -> None:
    async with async_client(stack) as sdk:
        listed = await sdk.models.list()
        with pytest.raises(openai.NotFoundError) as unknown_chat:
            await sdk.chat.completions.create(model="nope", messages=PROMPT)
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("nope")
        with pytest.raises(openai.NotFoundError):
            await sdk.embeddings.create(model="nope", input="hi")

    assert [model.id for model in listed.data] == ALIASES
    assert unknown_chat.value.status_code == 404
    assert unknown_chat.value.code == "model_not_found"


# Embeddings and models


def test_embeddings_of_one_text_and_a_batch(client: openai.OpenAI) -> None:
    # The SDK asks for base64 and decodes it itself unless a format is given.
    single = client.embeddings.create(model="embed", input="hello world")
    batch = client.embeddings.create(
        model="embed", input=["hello world", "the cat"], encoding_format="float"
    )

    assert single.model == "embed" and len(single.data) == 1
    assert len(single.data[0].embedding) == 64
    assert [item.index for item in batch.data] == [0, 1]
    assert batch.data[0].embedding == pytest.approx(single.data[0].embedding, abs=1e-6)
    assert sum(v * v for v in batch.data[1].embedding) == pytest.approx(1.0, abs=1e-3)
    assert batch.usage.prompt_tokens > 0
    assert batch.usage.total_tokens == batch.usage.prompt_tokens


async def test_async_embeddings_of_token_ids(stack: Stack) -> None:
    async with async_client(stack) as sdk:
        result = await sdk.embeddings.create(model="embed", input=[[1, 50, 60], [70, 80]])

    assert len(result.data) == 2 and len(result.data[1].embedding) == 64


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listed = client.models.list()
    chat = client.models.retrieve("chat")

    assert [model.id for model in listed.data] == ALIASES
    assert {model.owned_by for model in listed.data} == {"routermodel"}
    assert chat.id == "chat" and chat.created > 1_600_000_000
    extra = chat.model_extra or {}
    assert extra["n_ctx"] == 4096 and extra["kind"] == "chat"


# Errors arrive as the SDK's classes


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=PROMPT)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")

    assert raised.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"model": "chat", "messages": []}, None),
        ({"model": "embed", "messages": PROMPT}, "wrong_model_kind"),
        (
            {"model": "chat", "messages": [{"role": "user", "content": "hello " * 5000}]},
            "context_length_exceeded",
        ),
    ],
    ids=["no-messages", "embedding-model", "context-too-long"],
)
def test_bad_requests_are_bad_request_errors(
    client: openai.OpenAI, kwargs: dict[str, object], code: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**kwargs)  # type: ignore[call-overload]

    assert raised.value.code == code


def test_embeddings_from_a_chat_model_are_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="chat", input="hi")

    assert raised.value.code == "wrong_model_kind"


def test_a_model_that_fails_to_load_is_503_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="broken", messages=PROMPT)

    assert raised.value.status_code == 503
    assert int(raised.value.response.headers["Retry-After"]) >= 1
    assert raised.value.type == "server_error"


def wait_for_waiters(stack: Stack, model: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, stats = get_json(f"{stack.base_url}/v1/queue/stats")
        if status == 200 and stats["per_model"][model]["queue_length"] == count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{model} never had {count} waiting")


def test_a_full_queue_is_429_and_a_queue_timeout_504(stack: Stack, client: openai.OpenAI) -> None:
    assert post_json(f"{stack.base_url}/v1/models/slow/load", {"wait": True})[0] == 200
    busy = client.chat.completions.create(
        model="slow",
        messages=PROMPT,
        max_tokens=3000,
        stream=True,
    )
    try:
        next(iter(busy))  # the only slot is taken
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                lambda: client.chat.completions.create(model="slow", messages=PROMPT, max_tokens=1)
            )
            wait_for_waiters(stack, "slow", 1)  # the waiter takes the one queue place
            with pytest.raises(openai.RateLimitError) as full:
                client.chat.completions.create(
                    model="slow",
                    messages=PROMPT,
                    max_tokens=1,
                )
            with pytest.raises(openai.InternalServerError) as timed_out:
                waiting.result(timeout=10)
    finally:
        busy.close()

    assert full.value.code == "queue_full"
    assert int(full.value.response.headers["Retry-After"]) >= 1
    assert timed_out.value.status_code == 504 and timed_out.value.code == "queue_timeout"


# Cancellation


async def test_a_client_leaving_a_stream_frees_the_slot_at_once(stack: Stack) -> None:
    body = {"model": "slow", "messages": PROMPT, "max_tokens": 3000, "stream": True}
    async with aiohttp.ClientSession(stack.base_url) as session:

        async def in_flight() -> int:
            async with session.get("/v1/models/status/slow") as status:
                count: int = (await status.json())["model"]["in_flight"]
                return count

        async with session.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert (await response.content.readuntil(b"\n\n")).startswith(b"data: {")
            assert await in_flight() == 1
            response.close()
        left = time.monotonic()

        while await in_flight() != 0:
            assert time.monotonic() - left < 1.0, "the slot was not freed within 1 s"
            await asyncio.sleep(0.02)

        # The one slot serves the next request at once.
        started = time.monotonic()
        async with session.post("/v1/chat/completions", json=body) as response:
            await response.content.readuntil(b"\n\n")
            first_chunk = time.monotonic() - started
    assert first_chunk < 1.0


# With API keys


INFERENCE_KEY = "sdk-inference-key-0123456789"  # may use "chat" only
MONITOR_KEY = "sdk-monitor-key-0123456789"


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("sdk-keys")
    models = {"chat": chat_model(tiny_chat), "other": chat_model(tiny_chat)}
    keys = [
        {"key": INFERENCE_KEY, "scopes": ["inference"], "models": ["chat"]},
        {"key": MONITOR_KEY, "scopes": ["monitor"]},
    ]
    with running_stack(directory, models, auth={"api_keys": keys}) as running:
        yield running


def keyed_client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0)


def test_keys_a_wrong_key_is_an_authentication_error(keyed_stack: Stack) -> None:
    with keyed_client(keyed_stack, "not-a-configured-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as chat:
            sdk.chat.completions.create(model="chat", messages=PROMPT, max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
        with pytest.raises(openai.AuthenticationError):
            sdk.embeddings.create(model="chat", input="hi")

    assert chat.value.status_code == 401
    assert chat.value.type == "authentication_error" and chat.value.code == "invalid_api_key"


def test_keys_a_missing_scope_is_a_permission_error(keyed_stack: Stack) -> None:
    # A monitor key may read status but not generate.
    with keyed_client(keyed_stack, MONITOR_KEY) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as generate:
            sdk.chat.completions.create(model="chat", messages=PROMPT, max_tokens=1)
        listed = sdk.models.list()
    # An inference key may not ask for HIGH priority unless allowed to.
    with keyed_client(keyed_stack, INFERENCE_KEY) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as high:
            sdk.chat.completions.create(
                model="chat",
                messages=PROMPT,
                max_tokens=1,
                extra_headers={"X-Request-Priority": "high"},
            )

    assert generate.value.status_code == 403
    assert generate.value.type == "permission_error"
    assert generate.value.code == "permission_denied"
    assert [model.id for model in listed.data] == ["chat", "other"]
    assert high.value.status_code == 403 and high.value.code == "permission_denied"


def test_keys_a_restricted_key_sees_and_uses_only_its_models(keyed_stack: Stack) -> None:
    with keyed_client(keyed_stack, INFERENCE_KEY) as sdk:
        listed = sdk.models.list()
        answer = sdk.chat.completions.create(model="chat", messages=PROMPT, max_tokens=2)
        # Another model is as unknown to this key as a model that does not exist.
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="other", messages=PROMPT, max_tokens=1)

    assert [model.id for model in listed.data] == ["chat"]
    assert answer.usage is not None and answer.usage.completion_tokens == 2
