"""`GET /openapi.json`: an OpenAPI 3.0 description of every facade route.

The OpenAI routes are described by hand (the parts of OpenAI's schemas the facade and
llama-server act on; other members pass through). The admin routes are generated from the same
descriptors and bindings the bridge mounts, so the document cannot drift from the routes:
request and response bodies are the messages' proto-JSON (proto field names, enums as names,
64-bit integers as strings, timestamps as RFC 3339 strings).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web
from google.protobuf import descriptor

from facade import metrics, status
from facade.bridge import Binding, bindings, field_at, query_fields

__all__ = ["SSE_EVENT", "build_openapi", "setup_routes"]

Schema = dict[str, Any]
FieldDescriptor = descriptor.FieldDescriptor

_REF = "#/components/schemas/"
_ERROR = {"$ref": _REF + "ErrorResponse"}
# Before OpenAPI 3.2, the schema of a `text/event-stream` response describes one event (how
# schemathesis reads it too): its fields, each a string.
SSE_EVENT: Final[Schema] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
    },
}

_INT32_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SFIXED32,
}
_UINT32_TYPES = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
_WELL_KNOWN: Final[dict[str, Schema]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
}


def setup_routes(app: web.Application) -> None:
    """Serve the document, built once, at `GET /openapi.json`."""
    text = json.dumps(build_openapi(), separators=(",", ":"))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="application/json")

    app.router.add_route("GET", "/openapi.json", openapi_json)


def build_openapi(admin: Iterable[Binding] | None = None) -> dict[str, Any]:
    """The whole document; `admin` defaults to the bridge's bindings."""
    schemas = dict(_OPENAI_SCHEMAS)
    paths: dict[str, dict[str, Any]] = {}
    by_hand = {**_openai_paths(), **metrics.openapi_paths(), **status.openapi_paths()}
    for path, operations in by_hand.items():
        paths.setdefault(path, {}).update(operations)
    seen: dict[str, int] = {}
    for binding in bindings() if admin is None else admin:
        operation_id = binding.method.name
        seen[operation_id] = seen.get(operation_id, 0) + 1
        if seen[operation_id] > 1:
            operation_id += f"_{seen[operation_id]}"
        operation = _admin_operation(binding, operation_id, schemas)
        paths.setdefault(binding.path, {})[binding.http_method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "RouterModel facade",
            "version": importlib.metadata.version("routermodel"),
            "description": "OpenAI-compatible inference and the router's admin API over REST/SSE.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }


# ---------------------------------------------------------------------------------------------
# Admin routes, from descriptors


def _admin_operation(binding: Binding, operation_id: str, schemas: dict[str, Schema]) -> Schema:
    method = binding.method
    operation: Schema = {
        "operationId": operation_id,
        "tags": ["admin"],
        "summary": f"{method.containing_service.name}.{method.name}",
        "parameters": _admin_parameters(binding),
        "responses": _admin_responses(binding, schemas),
    }
    if binding.body:
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": _body_schema(binding, schemas)}},
        }
    return operation


def _admin_parameters(binding: Binding) -> list[Schema]:
    fields = binding.method.input_type.fields_by_name
    parameters: list[Schema] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {
                **_field_value_schema(field_at(binding.method.input_type, field_path), {}),
                "pattern": "^[^/]+$",
            },
        }
        for name, field_path in binding.path_fields
    ]
    for name in query_fields(binding):
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": _field_schema(fields[name], {}),
            }
        )
    if binding.streaming and "last_event_id" in fields:
        parameters.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this event id (what EventSource sends).",
                "schema": {"type": "string"},
            }
        )
    return parameters


def _body_schema(binding: Binding, schemas: dict[str, Schema]) -> Schema:
    message = binding.method.input_type
    if binding.body == "*":
        return _message_schema(message, schemas, for_request=True)
    return _field_schema(message.fields_by_name[binding.body], schemas, for_request=True)


def _admin_responses(binding: Binding, schemas: dict[str, Schema]) -> Schema:
    if binding.streaming:
        success = {
            "description": "Server-sent events: `event:` names the response's set oneof field, "
            "`data:` is that field as proto-JSON (on /v1/models/status/stream, the seed's own "
            "payloads instead), `id:` resumes the stream.",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    else:
        reference = _reference(binding.method.output_type, schemas)
        success = {"description": "OK", "content": {"application/json": {"schema": reference}}}
    return {"200": success, **_error_responses(400, 401, 403, 404, 429, 500, 503, 504)}


def _reference(message: descriptor.Descriptor, schemas: dict[str, Schema]) -> Schema:
    if message.full_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[message.full_name])
    if message.full_name not in schemas:
        schemas[message.full_name] = {}  # placeholder: breaks cycles
        schemas[message.full_name] = _message_schema(message, schemas, for_request=False)
    return {"$ref": _REF + message.full_name}


def _message_schema(
    message: descriptor.Descriptor, schemas: dict[str, Schema], *, for_request: bool
) -> Schema:
    """A response lists every field without presence as required (always printed); a request
    body may omit any field."""
    properties = {
        field.name: _field_schema(field, schemas, for_request=for_request)
        for field in message.fields
    }
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    required = [field.name for field in message.fields if not field.has_presence]
    if required and not for_request:
        schema["required"] = required
    return schema


def _field_schema(
    field: FieldDescriptor, schemas: dict[str, Schema], *, for_request: bool = False
) -> Schema:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        value = message.fields_by_name["value"]
        return {
            "type": "object",
            "additionalProperties": _field_value_schema(value, schemas, for_request=for_request),
        }
    value_schema = _field_value_schema(field, schemas, for_request=for_request)
    if field.is_repeated:
        return {"type": "array", "items": value_schema}
    return value_schema


def _field_value_schema(
    field: FieldDescriptor, schemas: dict[str, Schema], *, for_request: bool = False
) -> Schema:
    message = field.message_type
    if message is not None:
        if for_request:
            if message.full_name in _WELL_KNOWN:
                return dict(_WELL_KNOWN[message.full_name])
            return _message_schema(message, schemas, for_request=True)
        return _reference(message, schemas)
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    return _scalar_schema(field.type)


def _scalar_schema(field_type: int) -> Schema:
    if field_type in _INT32_TYPES:
        return {"type": "integer", "format": "int32"}
    if field_type in _UINT32_TYPES:
        return {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
    if field_type in _INT64_TYPES:
        return {"type": "string", "pattern": "^-?[0-9]+$"}
    if field_type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return {"type": "number"}
    if field_type == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if field_type == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "format": "byte"}
    return {"type": "string"}


def _error_responses(*statuses: int) -> Schema:
    return {
        str(status): {
            "description": _STATUS_TEXT[status],
            "content": {"application/json": {"schema": _ERROR}},
        }
        for status in statuses
    }


_STATUS_TEXT: Final = {
    400: "Invalid request",
    401: "Missing or bad API key",
    403: "The key lacks the scope",
    404: "Unknown model or route",
    413: "Body too large",
    429: "Queue full or rate limited (see Retry-After)",
    500: "Internal error",
    503: "Model or router unavailable (see Retry-After)",
    504: "Queue wait or deadline exceeded",
}


# ---------------------------------------------------------------------------------------------
# OpenAI routes, by hand


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


_REQUEST_HEADERS: Final[list[Schema]] = [
    {
        "name": "X-Request-Priority",
        "in": "header",
        "required": False,
        "description": "Queue priority (case-insensitive); anything else is a 400.",
        "schema": {"type": "string", "enum": ["high", "normal", "low"]},
    },
    {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "Echoed back and sent to the router when 1-128 visible ASCII "
        "characters; otherwise a new id is made.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"},
    },
]


def _inference_operation(
    operation_id: str, summary: str, request_schema: str, response_schema: str
) -> Schema:
    return {
        "operationId": operation_id,
        "tags": ["openai"],
        "summary": summary,
        "parameters": _REQUEST_HEADERS,
        "requestBody": {"required": True, "content": _json({"$ref": _REF + request_schema})},
        "responses": {
            "200": {
                "description": "The response; with `stream: true`, server-sent `data:` frames "
                "of OpenAI chunks ending with `data: [DONE]`.",
                "content": {
                    **_json({"$ref": _REF + response_schema}),
                    "text/event-stream": {"schema": SSE_EVENT},
                },
            },
            **_error_responses(400, 401, 403, 404, 413, 429, 500, 503, 504),
        },
    }


def _openai_paths() -> dict[str, dict[str, Schema]]:
    model_parameter = {
        "name": "model",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[^/]+$"},
    }
    return {
        "/v1/chat/completions": {
            "post": _inference_operation(
                "createChatCompletion", "Chat completion", "ChatCompletionRequest", "ChatCompletion"
            )
        },
        "/v1/completions": {
            "post": _inference_operation(
                "createCompletion", "Text completion", "CompletionRequest", "Completion"
            )
        },
        "/v1/embeddings": {
            "post": {
                "operationId": "createEmbedding",
                "tags": ["openai"],
                "summary": "Embeddings",
                "parameters": _REQUEST_HEADERS,
                "requestBody": {
                    "required": True,
                    "content": _json({"$ref": _REF + "EmbeddingRequest"}),
                },
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": _json({"$ref": _REF + "EmbeddingList"}),
                    },
                    **_error_responses(400, 401, 403, 404, 413, 429, 500, 503, 504),
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "tags": ["openai"],
                "summary": "Every configured model",
                "responses": {
                    "200": {"description": "OK", "content": _json({"$ref": _REF + "ModelList"})},
                    **_error_responses(401, 500, 503),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "tags": ["openai"],
                "summary": "One model",
                "parameters": [model_parameter],
                "responses": {
                    "200": {"description": "OK", "content": _json({"$ref": _REF + "Model"})},
                    **_error_responses(401, 404, 500, 503),
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "tags": ["health"],
                "summary": "The facade and its router connection",
                "responses": {
                    "200": {"description": "The router answers", "content": _json(_HEALTH)},
                    "503": {"description": "The router does not answer", "content": _json(_HEALTH)},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["health"],
                "summary": "This document",
                "responses": {"200": {"description": "OK", "content": _json({"type": "object"})}},
            }
        },
    }


_HEALTH: Final[Schema] = {
    "type": "object",
    "required": ["status", "router"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "router": {
            "type": "object",
            "required": ["connected"],
            "properties": {"connected": {"type": "boolean"}},
        },
    },
}

_STOP = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    ],
    "nullable": True,
}
_SAMPLING: Final[Schema] = {
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
    "n": {"type": "integer", "minimum": 1, "maximum": 1, "nullable": True},
    "stop": _STOP,
    "seed": {"type": "integer", "nullable": True},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
    "logprobs": {"type": "boolean", "nullable": True},
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "nullable": True,
    },
    "user": {"type": "string"},
}
_USAGE: Final[Schema] = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}
_TOKEN_IDS: Final[Schema] = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
}

_OPENAI_SCHEMAS: Final[dict[str, Schema]] = {
    "ErrorResponse": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True},
                },
            }
        },
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {
                "type": "string",
                "enum": ["system", "developer", "user", "assistant", "tool"],
            },
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"$ref": _REF + "ContentPart"}},
                ],
                "nullable": True,
            },
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": {"$ref": _REF + "ToolCall"}},
            "tool_call_id": {"type": "string"},
        },
    },
    # The facade refuses (400) the shapes below when they lack what llama-server needs.
    "ContentPart": {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
    },
    "Tool": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
    "ToolCall": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            },
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": _REF + "ChatMessage"},
            },
            "tools": {"type": "array", "items": {"$ref": _REF + "Tool"}},
            "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
            "response_format": {"type": "object"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True},
            **_SAMPLING,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    _TOKEN_IDS,
                    {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
                ]
            },
            "echo": {"type": "boolean"},
            **_SAMPLING,
        },
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "minLength": 1},
                    },
                    _TOKEN_IDS,
                    {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
                ]
            },
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "user": {"type": "string"},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "finish_reason": {"type": "string", "nullable": True},
                        "message": {
                            "type": "object",
                            "required": ["role"],
                            "properties": {
                                "role": {"type": "string"},
                                "content": {"type": "string", "nullable": True},
                                "tool_calls": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "finish_reason": {"type": "string", "nullable": True},
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "model": {"type": "string"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["object", "index", "embedding"],
                    "properties": {
                        "object": {"type": "string", "enum": ["embedding"]},
                        "index": {"type": "integer"},
                        "embedding": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "format": "byte"},
                            ]
                        },
                    },
                },
            },
            "usage": {
                "type": "object",
                "required": ["prompt_tokens", "total_tokens"],
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by", "n_ctx", "kind", "state", "loaded"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "n_ctx": {"type": "integer"},
            "kind": {"type": "string", "enum": ["chat", "embedding", "unspecified", ""]},
            "state": {"type": "string"},
            "loaded": {"type": "boolean"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": _REF + "Model"}},
        },
    },
}
