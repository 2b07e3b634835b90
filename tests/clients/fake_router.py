"""An in-process fake router: both router.v1 servicers on a real grpc.aio server, scripted by tests.

Usage:

```python
async with serve_fake_router() as (fake, target):
    fake.generate_events = [queued(1, 1), chunk('{"id":"c1"}', text="Hi"), end("stop")]
    async with RouterClient(target) as client:
        events = [event async for event in client.generate("chat-model", "{}")]
    assert fake.calls[0].method == "Generate"
```

A test scripts the fake by setting its attributes before the call:

* `generate_events` / `watch_events` - the messages Generate / WatchModels yield; Complete
  answers with the chunk and end among `generate_events`, collected into one message.
* `models` - the configured models by alias, in configuration order. GetModel answers from it
  (NOT_FOUND with reason MODEL_NOT_FOUND for an unknown alias), LoadModel marks the model ready,
  UnloadModel stopped, ResetModel clears its failures; ListModels lists it with `server`.
* `responses` - a response per unary method name, returned instead of the default answer.
  Embed's default is one vector `[index, len(input)]` per input.
* `errors` - a status per method name (build one with `rich_status()`): a unary call aborts with
  it; a stream yields its scripted events first, then aborts.
* `delay` - seconds every call sleeps before answering, e.g. to pass a client's deadline.
* `hold_streams_open` - streams wait after their events, and Complete before answering, until
  the client cancels.

For behaviour these cannot express (e.g. events that depend on the request), subclass FakeRouter
and override the handler.

The fake records what it received: `calls` (method, request, metadata, in arrival order), with
the event `called` set at the first one, and the event `cancelled` with `cancelled_methods` for
the calls it saw cancelled by the client or a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from router.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    model_control_service_pb2,
    model_control_service_pb2_grpc,
    model_pb2,
)

__all__ = [
    "FakeRouter",
    "ReceivedCall",
    "chunk",
    "end",
    "loading",
    "make_model",
    "queued",
    "rich_status",
    "serve_fake_router",
]

_Context = grpc.aio.ServicerContext[Any, Any]
_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True)
class ReceivedCall:
    """One call the fake received: the RPC's method name, its request and its metadata."""

    method: str
    request: Message
    metadata: tuple[tuple[str, str | bytes], ...]

    def header(self, key: str) -> list[str | bytes]:
        """Every value the call carried under metadata `key`."""
        return [value for name, value in self.metadata if name == key]


class FakeRouter(
    inference_service_pb2_grpc.InferenceServiceServicer,
    model_control_service_pb2_grpc.ModelControlServiceServicer,
):
    """Both router.v1 servicers, answering as the test scripts them (see the module docstring)."""

    def __init__(self) -> None:
        self.generate_events: list[inference_service_pb2.GenerateResponse] = []
        self.watch_events: list[model_control_service_pb2.WatchModelsResponse] = []
        self.models: dict[str, model_pb2.Model] = {}
        self.server = model_pb2.ServerStatus(
            state=model_pb2.SERVER_STATE_SERVING, epoch="fake-epoch", version="0.0.0-fake"
        )
        self.responses: dict[str, Message] = {}
        self.errors: dict[str, grpc.Status] = {}
        self.delay = 0.0
        self.hold_streams_open = False
        self.calls: list[ReceivedCall] = []
        self.called = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancelled_methods: list[str] = []

    # InferenceService

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: _Context
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        with self._noting_cancel("Generate"):
            await self._start("Generate", request, context)
            for event in self.generate_events:
                yield event
            await self._finish_stream("Generate", context)

    async def Complete(
        self, request: inference_service_pb2.CompleteRequest, context: _Context
    ) -> inference_service_pb2.CompleteResponse:
        scripted = await self._unary(
            "Complete", request, context, inference_service_pb2.CompleteResponse
        )
        if scripted is not None:
            return scripted
        if self.hold_streams_open:
            with self._noting_cancel("Complete"):
                await asyncio.Event().wait()
        # As the router answers: Generate's events collected into one message.
        response = inference_service_pb2.CompleteResponse()
        for event in self.generate_events:
            if event.HasField("chunk"):
                response.body, response.text = event.chunk.data[0], event.chunk.text
            elif event.HasField("end"):
                response.end.CopyFrom(event.end)
        return response

    async def Embed(
        self, request: inference_service_pb2.EmbedRequest, context: _Context
    ) -> inference_service_pb2.EmbedResponse:
        scripted = await self._unary("Embed", request, context, inference_service_pb2.EmbedResponse)
        if scripted is not None:
            return scripted
        sizes = [len(text) for text in request.inputs] or [
            len(tokens.ids) for tokens in request.token_inputs
        ]
        return inference_service_pb2.EmbedResponse(
            embeddings=[
                inference_service_pb2.Embedding(index=index, values=[index, size])
                for index, size in enumerate(sizes)
            ],
            usage=inference_service_pb2.Usage(prompt_tokens=sum(sizes), total_tokens=sum(sizes)),
        )

    # ModelControlService

    async def ListModels(
        self, request: model_control_service_pb2.ListModelsRequest, context: _Context
    ) -> model_control_service_pb2.ListModelsResponse:
        response_type = model_control_service_pb2.ListModelsResponse
        scripted = await self._unary("ListModels", request, context, response_type)
        if scripted is not None:
            return scripted
        by_state: dict[str, int] = {}
        for model in self.models.values():
            name = model_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower()
            by_state[name] = by_state.get(name, 0) + 1
        return response_type(
            models=self.models.values(),
            server=self.server,
            summary=model_pb2.StatusSummary(total=len(self.models), by_state=by_state),
        )

    async def GetModel(
        self, request: model_control_service_pb2.GetModelRequest, context: _Context
    ) -> model_control_service_pb2.GetModelResponse:
        response_type = model_control_service_pb2.GetModelResponse
        scripted = await self._unary("GetModel", request, context, response_type)
        if scripted is not None:
            return scripted
        return response_type(model=await self._model(request.model, context))

    async def LoadModel(
        self, request: model_control_service_pb2.LoadModelRequest, context: _Context
    ) -> model_control_service_pb2.LoadModelResponse:
        response_type = model_control_service_pb2.LoadModelResponse
        scripted = await self._unary("LoadModel", request, context, response_type)
        if scripted is not None:
            return scripted
        model = await self._model(request.model, context)
        model.state = model_pb2.MODEL_STATE_READY
        return response_type(model=model)

    async def UnloadModel(
        self, request: model_control_service_pb2.UnloadModelRequest, context: _Context
    ) -> model_control_service_pb2.UnloadModelResponse:
        response_type = model_control_service_pb2.UnloadModelResponse
        scripted = await self._unary("UnloadModel", request, context, response_type)
        if scripted is not None:
            return scripted
        model = await self._model(request.model, context)
        was_running = model.state != model_pb2.MODEL_STATE_STOPPED
        model.state = model_pb2.MODEL_STATE_STOPPED
        return response_type(model=model, was_running=was_running)

    async def ResetModel(
        self, request: model_control_service_pb2.ResetModelRequest, context: _Context
    ) -> model_control_service_pb2.ResetModelResponse:
        response_type = model_control_service_pb2.ResetModelResponse
        scripted = await self._unary("ResetModel", request, context, response_type)
        if scripted is not None:
            return scripted
        model = await self._model(request.model, context)
        previous_error = model.last_error
        was_failed = model.state == model_pb2.MODEL_STATE_FAILED
        if was_failed:
            model.state = model_pb2.MODEL_STATE_STOPPED
        model.consecutive_failures = 0
        model.last_error = ""
        model.ClearField("retry_at")
        return response_type(model=model, was_failed=was_failed, previous_error=previous_error)

    async def WatchModels(
        self, request: model_control_service_pb2.WatchModelsRequest, context: _Context
    ) -> AsyncIterator[model_control_service_pb2.WatchModelsResponse]:
        with self._noting_cancel("WatchModels"):
            await self._start("WatchModels", request, context)
            for event in self.watch_events:
                yield event
            await self._finish_stream("WatchModels", context)

    async def ListFailedModels(
        self, request: model_control_service_pb2.ListFailedModelsRequest, context: _Context
    ) -> model_control_service_pb2.ListFailedModelsResponse:
        response_type = model_control_service_pb2.ListFailedModelsResponse
        scripted = await self._unary("ListFailedModels", request, context, response_type)
        return response_type() if scripted is None else scripted

    async def GetQueueStats(
        self, request: model_control_service_pb2.GetQueueStatsRequest, context: _Context
    ) -> model_control_service_pb2.GetQueueStatsResponse:
        response_type = model_control_service_pb2.GetQueueStatsResponse
        scripted = await self._unary("GetQueueStats", request, context, response_type)
        return response_type() if scripted is None else scripted

    async def GetResources(
        self, request: model_control_service_pb2.GetResourcesRequest, context: _Context
    ) -> model_control_service_pb2.GetResourcesResponse:
        response_type = model_control_service_pb2.GetResourcesResponse
        scripted = await self._unary("GetResources", request, context, response_type)
        return response_type() if scripted is None else scripted

    async def GetModelHealth(
        self, request: model_control_service_pb2.GetModelHealthRequest, context: _Context
    ) -> model_control_service_pb2.GetModelHealthResponse:
        response_type = model_control_service_pb2.GetModelHealthResponse
        scripted = await self._unary("GetModelHealth", request, context, response_type)
        return response_type() if scripted is None else scripted

    async def GetTelemetrySummary(
        self, request: model_control_service_pb2.GetTelemetrySummaryRequest, context: _Context
    ) -> model_control_service_pb2.GetTelemetrySummaryResponse:
        response_type = model_control_service_pb2.GetTelemetrySummaryResponse
        scripted = await self._unary("GetTelemetrySummary", request, context, response_type)
        return response_type() if scripted is None else scripted

    async def GetModelLogs(
        self, request: model_control_service_pb2.GetModelLogsRequest, context: _Context
    ) -> model_control_service_pb2.GetModelLogsResponse:
        response_type = model_control_service_pb2.GetModelLogsResponse
        scripted = await self._unary("GetModelLogs", request, context, response_type)
        return response_type() if scripted is None else scripted

    # What every handler shares.

    async def _unary(
        self, method: str, request: Message, context: _Context, response_type: type[_M]
    ) -> _M | None:
        """Record the call, wait `delay`, abort with the scripted error; the scripted response."""
        with self._noting_cancel(method):
            await self._start(method, request, context)
            await self._abort_if_scripted(method, context)
        scripted = self.responses.get(method)
        if scripted is None:
            return None
        assert isinstance(scripted, response_type), f"responses[{method!r}] is a {type(scripted)}"
        return scripted

    async def _start(self, method: str, request: Message, context: _Context) -> None:
        metadata = tuple(context.invocation_metadata() or ())
        self.calls.append(ReceivedCall(method, request, metadata))
        self.called.set()
        await asyncio.sleep(self.delay)

    async def _finish_stream(self, method: str, context: _Context) -> None:
        await self._abort_if_scripted(method, context)
        if self.hold_streams_open:
            await asyncio.Event().wait()

    async def _abort_if_scripted(self, method: str, context: _Context) -> None:
        status = self.errors.get(method)
        if status is not None:
            await context.abort(status.code, status.details, status.trailing_metadata)

    @contextlib.contextmanager
    def _noting_cancel(self, method: str) -> Iterator[None]:
        # grpc.aio cancels the handler's task when the client cancels or its deadline passes.
        try:
            yield
        except asyncio.CancelledError:
            self.cancelled_methods.append(method)
            self.cancelled.set()
            raise

    async def _model(self, alias: str, context: _Context) -> model_pb2.Model:
        model = self.models.get(alias)
        if model is None:
            status = rich_status(
                grpc.StatusCode.NOT_FOUND,
                f"model {alias!r} is not configured",
                reason="MODEL_NOT_FOUND",
                metadata={"model": alias},
            )
            await context.abort(status.code, status.details, status.trailing_metadata)
        return model


@contextlib.asynccontextmanager
async def serve_fake_router(
    fake: FakeRouter | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> AsyncIterator[tuple[FakeRouter, str]]:
    """Serve `fake` (a new FakeRouter by default) on a free loopback port; yield it, the target."""
    fake = fake or FakeRouter()
    server = grpc.aio.server(interceptors=interceptors, options=options)
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(fake, server)
    model_control_service_pb2_grpc.add_ModelControlServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def rich_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    retry_after: float | None = None,
    domain: str = "router.v1",
) -> grpc.Status:
    """A status as the router sends it: ErrorInfo (when `reason` is set) and RetryInfo details."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if reason:
        info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {})
        status.details.add().Pack(info)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_after))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def queued(position: int, queue_length: int) -> inference_service_pb2.GenerateResponse:
    """A Generate `queued` event."""
    return inference_service_pb2.GenerateResponse(
        queued=inference_service_pb2.Queued(position=position, queue_length=queue_length)
    )


def loading(
    stage: model_pb2.LoadStage.ValueType, elapsed_sec: float
) -> inference_service_pb2.GenerateResponse:
    """A Generate `loading` event."""
    return inference_service_pb2.GenerateResponse(
        loading=inference_service_pb2.Loading(stage=stage, elapsed_sec=elapsed_sec)
    )


def chunk(*data: str, text: str = "") -> inference_service_pb2.GenerateResponse:
    """A Generate `chunk` event carrying the upstream JSON strings `data`."""
    return inference_service_pb2.GenerateResponse(
        chunk=inference_service_pb2.Chunk(data=data, text=text)
    )


def end(
    finish_reason: str = "stop",
    *,
    usage: inference_service_pb2.Usage | None = None,
    timing: inference_service_pb2.Timing | None = None,
    chunk: inference_service_pb2.Chunk | None = None,
) -> inference_service_pb2.GenerateResponse:
    """A Generate `end` event (with `chunk`: the last chunks riding with it)."""
    return inference_service_pb2.GenerateResponse(
        end=inference_service_pb2.End(
            finish_reason=finish_reason, usage=usage, timing=timing, chunk=chunk
        )
    )


def make_model(
    alias: str,
    *,
    state: model_pb2.ModelState.ValueType = model_pb2.MODEL_STATE_READY,
    kind: model_pb2.ModelKind.ValueType = model_pb2.MODEL_KIND_CHAT,
    **fields: Any,
) -> model_pb2.Model:
    """A Model snapshot; `fields` sets any other Model field."""
    return model_pb2.Model(alias=alias, state=state, kind=kind, **fields)
