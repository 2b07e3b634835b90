"""The admin REST bridge: every `google.api.http` binding of ModelControlService as a route.

The route table comes from the service's descriptors alone (`bindings()`), grpc-gateway style,
so annotating a new RPC in the proto adds its route with no code here:

* the path template's `{field}` variables fill request fields (a variable matches one segment);
* `body: "*"` parses the JSON body into the request (empty = `{}`, unknown fields are a 400),
  `body: "<field>"` into that field;
* query parameters fill the scalar request fields the path and body leave unbound (repeated
  ones may repeat; none with `body: "*"`); any other query parameter is a 400;
* a request field `last_event_id` is also filled from the `Last-Event-ID` header (SSE resume);
* the response is proto-JSON with the proto field names and every default value;
* a server-streaming RPC answers with SSE: `event:` is the name of the response's set oneof
  field, `data:` that field as proto-JSON, `id:` the response's `event_id` field when it has one.
  A route may render its events otherwise (`frames`): the seed's status stream keeps the seed's
  payloads (`facade.status.seed_status_frame`); it is built, called and resumed the same way.
  The HTTP headers go out as soon as the router has taken the call (a resume with nothing to
  replay answers at once), and a refusal before that is the HTTP status, except that a router
  that does not answer gets a 200 stream with one `error` event: an EventSource retries that,
  while after an HTTP error it gives up for good.

A path variable wins over the same field in the body.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor, json_format, message_factory
from google.protobuf.message import Message

from clients import map_rpc_errors
from facade.context import call_metadata, json_object, json_value, read_body
from facade.errors import ApiError
from facade.keys import CLIENT, STREAMS
from facade.sse import bridge_error_frame, event_frame
from router.v1 import model_control_service_pb2

__all__ = [
    "SERVICE",
    "Binding",
    "FrameRenderer",
    "bindings",
    "build_request",
    "field_at",
    "message_json",
    "query_fields",
    "setup_routes",
    "stream_frame",
]

SERVICE: Final = model_control_service_pb2.DESCRIPTOR.services_by_name["ModelControlService"]

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")
_RESUME_FIELD = "last_event_id"
_EVENT_ID_FIELD = "event_id"
_TRUE_WORDS = frozenset({"true", "1"})
_FALSE_WORDS = frozenset({"false", "0"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# One streamed response → its SSE frame.
FrameRenderer = Callable[[Message], bytes]


@dataclass(frozen=True, slots=True)
class Binding:
    """One HTTP binding of an RPC.

    **Parameters:**

    * **method** - the RPC's descriptor.
    * **http_method** - "GET", "POST", ...
    * **template** - the annotation's path template, e.g. "/v1/models/{model}/load".
    * **path** - the aiohttp route path.
    * **path_fields** - (route variable, request field path) for each template variable.
    * **body** - "" (no body), "*" (the whole request) or the request field the body fills.
    """

    method: descriptor.MethodDescriptor
    http_method: str
    template: str
    path: str
    path_fields: tuple[tuple[str, str], ...]
    body: str

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)


def bindings(service: descriptor.ServiceDescriptor = SERVICE) -> list[Binding]:
    """Every binding (`additional_bindings` included) of every annotated RPC, in proto order."""
    found: list[Binding] = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        found.extend(_binding(method, one) for one in (rule, *rule.additional_bindings))
    return found


def _binding(method: descriptor.MethodDescriptor, rule: http_pb2.HttpRule) -> Binding:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise ValueError(f"{method.full_name}: an http rule without a method and path")
    if pattern == "custom":
        http_method, template = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, template = pattern.upper(), getattr(rule, pattern)
    path_fields: list[tuple[str, str]] = []

    def variable(match: re.Match[str]) -> str:
        field_path, segments = match.group(1), match.group(2)
        if segments not in (None, "*"):
            raise ValueError(f"{method.full_name}: only single-segment variables, not {segments!r}")
        field_at(method.input_type, field_path)  # fails at startup on a misspelt annotation
        name = field_path.replace(".", "__")
        path_fields.append((name, field_path))
        return "{" + name + "}"

    path = _VARIABLE.sub(variable, template)
    if rule.body not in ("", "*"):
        field_at(method.input_type, rule.body)
    return Binding(method, http_method, template, path, tuple(path_fields), rule.body)


def setup_routes(
    app: web.Application,
    service: descriptor.ServiceDescriptor = SERVICE,
    frames: Mapping[str, FrameRenderer] | None = None,
) -> None:
    """Mount one route per binding of `service` on `app`.

    `frames` renders the events of the streaming routes it names (by path template) instead
    of `stream_frame`; by default, the seed's status stream keeps the seed's payloads.
    """
    if frames is None:
        # facade.status imports this module for message_json: import it when used.
        from facade.status import SEED_STREAM_FRAMES

        frames = SEED_STREAM_FRAMES
    static: dict[str, set[str]] = {}
    for binding in bindings(service):
        frame = frames.get(binding.template, stream_frame)
        app.router.add_route(binding.http_method, binding.path, _handler(binding, frame))
        if not binding.path_fields:
            static.setdefault(binding.path, set()).add(binding.http_method)
    app.middlewares.append(_static_paths_win(static))


def _static_paths_win(static: Mapping[str, set[str]]) -> Middleware:
    """A static path wins over a template for every method: aiohttp would hand, say,
    `GET /v1/models/eject` (a POST-only path) to `GET /v1/models/{model}`, reading "eject" as
    an alias; here a method the static path does not serve is a 405 instead."""

    @web.middleware
    async def static_paths_win(request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = static.get(request.path)
        if allowed is not None and request.method not in allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
        return await handler(request)

    return static_paths_win


def _handler(binding: Binding, frame: FrameRenderer) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        message = await build_request(request, binding)
        rpc = getattr(request.app[CLIENT].control, binding.method.name)
        metadata = call_metadata(request)
        if binding.streaming:
            return await _stream(request, rpc(message, metadata=metadata), frame)
        with map_rpc_errors():
            response = await rpc(message, metadata=metadata)
        return web.json_response(message_json(response))

    return handle


async def _stream(request: web.Request, call: Any, frame: FrameRenderer) -> web.StreamResponse:
    async with request.app[STREAMS].open(request, bridge_error_frame) as stream:
        async with contextlib.aclosing(_responses(call)) as responses:
            await call.initial_metadata()  # the router took the call, or it ended first
            if not call.done() or await call.code() == grpc.StatusCode.UNAVAILABLE:
                await stream.start()
            async for response in responses:
                await stream.write(frame(response))
    return stream.response


async def _responses(call: Any) -> AsyncGenerator[Message, None]:
    try:
        with map_rpc_errors():
            async for response in call:
                yield response
    finally:
        call.cancel()  # a no-op once the call ended; otherwise the client went away


def message_json(message: Message) -> dict[str, Any]:
    """Proto-JSON with the proto's own (snake_case) names and every default value."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def stream_frame(response: Message) -> bytes:
    """One SSE event for a streamed response: its set oneof field, with the event id."""
    name, payload = _event_payload(response)
    event_id = ""
    if _EVENT_ID_FIELD in response.DESCRIPTOR.fields_by_name:
        event_id = str(getattr(response, _EVENT_ID_FIELD))
    data = json.dumps(message_json(payload), separators=(",", ":"))
    return event_frame(name, data, event_id)


def _event_payload(response: Message) -> tuple[str, Message]:
    for oneof in response.DESCRIPTOR.oneofs:
        name = response.WhichOneof(oneof.name)
        if name is not None:
            payload = getattr(response, name)
            if isinstance(payload, Message):
                return name, payload
    # No message-valued oneof set: the whole response is the event, named after its type.
    return response.DESCRIPTOR.name, response


async def build_request(request: web.Request, binding: Binding) -> Message:
    """The RPC's request message from the HTTP request's body, query, headers and path."""
    message = message_factory.GetMessageClass(binding.method.input_type)()
    if binding.body:
        _parse_body(await read_body(request), binding.body, message)
    query = query_fields(binding)
    for key in dict.fromkeys(request.query):  # each name once, however often it repeats
        if key not in query:
            raise ApiError(400, f"unknown query parameter '{key}'", param=key)
        _set_scalar(message, key, request.query.getall(key), f"query parameter '{key}'")
    resume = request.headers.get("Last-Event-ID")
    if resume is not None and _RESUME_FIELD in message.DESCRIPTOR.fields_by_name:
        # Header bytes outside ASCII arrive as lone surrogates, which no protobuf string takes.
        if not (resume.isascii() and resume.isprintable()):
            raise ApiError(400, "the Last-Event-ID header must be printable ASCII")
        setattr(message, _RESUME_FIELD, resume)
    for name, field_path in binding.path_fields:
        _set_scalar(message, field_path, [request.match_info[name]], f"path segment '{name}'")
    return message


def query_fields(binding: Binding) -> list[str]:
    """The request fields a query parameter may set: the scalar fields the path and the body
    leave unbound (none with `body: "*"`, which binds every field)."""
    if binding.body == "*":
        return []
    bound = {field for _, field in binding.path_fields} | {binding.body}
    return [
        field.name
        for field in binding.method.input_type.fields
        if field.message_type is None and field.name not in bound
    ]


def _parse_body(text: str, body: str, message: Message) -> None:
    if body == "*":
        value = json_object(text) if text.strip() else {}
    else:
        value = {body: json_value(text)}
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # "\ud800": no protobuf string takes a lone surrogate
        raise ApiError(400, "the request body contains an unpaired UTF-16 surrogate") from None
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as error:
        raise ApiError(400, f"invalid request body: {error}") from None


def field_at(
    message_descriptor: descriptor.Descriptor, field_path: str
) -> descriptor.FieldDescriptor:
    """The field at a dotted path; ValueError when some part is not a singular message field."""
    *parents, name = field_path.split(".")
    current = message_descriptor
    for parent in parents:
        field = current.fields_by_name.get(parent)
        if field is None or field.message_type is None or field.is_repeated:
            raise ValueError(f"{message_descriptor.full_name} has no message field {parent!r}")
        current = field.message_type
    field = current.fields_by_name.get(name)
    if field is None:
        raise ValueError(f"{message_descriptor.full_name} has no field {field_path!r}")
    return field


def _set_scalar(message: Message, field_path: str, values: list[str], source: str) -> None:
    try:
        field = field_at(cast(descriptor.Descriptor, message.DESCRIPTOR), field_path)
    except ValueError:
        raise ApiError(400, f"unknown {source}", param=field_path) from None
    if field.message_type is not None:
        raise ApiError(400, f"{source} cannot set the message field {field_path!r}")
    if len(values) > 1 and not field.is_repeated:
        raise ApiError(400, f"{source} is given more than once", param=field_path)
    converted = [_scalar(field, value, source) for value in values]
    target = message
    for parent in field_path.split(".")[:-1]:
        target = getattr(target, parent)
    try:
        if field.is_repeated:
            getattr(target, field.name).extend(converted)
        else:
            setattr(target, field.name, converted[0])
    except (TypeError, ValueError):
        raise ApiError(400, f"{source} is out of range for {field_path!r}") from None


def _scalar(field: descriptor.FieldDescriptor, text: str, source: str) -> object:
    cpp_type = field.cpp_type
    try:
        if cpp_type == descriptor.FieldDescriptor.CPPTYPE_STRING:
            return text
        if cpp_type == descriptor.FieldDescriptor.CPPTYPE_BOOL:
            return _boolean(text.lower())
        if cpp_type in (
            descriptor.FieldDescriptor.CPPTYPE_DOUBLE,
            descriptor.FieldDescriptor.CPPTYPE_FLOAT,
        ):
            return float(text)
        if field.enum_type is not None:
            return _enum_number(field.enum_type, text)
        return int(text)
    except ValueError:
        raise ApiError(400, f"{source} has an invalid value {text!r}", param=field.name) from None


def _boolean(word: str) -> bool:
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(word)


def _enum_number(enum: descriptor.EnumDescriptor, text: str) -> int:
    value = enum.values_by_name.get(text)
    if value is not None:
        return int(value.number)
    number = int(text)
    if number not in enum.values_by_number:
        raise ValueError(text)
    return number
