"""InferenceService: proto in, engine call, proto out. No business logic here."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from router.errors import InvalidRequest, RouterError
from router.inference import CHAT, EMBEDDINGS, Engine, GenerateCall, new_request_id
from router.logs import request_id
from router.scheduler.queue import Priority
from router.servicers.convert import (
    KIND_FROM_PB,
    PRIORITY_FROM_PB,
    done_to_pb,
    generate_event_to_pb,
)
from router.v1 import inference_service_pb2 as ipb
from router.v1 import inference_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Generate(
        self, request: ipb.GenerateRequest, context: Context
    ) -> AsyncIterator[ipb.GenerateResponse]:
        async for event in self._engine.generate(_call(request, context)):
            yield generate_event_to_pb(event)

    async def Complete(
        self, request: ipb.CompleteRequest, context: Context
    ) -> ipb.CompleteResponse:
        completion = await self._engine.complete(_call(request, context))
        return ipb.CompleteResponse(
            body=completion.body, text=completion.text, end=done_to_pb(completion.done)
        )

    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        _request_id(request.request_id, context)
        if request.inputs and request.token_inputs:
            raise InvalidRequest("set either inputs or token_inputs, not both")
        inputs: list[str] | list[list[int]] = (
            list(request.inputs) if request.inputs else [list(t.ids) for t in request.token_inputs]
        )
        result = await self._engine.embed(
            request.model,
            inputs,
            PRIORITY_FROM_PB.get(request.priority, Priority.NORMAL),
            _deadline(context),
        )
        return ipb.EmbedResponse(
            embeddings=[ipb.Embedding(index=i, values=v) for i, v in enumerate(result.vectors)],
            usage=ipb.Usage(
                prompt_tokens=result.usage.prompt_tokens, total_tokens=result.usage.total_tokens
            ),
        )

    def refused(self, request: object, error: RouterError) -> None:
        """Count an inference call its key could not make (see ``Engine.record_refusal``)."""
        if isinstance(request, ipb.EmbedRequest):
            endpoint = EMBEDDINGS
        elif isinstance(request, (ipb.GenerateRequest, ipb.CompleteRequest)):
            endpoint = KIND_FROM_PB.get(request.kind, CHAT)
        else:
            return
        priority = PRIORITY_FROM_PB.get(request.priority, Priority.NORMAL)
        self._engine.record_refusal(request.model, endpoint, priority, error)


def _call(request: ipb.GenerateRequest | ipb.CompleteRequest, context: Context) -> GenerateCall:
    kind = KIND_FROM_PB.get(request.kind)
    if kind is None:
        raise InvalidRequest("kind must be GENERATE_KIND_CHAT or GENERATE_KIND_COMPLETION")
    return GenerateCall(
        model=request.model,
        kind=kind,
        body=request.body,
        priority=PRIORITY_FROM_PB.get(request.priority, Priority.NORMAL),
        request_id=_request_id(request.request_id, context),
        deadline=_deadline(context),
    )


def _deadline(context: Context) -> float | None:
    """The caller's deadline on the time.monotonic() clock; None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request_id(given: str, context: Context) -> str:
    """The caller's id (field, else x-request-id metadata) or a new one; every log line of
    this call carries it."""
    value = given or next(
        (str(v) for k, v in context.invocation_metadata() or () if k == "x-request-id"), ""
    )
    value = value[:128] if value.isprintable() and value else new_request_id()
    request_id.set(value)
    return value
