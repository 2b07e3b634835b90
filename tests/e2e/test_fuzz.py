"""Schemathesis against the facade's own `/openapi.json`, with the real stack on the tiny models.

Every operation gets a bounded number of generated requests: valid ones (positive mode), then
invalid ones (negative mode) when the operation takes any input. Hypothesis runs derandomized
(its seed comes from the test itself) without a database, so a run is the same every time.
Every response must be:

* not a 5xx, and within the per-request timeout (no hang);
* when an error (HTTP status or an SSE error frame), OpenAI's envelope disclosing nothing
  internal (the admin bridge answers with the same envelope);
* when a success, what the document says (schemathesis' conformance checks).

The changes to the document are the test's, not the facade's: `model` values are drawn from
the configured aliases plus one unknown name (random strings would only ever meet 404), two
explicit examples make sure a served stream is among the requests, and the endless streams
(the status SSE and other `text/event-stream`-only routes) are left out, because a fuzzed
request must end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.core import NotSet
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.disclosure import assert_no_disclosure
from tests.e2e.stack import Stack, running_stack
from tests.helpers import chat_model, embed_model

ALIASES = ["chat", "embed"]
UNKNOWN = "no-such-model"
# Generated requests per operation and mode: inference routes do the most varied work.
EXAMPLES = {"openai": 100, "admin": 20, "health": 5}
REQUEST_TIMEOUT_SEC = 20
_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path, tiny_embed: Path
) -> Iterator[Stack]:
    models = {
        # A small cap keeps every generated completion short (a longer one is a 400).
        "chat": {**chat_model(tiny_chat), "max_tokens_cap": 16},
        "embed": embed_model(tiny_embed),
    }
    system = {"queue_timeout_sec": 10, "max_embedding_inputs": 64, "max_messages": 64}
    with running_stack(tmp_path_factory.mktemp("fuzz"), models, system=system) as running:
        yield running


def fuzzable(document: dict[str, Any]) -> dict[str, Any]:
    """The facade's document with `model` steered to real aliases and endless streams removed."""
    model = {"type": "string", "enum": [*ALIASES, UNKNOWN]}
    for path, item in list(document["paths"].items()):
        for method, operation in list(item.items()):
            success = operation["responses"].get("200", {}).get("content", {})
            if set(success) == {"text/event-stream"}:
                del item[method]
                continue
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model":
                    parameter["schema"] = dict(model)
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and "model" in body["schema"].get("properties", {}):
                body["schema"]["properties"]["model"] = dict(model)
        if not item:
            del document["paths"][path]
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest"):
        schemas[name]["properties"]["model"] = dict(model)
    # Explicit examples (run first): a served stream for each kind of completion, which random
    # bodies rarely are.
    messages = [{"role": "user", "content": "hello"}]
    schemas["ChatCompletionRequest"]["example"] = {
        "model": "chat", "messages": messages, "max_tokens": 8, "stream": True
    }  # fmt: skip
    schemas["CompletionRequest"]["example"] = {
        "model": "chat", "prompt": "hello", "max_tokens": 8, "stream": True
    }  # fmt: skip
    return document


def sse_errors(text: str) -> list[Any]:
    """The error envelopes sent as SSE frames (`data: {"error": ...}`) in a stream's body."""
    errors = []
    for frame in text.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                payload = json.loads(line[len("data: ") :])
                if "error" in payload:
                    errors.append(payload)
    return errors


def check_error(body: Any, echo: str, where: str) -> str:
    """An error is OpenAI's envelope and discloses nothing; returns its `type`."""
    assert isinstance(body, dict) and set(body) == {"error"}, (where, body)
    error = body["error"]
    assert isinstance(error, dict) and set(error) == _ERROR_KEYS, (where, body)
    assert isinstance(error["message"], str) and error["message"], (where, body)
    assert_no_disclosure(json.dumps(body), echo=echo, where=where)
    return str(error["type"])


def echo_of(case: Case[Any]) -> str:
    """What the caller sent, which an error may reflect back (URL, query, headers, body)."""
    parts = [case.formatted_path, json.dumps(case.query, default=str)]
    parts.append(json.dumps(case.path_parameters, default=str))
    parts.append(json.dumps(case.headers, default=str))
    if not isinstance(case.body, NotSet):
        parts.append(json.dumps(case.body, default=str))
    return "\n".join(parts)


def test_the_facade_survives_its_own_openapi_document(stack: Stack) -> None:
    document = requests.get(stack.base_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(fuzzable(document))
    statuses: Counter[int] = Counter()
    outcomes: Counter[str] = Counter()
    examples = 0
    started = time.monotonic()
    with requests.Session() as session:

        def exercise(case: Case[Any]) -> None:
            nonlocal examples
            examples += 1
            where = f"{case.method} {case.formatted_path}"
            response = case.call(
                base_url=stack.base_url, session=session, timeout=REQUEST_TIMEOUT_SEC
            )
            statuses[response.status_code] += 1
            assert response.status_code < 500, (where, case.body, response.text[:1000])
            if response.status_code >= 400:
                error_type = check_error(response.json(), echo_of(case), where)
                outcomes[f"{response.status_code} {error_type}"] += 1
                return
            if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                errors = sse_errors(response.text)
                for error in errors:
                    outcomes[f"sse {check_error(error, echo_of(case), where)}"] += 1
                outcomes["200 stream" if not errors else "200 stream with error"] += 1
            else:
                outcomes[f"{response.status_code} ok"] += 1
            case.validate_response(
                response,
                checks=[
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result  # the document loads as a whole
            operation = result.ok()
            tag = operation.definition.raw.get("tags", ["admin"])[0]
            # Negative mode needs some input to break; positive always runs.
            has_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
            modes = GenerationMode.from_choice("all" if has_input else "positive")
            for mode in modes:
                run = given(case=operation.as_strategy(generation_mode=mode))(exercise)
                settings(
                    max_examples=EXAMPLES.get(tag, EXAMPLES["admin"]),
                    derandomize=True,
                    database=None,
                    deadline=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )(run)()

    print(
        f"\nfuzz: {examples} requests in {time.monotonic() - started:.1f} s; "
        f"statuses {dict(sorted(statuses.items()))}; outcomes {dict(sorted(outcomes.items()))}"
    )
    assert examples > 200
    assert statuses[200] and statuses[400] and statuses[404] and outcomes["200 stream"]
