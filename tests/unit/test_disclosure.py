"""The disclosure check used on every error of the fuzz, fault and soak runs catches leaks."""

from __future__ import annotations

import pytest

from tests.disclosure import disclosures
from tests.helpers import CACHE

LEAKS = [
    "could not load /srv/models/qwen-7b.gguf",
    "failed: model.gguf is not a GGUF file",
    f"reading {CACHE}",
    'Traceback (most recent call last):\n  File "/x.py", line 3, in main',
    "ValueError('bad') in handler",
    "at <router.pool.supervisor.Supervisor object at 0x7f00deadbeef>",
    "0.00.068.204 I srv          init: listening on http://127.0.0.1:36755",
    "llama_model_loader: loaded meta data with 24 key-value pairs",
    "print_info: file type = F16",
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:38889",
    "[Errno 111] Connection refused",
]
CLEAN = [
    "model 'embed' is an embedding model; use /v1/embeddings",
    "the model server failed to process the request",
    "'max_tokens' is 7 but this model allows at most 6",
    "request (2068 tokens) exceeds the available context size (2048 tokens), try increasing it",
    "the router is unavailable",
    "a valid API key is required (Authorization: Bearer <key>)",
]


@pytest.mark.parametrize("text", LEAKS)
def test_a_leak_is_found(text: str) -> None:
    assert disclosures(text)


@pytest.mark.parametrize("text", CLEAN)
def test_a_client_message_passes(text: str) -> None:
    assert disclosures(text) == []


def test_what_the_caller_sent_may_come_back() -> None:
    text = "Invalid URL (POST /srv/x/y)"
    assert disclosures(text)
    assert disclosures(text, echo="/srv/x/y") == []


def test_extra_secrets_are_found() -> None:
    assert disclosures("key sk-123 rejected", secrets=["sk-123"])
