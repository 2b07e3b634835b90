"""The typed async client over the router's gRPC services (router.v1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from operator import attrgetter
from types import TracebackType
from typing import Any, Literal, TypeAlias, TypeVar

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from clients.errors import RequestCancelledError, UnavailableError, map_rpc_errors
from clients.events import (
    Chunk,
    Completion,
    EmbedResult,
    End,
    GenerateEvent,
    Loading,
    ModelInfo,
    ModelList,
    Queued,
    ServerInfo,
    StatusSummary,
    Timing,
    Usage,
    WatchEvent,
)
from router.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    model_control_service_pb2,
    model_control_service_pb2_grpc,
    model_pb2,
)

__all__ = ["GenerateKind", "Priority", "RouterClient"]

GenerateKind: TypeAlias = Literal["chat", "completion"]
Priority: TypeAlias = Literal["high", "normal", "low"]

_T = TypeVar("_T")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

_KINDS: Mapping[str, inference_service_pb2.GenerateKind.ValueType] = {
    "chat": inference_service_pb2.GENERATE_KIND_CHAT,
    "completion": inference_service_pb2.GENERATE_KIND_COMPLETION,
}
_PRIORITIES: Mapping[str, inference_service_pb2.Priority.ValueType] = {
    "high": inference_service_pb2.PRIORITY_HIGH,
    "normal": inference_service_pb2.PRIORITY_NORMAL,
    "low": inference_service_pb2.PRIORITY_LOW,
}

# LoadModel's own timeout_sec bounds the wait on the router, which then answers with a typed
# LOAD_TIMEOUT; the call's deadline gets this much more so that answer can arrive first.
_LOAD_DEADLINE_SLACK_SEC = 5.0


def _enum_names(values: Iterable[tuple[str, int]], prefix: str) -> Mapping[int, str]:
    return {number: name.removeprefix(prefix).lower() for name, number in values}


_MODEL_STATES = _enum_names(model_pb2.ModelState.items(), "MODEL_STATE_")
_MODEL_KINDS = _enum_names(model_pb2.ModelKind.items(), "MODEL_KIND_")
_LOAD_STAGES = _enum_names(model_pb2.LoadStage.items(), "LOAD_STAGE_")
_SERVER_STATES = _enum_names(model_pb2.ServerState.items(), "SERVER_STATE_")


# The largest reply the router sends (its own send limit): a batch of embeddings can be far
# larger than any request.
_MAX_REPLY_BYTES = 256 * 1024 * 1024


def _channel_options(max_message_bytes: int) -> dict[str, Any]:
    return {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max(max_message_bytes, _MAX_REPLY_BYTES),
        # Generate and WatchModels streams can stay silent for minutes (queued, loading, no
        # status change); pings find a dead router or a dropped connection meanwhile. A
        # default grpc server accepts this rate on an active call, and the client stops
        # pinging a silent connection after grpc.http2.max_pings_without_data (2) pings,
        # so the server never sends GOAWAY "too_many_pings".
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
    }


class RouterClient:
    """An async client for one router, over one long-lived gRPC channel.

    Usage:

    ```python
    async with clients.RouterClient("127.0.0.1:50051", api_key="sk-...") as client:
        await client.wait_ready(timeout=5)
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
        async for event in client.generate("qwen", body):
            if isinstance(event, clients.Chunk):
                print(event.text, end="")
    ```

    Every method raises only `clients.RouterError` subclasses for failed calls. Create one
    client per router and share it: all calls are multiplexed over its channel.

    **Parameters:**

    * **target** - the router's `host:port`.
    * **api_key** - *(optional)* sent as `authorization: Bearer <key>` on every call. Leave it
      unset when forwarding each caller's own key through per-call `metadata`.
    * **credentials** - *(optional)* TLS channel credentials; the channel is plaintext without.
    * **max_message_bytes** - *(optional)* the largest request sent; keep it equal to the
      router's limit. A request over it fails with `RequestTooLargeError`. Replies of up to
      256 MiB (what the router sends at most) are received whatever it is.
    * **interceptors** - *(optional)* grpc.aio client interceptors, e.g. for tracing.
    * **options** - *(optional)* extra grpc channel arguments; they override the client's.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 8 * 1024 * 1024,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._target = target
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        channel_options = list({**_channel_options(max_message_bytes), **dict(options)}.items())
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(
                target, options=channel_options, interceptors=list(interceptors)
            )
        else:
            self._channel = grpc.aio.secure_channel(
                target, credentials, options=channel_options, interceptors=list(interceptors)
            )
        self._inference = inference_service_pb2_grpc.InferenceServiceStub(self._channel)
        self._control = model_control_service_pb2_grpc.ModelControlServiceStub(self._channel)
        self._closed = False

    @property
    def target(self) -> str:
        """The router's address this client was created with."""
        return self._target

    @property
    def inference(self) -> inference_service_pb2_grpc.InferenceServiceAsyncStub:
        """The raw InferenceService stub on the client's channel.

        Calls through it get neither the `api_key` metadata nor error mapping.
        """
        return self._inference

    @property
    def control(self) -> model_control_service_pb2_grpc.ModelControlServiceAsyncStub:
        """The raw ModelControlService stub on the client's channel, e.g. for a REST bridge.

        Calls through it get neither the `api_key` metadata nor error mapping.
        """
        return self._control

    async def close(self) -> None:
        """Close the channel; the calls still running on it fail with `RequestCancelledError`."""
        self._closed = True
        await self._channel.close(None)

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel is connected to the router.

        Raises `UnavailableError` when it is not within `timeout` seconds.
        """
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(
                f"the router at {self._target} was not reachable within {timeout} s",
                code=grpc.StatusCode.UNAVAILABLE,
            ) from None

    def generate(
        self,
        model: str,
        body: Mapping[str, Any] | str,
        *,
        kind: GenerateKind = "chat",
        priority: Priority = "normal",
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[GenerateEvent, None]:
        """Run one chat or text completion and iterate its events.

        `body` is the OpenAI request body, as a mapping or as JSON text sent unchanged; its
        `stream` member selects streamed chunks or one complete response. The call starts at
        the first iteration and yields `Queued` and `Loading` while it waits, `Chunk`s, then
        one `End`. `timeout` is the deadline of the whole call.

        Stopping early (`aclose()`, a cancelled task, or leaving an `async for` and dropping
        the iterator) cancels the call, so the router frees the model's slot at once. Use
        `contextlib.aclosing()` when the iterator may outlive the loop.
        """
        request = inference_service_pb2.GenerateRequest(
            **_generation(model, body, kind, priority, request_id)
        )
        return self._generate(request, timeout, self._call_metadata(metadata))

    async def _generate(
        self,
        request: inference_service_pb2.GenerateRequest,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> AsyncGenerator[GenerateEvent, None]:
        call = self._inference.Generate(request, timeout=timeout, metadata=metadata)
        try:
            with self._call_errors():
                async for response in call:
                    # Chunks are almost every message: test for them first, and keep their
                    # data as the message's own sequence rather than copying it.
                    event = response.WhichOneof("event")
                    if event == "chunk":
                        chunk = response.chunk
                        yield Chunk(chunk.data, chunk.text)
                    elif event == "queued":
                        queued = response.queued
                        yield Queued(queued.position, queued.queue_length)
                    elif event == "loading":
                        loading = response.loading
                        yield Loading(_LOAD_STAGES.get(loading.stage, ""), loading.elapsed_sec)
                    elif event == "end":
                        end = response.end
                        if end.HasField("chunk"):  # the last chunks ride with the end
                            yield Chunk(end.chunk.data, end.chunk.text)
                        yield _end(end)
        finally:
            # A no-op once the call has ended; otherwise the consumer stopped early.
            call.cancel()

    async def complete(
        self,
        model: str,
        body: Mapping[str, Any] | str,
        *,
        kind: GenerateKind = "chat",
        priority: Priority = "normal",
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Completion:
        """Run one chat or text completion that does not ask for a stream; return its answer.

        One unary call: cheaper than `generate()` when only the complete response matters
        (the wait for the queue and the load is silent). A body with `"stream": true` raises
        `InvalidRequestError`. Cancelling the awaiting task cancels the call.
        """
        request = inference_service_pb2.CompleteRequest(
            **_generation(model, body, kind, priority, request_id)
        )
        response = await self._unary(self._inference.Complete, request, timeout, metadata)
        return Completion(response.body, response.text, _end(response.end))

    async def embed(
        self,
        model: str,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        *,
        priority: Priority = "normal",
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> EmbedResult:
        """Embed a batch of texts, or of token id lists, in one call; vectors keep input order."""
        if isinstance(inputs, str):
            raise TypeError("inputs must be a sequence of texts, not one str")
        request = inference_service_pb2.EmbedRequest(
            model=model,
            priority=_choice(_PRIORITIES, "priority", priority),
            request_id=request_id or "",
        )
        for item in inputs:
            if isinstance(item, str):
                request.inputs.append(item)
            else:
                request.token_inputs.add(ids=item)
        response = await self._unary(self._inference.Embed, request, timeout, metadata)
        return EmbedResult(
            embeddings=[
                list(embedding.values)
                for embedding in sorted(response.embeddings, key=attrgetter("index"))
            ],
            prompt_tokens=response.usage.prompt_tokens,
            total_tokens=response.usage.total_tokens,
        )

    async def list_models(
        self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()
    ) -> ModelList:
        """Every configured model in configuration order, with the router's status."""
        response = await self._unary(
            self._control.ListModels,
            model_control_service_pb2.ListModelsRequest(),
            timeout,
            metadata,
        )
        return ModelList(
            models=tuple(_model_info(model) for model in response.models),
            server=_server_info(response.server),
            summary=_summary(response.summary),
        )

    async def get_model(
        self,
        model: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ModelInfo:
        """One model's snapshot."""
        response = await self._unary(
            self._control.GetModel,
            model_control_service_pb2.GetModelRequest(model=model),
            timeout,
            metadata,
        )
        return _model_info(response.model)

    async def load(
        self,
        model: str,
        *,
        wait: bool = True,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ModelInfo:
        """Start a model and, with `wait`, return once it is ready; a ready model is a no-op.

        `timeout` bounds the wait on the router (the model's `wait_ready_sec` when None), which
        then fails with `DeadlineExceededError` of reason "LOAD_TIMEOUT".
        """
        response = await self._unary(
            self._control.LoadModel,
            model_control_service_pb2.LoadModelRequest(
                model=model, wait=wait, timeout_sec=_seconds(timeout, "timeout")
            ),
            None if timeout is None else timeout + _LOAD_DEADLINE_SLACK_SEC,
            metadata,
        )
        return _model_info(response.model)

    async def unload(
        self,
        model: str,
        *,
        force: bool = False,
        drain_timeout: float | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ModelInfo:
        """Stop a model; unloading a stopped model is a no-op.

        In-flight requests drain for `drain_timeout` seconds (the router's default, 30 s, when
        None) before the stop is forced; `force` stops at once, failing them with UNAVAILABLE.
        """
        response = await self._unary(
            self._control.UnloadModel,
            model_control_service_pb2.UnloadModelRequest(
                model=model, force=force, drain_timeout_sec=_seconds(drain_timeout, "drain_timeout")
            ),
            timeout,
            metadata,
        )
        return _model_info(response.model)

    async def reset(
        self,
        model: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ModelInfo:
        """Clear a model's failure state and close its circuit; a healthy model is a no-op."""
        response = await self._unary(
            self._control.ResetModel,
            model_control_service_pb2.ResetModelRequest(model=model),
            timeout,
            metadata,
        )
        return _model_info(response.model)

    def watch(
        self,
        *,
        last_event_id: str | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[WatchEvent, None]:
        """Iterate the model status stream: a "full_status" event, then one event per change.

        Pass the `event_id` of the last event seen as `last_event_id` to resume after it; an id
        from an earlier router run, or too old, yields a fresh "full_status". Stopping early
        cancels the call, as for `generate()`.
        """
        request = model_control_service_pb2.WatchModelsRequest(last_event_id=last_event_id or "")
        return self._watch(request, timeout, self._call_metadata(metadata))

    async def _watch(
        self,
        request: model_control_service_pb2.WatchModelsRequest,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> AsyncGenerator[WatchEvent, None]:
        call = self._control.WatchModels(request, timeout=timeout, metadata=metadata)
        try:
            with self._call_errors():
                async for response in call:
                    event = _watch_event(response)
                    if event is not None:
                        yield event
        finally:
            call.cancel()

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> _Response:
        with self._call_errors():
            return await method(request, timeout=timeout, metadata=self._call_metadata(metadata))

    @contextlib.contextmanager
    def _call_errors(self) -> Iterator[None]:
        """`map_rpc_errors`, and a call that `close()` cancelled as `RequestCancelledError`: its
        task was not cancelled, and must not look as if it had been."""
        try:
            with map_rpc_errors():
                yield
        except asyncio.CancelledError:
            if self._closed and not _cancelling(asyncio.current_task()):
                raise RequestCancelledError(
                    "the client was closed during the call", code=grpc.StatusCode.CANCELLED
                ) from None
            raise

    def _call_metadata(self, extra: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
        return (*self._metadata, *extra) if extra else self._metadata


def _cancelling(task: asyncio.Task[Any] | None) -> bool:
    """Whether someone cancelled ``task`` (Python 3.11 can tell; on 3.10 it is assumed not)."""
    if sys.version_info >= (3, 11) and task is not None:
        return task.cancelling() > 0
    return False


def _seconds(value: float | None, name: str) -> float:
    """A duration for the router, where 0 means its default: None is that default, and a
    value must be positive (0 would silently become the default too)."""
    if value is None:
        return 0.0
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, or None for the default")
    return value


def _generation(
    model: str,
    body: Mapping[str, Any] | str,
    kind: GenerateKind,
    priority: Priority,
    request_id: str | None,
) -> dict[str, Any]:
    """The fields GenerateRequest and CompleteRequest share (the same request either way)."""
    return {
        "model": model,
        "kind": _choice(_KINDS, "kind", kind),
        "body": body if isinstance(body, str) else json.dumps(body, separators=(",", ":")),
        "priority": _choice(_PRIORITIES, "priority", priority),
        "request_id": request_id or "",
    }


def _choice(table: Mapping[str, _T], name: str, value: str) -> _T:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{name} must be one of {', '.join(table)}, not {value!r}") from None


def _datetime(timestamp: timestamp_pb2.Timestamp) -> datetime | None:
    # An unset Timestamp reads as the epoch, which the router never sends as a real time.
    if not timestamp.seconds and not timestamp.nanos:
        return None
    return timestamp.ToDatetime(tzinfo=timezone.utc)


def _end(end: inference_service_pb2.End) -> End:
    usage, timing = end.usage, end.timing
    return End(
        finish_reason=end.finish_reason,
        usage=Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
        ),
        timing=Timing(
            queue_ms=timing.queue_ms,
            load_ms=timing.load_ms,
            ttft_ms=timing.ttft_ms,
            total_ms=timing.total_ms,
        ),
    )


def _model_info(model: model_pb2.Model) -> ModelInfo:
    return ModelInfo(
        alias=model.alias,
        state=_MODEL_STATES.get(model.state, ""),
        kind=_MODEL_KINDS.get(model.kind, ""),
        port=model.port,
        pid=model.pid,
        slots=model.slots,
        in_flight=model.in_flight,
        queued=model.queued,
        n_ctx=model.n_ctx,
        pinned=model.pinned,
        last_error=model.last_error,
        state_since=_datetime(model.state_since),
        last_used_at=_datetime(model.last_used_at),
        retry_at=_datetime(model.retry_at),
        consecutive_failures=model.consecutive_failures,
        restarts=model.restarts,
        device=model.device,
        memory_estimate_mib=model.memory_estimate_mib,
        memory_measured_mib=model.memory_measured_mib,
        load_seconds=model.load_seconds,
        ttl_sec=model.ttl_sec,
        load_stage=_LOAD_STAGES.get(model.load_stage, ""),
        created_at=_datetime(model.created_at),
    )


def _server_info(server: model_pb2.ServerStatus) -> ServerInfo:
    return ServerInfo(
        state=_SERVER_STATES.get(server.state, ""),
        started_at=_datetime(server.started_at),
        epoch=server.epoch,
        version=server.version,
        cpu_mode=server.cpu_mode,
        updated_at=_datetime(server.updated_at),
    )


def _summary(summary: model_pb2.StatusSummary) -> StatusSummary:
    return StatusSummary(total=summary.total, by_state=dict(summary.by_state))


def _watch_event(response: model_control_service_pb2.WatchModelsResponse) -> WatchEvent | None:
    revision, event_id = response.revision, response.event_id
    kind = response.WhichOneof("event")
    if kind == "full_status":
        full = response.full_status
        server = _server_info(full.server)
        return WatchEvent(
            revision,
            event_id,
            kind,
            server=server,
            models=tuple(_model_info(model) for model in full.models),
            summary=_summary(full.summary),
            server_state=server.state,
        )
    if kind == "model_update":
        return WatchEvent(revision, event_id, kind, model=_model_info(response.model_update))
    if kind == "server_update":
        server = _server_info(response.server_update)
        return WatchEvent(revision, event_id, kind, server=server, server_state=server.state)
    if kind == "heartbeat":
        heartbeat = response.heartbeat
        return WatchEvent(
            revision,
            event_id,
            kind,
            timestamp=_datetime(heartbeat.timestamp),
            server_state=_SERVER_STATES.get(heartbeat.server_state, ""),
        )
    # An event kind this client does not know yet (a newer router) is skipped.
    return None
