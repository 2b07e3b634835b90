"""Run one request on a model: admission, upstream call, events back to the caller.

``generate`` yields, in order: queue positions and load stages while waiting,
then batches of upstream chunks as they are read, then one ``Done``. Chunks
are llama-server's JSON verbatim; each is parsed once, only to pick out the
text, the finish reason and the usage. Leaving the generator early (the gRPC
call was cancelled or its deadline passed) closes the upstream connection,
which makes llama-server drop the task, and frees the slot.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from router.errors import (
    DeadlineExceeded,
    InvalidRequest,
    RouterError,
    Unavailable,
    UpstreamRejected,
    WrongModelKind,
)
from router.pool.pool import Pool
from router.pool.snapshot import LoadStage, ModelKind
from router.pool.supervisor import Lease, Supervisor, Ticket
from router.pool.upstream import Upstream, UpstreamBroken, UpstreamHTTPError, UpstreamTimeout
from router.scheduler.queue import Priority
from router.v1 import errors_pb2

CHAT = "chat"
COMPLETION = "completion"
_PATHS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions"}
CRASH_SETTLE_SEC = 0.5


@dataclass(frozen=True, slots=True)
class Queued:
    position: int
    queue_length: int


@dataclass(frozen=True, slots=True)
class Loading:
    stage: LoadStage
    elapsed_sec: float


@dataclass(frozen=True, slots=True)
class Chunks:
    data: list[str]
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Timing:
    queue_ms: float
    load_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str
    usage: Usage
    timing: Timing


GenerateEvent = Queued | Loading | Chunks | Done


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: list[list[float]]
    usage: Usage


@dataclass(frozen=True, slots=True)
class GenerateCall:
    model: str
    kind: str  # CHAT or COMPLETION
    body: str
    priority: Priority = Priority.NORMAL
    request_id: str = ""


class _Tally:
    """What the chunks of one response said about its end."""

    __slots__ = ("finish_reason", "timings", "usage")

    def __init__(self) -> None:
        self.finish_reason = ""
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None

    def read(self, chunk: dict[str, Any], kind: str) -> str:
        """Record end information from one chunk and return the text it adds."""
        text = ""
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            if kind == CHAT:
                delta = choice.get("delta") or choice.get("message") or {}
                text = delta.get("content") or ""
            else:
                text = choice.get("text") or ""
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reason = reason
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        timings = chunk.get("timings")
        if timings:
            self.timings = timings
        return text

    def usage_counts(self) -> Usage:
        if self.usage:
            details = self.usage.get("prompt_tokens_details") or {}
            return Usage(
                prompt_tokens=int(self.usage.get("prompt_tokens", 0)),
                completion_tokens=int(self.usage.get("completion_tokens", 0)),
                total_tokens=int(self.usage.get("total_tokens", 0)),
                cached_tokens=int(details.get("cached_tokens", 0)),
            )
        if self.timings:
            # Chat streams carry usage only on request; llama-server's timings say the same.
            cached = int(self.timings.get("cache_n", 0))
            prompt = cached + int(self.timings.get("prompt_n", 0))
            completion = int(self.timings.get("predicted_n", 0))
            return Usage(prompt, completion, prompt + completion, cached)
        return Usage()


def parse_body(body: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"body is not valid JSON: {error.msg}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("body must be a JSON object")
    stream = parsed.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean")
    return parsed


async def _failure(error: Exception, lease: Lease, supervisor: Supervisor) -> RouterError:
    if isinstance(error, UpstreamBroken) and lease.abort_error is None:
        # A broken connection usually means the child died; let its exit be reaped
        # first so the crash is recorded before this caller (or the next) moves on.
        await supervisor.settle_child(CRASH_SETTLE_SEC)
    return upstream_error(error, lease, supervisor)


def upstream_error(error: Exception, lease: Lease | None, supervisor: Supervisor) -> RouterError:
    """Map a failure of the upstream call to what the caller sees."""
    if lease is not None and lease.abort_error is not None:
        return lease.abort_error
    if isinstance(error, UpstreamHTTPError):
        return _rejected(error)
    if isinstance(error, UpstreamTimeout):
        supervisor.suspect()
        return DeadlineExceeded(
            f"model '{supervisor.alias}' sent nothing for "
            f"{supervisor.settings.request_timeout_sec:g} s",
            reason=errors_pb2.ERROR_REASON_UPSTREAM_TIMEOUT,
        )
    return Unavailable(
        f"the connection to model '{supervisor.alias}' broke",
        reason=errors_pb2.ERROR_REASON_MODEL_CRASHED,
        retry_after=1.0,
    )


def _rejected(error: UpstreamHTTPError) -> RouterError:
    message, kind = "the model server rejected the request", ""
    try:
        payload = json.loads(error.body)
        detail = payload.get("error", payload) if isinstance(payload, dict) else {}
        if isinstance(detail, dict):
            message = str(detail.get("message") or message)[:500]
            kind = str(detail.get("type") or "")
    except ValueError:
        pass
    if 400 <= error.status < 500:
        return UpstreamRejected(
            message, metadata={"upstream_status": str(error.status), "upstream_type": kind}
        )
    return Unavailable(
        "the model server failed to process the request",
        reason=errors_pb2.ERROR_REASON_UPSTREAM_ERROR,
        retry_after=1.0,
    )


class Engine:
    """The inference use cases over the pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def _model(self, alias: str, kind: ModelKind) -> Supervisor:
        supervisor = self._pool.get(alias)
        if supervisor.settings.kind is not kind:
            if kind is ModelKind.EMBEDDING:
                raise WrongModelKind(
                    f"model '{alias}' does not serve embeddings (it is not started with "
                    "embedding: true)"
                )
            raise WrongModelKind(f"model '{alias}' is an embedding model; use /v1/embeddings")
        return supervisor

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateEvent]:
        started = time.monotonic()
        if call.kind not in _PATHS:
            raise InvalidRequest("kind must be chat or completion")
        supervisor = self._model(call.model, ModelKind.CHAT)
        parsed = parse_body(call.body)
        body = call.body
        if parsed.get("model") != call.model:
            parsed["model"] = call.model
            body = json.dumps(parsed, separators=(",", ":"))
        stream = parsed.get("stream", False)
        ticket = supervisor.enter(call.priority)
        lease: Lease | None = None
        try:
            async for progress in _wait(ticket, started):
                yield progress
            lease = ticket.lease
            tally = _Tally()
            ttft = 0.0
            path = _PATHS[call.kind]
            encoded = body.encode()
            try:
                if stream:
                    response = await lease.upstream.open_stream(path, encoded)
                    lease.response = response
                    try:
                        if lease.abort_error is not None:
                            raise lease.abort_error
                        async for payloads in Upstream.iter_events(response):
                            if not ttft:
                                ttft = time.monotonic() - started
                            texts = [tally.read(json.loads(p), call.kind) for p in payloads]
                            yield Chunks([p.decode() for p in payloads], "".join(texts))
                    finally:
                        response.close()
                else:
                    payload = await lease.upstream.post(path, encoded)
                    ttft = time.monotonic() - started
                    text = tally.read(json.loads(payload), call.kind)
                    yield Chunks([payload.decode()], text)
            except (UpstreamHTTPError, UpstreamTimeout, UpstreamBroken) as error:
                raise await _failure(error, lease, supervisor) from None
            except ValueError:
                raise Unavailable(
                    "the model server sent a malformed response",
                    reason=errors_pb2.ERROR_REASON_UPSTREAM_ERROR,
                ) from None
            if lease.abort_error is not None:
                raise lease.abort_error
            total = time.monotonic() - started
            yield Done(
                tally.finish_reason,
                tally.usage_counts(),
                Timing(
                    queue_ms=ticket.queue_wait_sec * 1000,
                    load_ms=ticket.load_wait_sec * 1000,
                    ttft_ms=ttft * 1000,
                    total_ms=total * 1000,
                ),
            )
        finally:
            ticket.close()

    async def embed(
        self,
        model: str,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        priority: Priority = Priority.NORMAL,
    ) -> EmbedResult:
        if not inputs:
            raise InvalidRequest("at least one input is required")
        supervisor = self._model(model, ModelKind.EMBEDDING)
        body = json.dumps(
            {"model": model, "input": [list(i) if not isinstance(i, str) else i for i in inputs]},
            separators=(",", ":"),
        ).encode()
        ticket = supervisor.enter(priority)
        lease: Lease | None = None
        try:
            async for _ in ticket.progress():
                pass
            lease = ticket.lease
            try:
                payload = await lease.upstream.post("/v1/embeddings", body)
            except (UpstreamHTTPError, UpstreamTimeout, UpstreamBroken) as error:
                raise await _failure(error, lease, supervisor) from None
            return _embeddings(payload, len(inputs))
        finally:
            ticket.close()


async def _wait(ticket: Ticket, started: float) -> AsyncIterator[Queued | Loading]:
    async for progress in ticket.progress():
        if isinstance(progress, LoadStage):
            yield Loading(progress, time.monotonic() - started)
        else:
            yield Queued(*progress)


def _embeddings(payload: bytes, count: int) -> EmbedResult:
    try:
        parsed = json.loads(payload)
        vectors: list[list[float] | None] = [None] * count
        for item in parsed["data"]:
            vectors[int(item["index"])] = [float(v) for v in item["embedding"]]
        usage = parsed.get("usage") or {}
    except (ValueError, KeyError, TypeError, IndexError):
        raise Unavailable(
            "the model server sent a malformed embeddings response",
            reason=errors_pb2.ERROR_REASON_UPSTREAM_ERROR,
        ) from None
    if any(v is None for v in vectors):
        raise Unavailable(
            "the model server returned fewer embeddings than inputs",
            reason=errors_pb2.ERROR_REASON_UPSTREAM_ERROR,
        )
    prompt = int(usage.get("prompt_tokens", 0))
    return EmbedResult(
        [v for v in vectors if v is not None],
        Usage(prompt_tokens=prompt, total_tokens=int(usage.get("total_tokens", prompt))),
    )


def new_request_id() -> str:
    return uuid.uuid4().hex
