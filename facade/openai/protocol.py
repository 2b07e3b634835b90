"""Validation of OpenAI request bodies: only what the facade needs, the rest is llama-server's.

Chat and text completion bodies are checked for the fields the router routes on (`model`,
`stream`), the few whose absence llama-server would report less clearly (`messages`,
`prompt`), and the shapes llama-server fails on with a 500 instead of a 400 (a message without
a string `role`, a text part without `text`, a tool or tool call without its type, function and
name, both `grammar` and `json_schema`; image or audio parts for a model without a projector
are the router's to refuse, since only it knows the model); the original text then travels
unchanged, so tools, response_format, logprobs, stop,
seed and stream_options reach llama-server exactly as sent. Embedding bodies are read fully,
because the router takes their inputs as typed lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from clients import GenerateKind
from facade.context import json_object
from facade.errors import ApiError

__all__ = [
    "EmbeddingRequest",
    "EncodingFormat",
    "GenerationRequest",
    "parse_embedding_request",
    "parse_generation_request",
]

EncodingFormat = Literal["float", "base64"]

# Token ids travel as int32 in EmbedRequest.
_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated chat or text completion: the routing fields, and the body as received."""

    model: str
    stream: bool
    body: str


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A validated embeddings request: texts or token id lists, never both."""

    model: str
    inputs: list[str] | list[list[int]]
    encoding_format: EncodingFormat


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise _invalid("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _invalid("'model' must be a string", "model")
    return _text(model, "'model'", "model")


def _text(value: str, what: str, param: str) -> str:
    """`value` if it can travel as UTF-8: JSON's "\ud800" escape decodes to a lone surrogate,
    which no protobuf string (nor llama-server) accepts."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _invalid(f"{what} contains an unpaired UTF-16 surrogate", param) from None
    return value


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean", "stream")
    return stream


def parse_generation_request(text: str, kind: GenerateKind) -> GenerationRequest:
    """Check a chat (`kind` "chat") or text completion body; `ApiError` 400 names the field."""
    body = json_object(text)
    model, stream = _model(body), _stream(body)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty array", "messages")
        if not all(isinstance(message, dict) for message in messages):
            raise _invalid("every item of 'messages' must be an object", "messages")
        for message in messages:
            _check_message(message)
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise _invalid("'tools' must be an array", "tools")
            for tool in tools:
                _check_function(tool, "tools", "a tool")
    elif body.get("prompt") is None:
        raise _invalid("you must provide a prompt parameter", "prompt")
    if body.get("grammar") is not None and body.get("json_schema") is not None:
        raise _invalid("'grammar' and 'json_schema' each constrain the output: not both", "grammar")
    return GenerationRequest(model, stream, text)


# Fields llama-server reads as strings when present (null included): another type is a 500.
_MESSAGE_STRINGS = ("name", "tool_call_id", "reasoning_content")


def _check_message(message: dict[str, Any]) -> None:
    if not isinstance(message.get("role"), str):
        raise _invalid("every message must have a string 'role'", "messages")
    _check_strings(message, _MESSAGE_STRINGS, "a message")
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                raise _invalid("every content part must be an object", "messages")
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise _invalid("a text content part must have a string 'text'", "messages")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _invalid("'tool_calls' must be an array", "messages")
        for call in calls:
            _check_function(call, "messages", "a tool call")
            _check_strings(call, ("id",), "a tool call", "messages")
            if "arguments" not in call["function"]:
                raise _invalid("a tool call's function must have 'arguments'", "messages")


def _check_function(item: object, param: str, what: str) -> None:
    """A tool or tool call: `{"type": "function", "function": {"name": "...", ...}}`."""
    if not isinstance(item, dict) or item.get("type") != "function":
        raise _invalid(f"{what} must be an object of type 'function'", param)
    function = item.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _invalid(f"{what} must have a 'function' object with a string 'name'", param)
    _check_strings(function, ("description",), f"{what}'s function", param)


def _check_strings(
    item: dict[str, Any], names: tuple[str, ...], what: str, param: str = "messages"
) -> None:
    for name in names:
        if name in item and not isinstance(item[name], str):
            raise _invalid(f"{what}'s '{name}' must be a string", param)


def parse_embedding_request(text: str) -> EmbeddingRequest:
    """Check an embeddings body: `input` is a string, strings, token ids or token id lists."""
    body = json_object(text)
    model = _model(body)
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise _invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return EmbeddingRequest(model, _inputs(body.get("input")), encoding_format)


def _inputs(value: object) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _invalid(
            "'input' must be a non-empty string, array of strings, array of token ids or "
            "array of token id arrays",
            "input",
        )
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise _invalid("'input' must not contain empty strings", "input")
        return [_text(item, "'input'", "input") for item in value]
    if all(_is_token_id(item) for item in value):
        return [value]
    if all(isinstance(item, list) and item and all(map(_is_token_id, item)) for item in value):
        return value
    raise _invalid(
        "'input' items must all be strings, all token ids (integers), or all non-empty arrays "
        "of token ids",
        "input",
    )


def _is_token_id(value: object) -> bool:
    # bool is an int subclass; JSON true is not a token id.
    return type(value) is int and 0 <= value <= _MAX_TOKEN_ID
