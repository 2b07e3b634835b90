"""Run one request on a model: admission, upstream call, events back to the caller.

``generate`` yields, in order: queue positions and load stages while waiting,
then batches of upstream chunks as they are read (paced, see
``system.stream_pacing_ms``), then one ``Done`` (which carries the last batch
when that batch ended the response). Chunks are llama-server's JSON
verbatim; only what is needed is read from them: the text, and from the few
chunks that can carry them the finish reason and the usage. Leaving the
generator early (the gRPC call was cancelled or its deadline passed) closes the
upstream connection, which makes llama-server drop the task, and frees the slot.
``complete`` runs a request that does not stream through the same path and
returns its whole answer at once (the unary Complete RPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from router.config import SystemConfig
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
from router.pool.supervisor import Supervisor
from router.pool.ticket import Lease, Ticket
from router.pool.upstream import EventReader, UpstreamBroken, UpstreamHTTPError, UpstreamTimeout
from router.scheduler.queue import Priority
from router.telemetry.records import OutcomeObserver, RequestOutcome
from router.v1 import errors_pb2

_LOGGER = logging.getLogger(__name__)
CHAT = "chat"
COMPLETION = "completion"
EMBEDDINGS = "embeddings"
_PATHS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions"}
CRASH_SETTLE_SEC = 0.5
# Pacing of streamed output (system.stream_pacing_ms; 0 turns it off). Once a stream has sent
# text, its next message leaves no sooner than the pacing x (streams in flight) after the last
# one (at most MAX_HOLD_SEC):
# output arriving faster waits and leaves as one fuller message. Every gRPC message costs
# CPU in the router and again in the facade, CPU that llama-server then lacks: ~50 µs a side
# back to back, ~0.3 ms a side when the loops sleep between messages (grpc.aio, measured on
# a 2-core VM), so this bounds the router's message rate near 1 / pacing whatever the
# concurrency. Measured with the tiny model (~7k tokens/s) at 8 streams (`make bench`):
# ~15 chunks per message instead of ~1.2, and llama-server's own time per request 108-113 ms
# instead of 134-144 ms (92-102 ms with no router at all); a fixed 2 ms hold per stream only
# reached 136 ms. The first text and the end of a response are never held, and a model
# slower than one token per hold is never held at all.
MAX_HOLD_SEC = 0.025
# llama-server's spelling of a streamed chunk that only adds text, around that text (a JSON
# string): such chunks are read without parsing them whole. Anything else is parsed.
_CHAT_TEXT = ('{"choices":[{"finish_reason":null,"index":0,"delta":{"content":', "}}],")
_COMPLETION_TEXT = ('{"choices":[{"text":', ',"index":0,"logprobs":null,"finish_reason":null}],')
_json_value = json.JSONDecoder().raw_decode
# llama-server's error (a 500) for an embedding input longer than its micro-batch: the input
# can never succeed on this model, so it is the caller's error, not a retryable failure.
_TOO_LONG_TO_EMBED = b"too large to process"


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
    # A stream's last chunks when they came with its end: they travel with Done, one gRPC
    # message less per stream (see End.chunk).
    last: Chunks | None = None


GenerateEvent = Queued | Loading | Chunks | Done


@dataclass(frozen=True, slots=True)
class Completion:
    """A non-streamed response: llama-server's body, its text, and how it ended."""

    body: str
    text: str
    done: Done


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
    deadline: float | None = None  # the caller's, time.monotonic(); None = no deadline


# A cancellation this close to the caller's deadline is that deadline passing.
_DEADLINE_SLACK_SEC = 0.01


class _Tally:
    """What the chunks of one response said about its end."""

    __slots__ = ("finish_reason", "timings", "usage")

    def __init__(self) -> None:
        self.finish_reason = ""
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None

    def read_streamed(self, chunk: str, kind: str) -> str:
        """Like ``read`` for a streamed chunk's JSON text, parsing only what it must.

        A chunk in llama-server's text-only shape (one choice, no finish reason, no usage or
        timings) carries nothing for the end: only its text is decoded. The JSON spelling
        is exact, so keys cannot hide in strings: there a quote is always escaped.
        """
        head, tail = _CHAT_TEXT if kind == CHAT else _COMPLETION_TEXT
        if chunk.startswith(head) and '"usage"' not in chunk and '"timings"' not in chunk:
            text, end = _json_value(chunk, len(head))
            if type(text) is str and chunk.startswith(tail, end):
                return text
        return self.read(json.loads(chunk), kind)

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
    except RecursionError:  # json's recursive decoder on e.g. "[" * 100000
        raise InvalidRequest("body is nested too deeply") from None
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


_DEFAULTS = SystemConfig()  # the configuration's defaults are the one source of these


@dataclass(frozen=True, slots=True)
class Limits:
    max_messages: int = _DEFAULTS.max_messages
    max_embedding_inputs: int = _DEFAULTS.max_embedding_inputs
    # Per stream in flight; 0 = every read goes out at once.
    stream_pacing_sec: float = _DEFAULTS.stream_pacing_ms / 1000

    @classmethod
    def of(cls, system: SystemConfig) -> Limits:
        return cls(system.max_messages, system.max_embedding_inputs, system.stream_pacing_ms / 1000)


# llama-server reads the first of these that is present (measured: n_predict, then
# max_completion_tokens, then max_tokens), and -1 means "until the context is full".
_TOKEN_FIELDS = ("n_predict", "max_completion_tokens", "max_tokens")


def apply_limits(
    parsed: dict[str, Any], kind: str, n_ctx: int, cap: int | None, limits: Limits
) -> bool:
    """Refuse what cannot be served before it is queued; return True if ``parsed`` changed.

    A requested length beyond the model's cap or its whole context can never succeed. With a
    cap, -1 becomes the cap, and ``n_predict`` is always written with the length llama-server
    would have honoured: it is the field every llama-server reads first, so the body sent
    cannot exceed the cap whichever names or order a given llama-server version knows.
    """
    honoured: int | None = None  # the length llama-server will use
    changed = False
    for name in _TOKEN_FIELDS:
        if name not in parsed:
            continue
        value = parsed[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < -1 or value == 0:
            raise InvalidRequest(f"'{name}' must be a positive integer", metadata={"param": name})
        if value > n_ctx:
            raise InvalidRequest(
                f"'{name}' is {value} but the model's context is {n_ctx} tokens",
                metadata={"param": name},
            )
        if cap is not None and value > cap:
            raise InvalidRequest(
                f"'{name}' is {value} but this model allows at most {cap}",
                metadata={"param": name},
            )
        if cap is not None and value == -1:
            parsed[name] = value = cap
            changed = True
        if honoured is None:
            honoured = value
    if kind == CHAT:
        messages = parsed.get("messages")
        if isinstance(messages, list) and len(messages) > limits.max_messages:
            raise InvalidRequest(
                f"too many messages ({len(messages)} > {limits.max_messages})",
                metadata={"param": "messages"},
            )
    if cap is not None and parsed.get("n_predict") is None:
        parsed["n_predict"] = cap if honoured is None else honoured
        changed = True
    return changed


_MEDIA_PARTS = {"image_url": "image", "input_audio": "audio"}


def _check_no_media(parsed: dict[str, Any], alias: str) -> None:
    """Refuse image and audio content for a model without a projector. llama-server refuses
    it too, but with a 500, which would reach the caller as a retryable 503."""
    messages = parsed.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            media = _MEDIA_PARTS.get(kind) if isinstance(kind, str) else None
            if media is not None:
                raise InvalidRequest(
                    f"model '{alias}' does not take {media} input (it runs without a "
                    "multimodal projector)",
                    metadata={"param": "messages"},
                )


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
    """The inference use cases over the pool.

    Every request for a configured model ends in one ``RequestOutcome`` given to
    the observers (metrics, the rolling summary) and to the current trace span.
    A request for an unknown alias is refused before any of that: it leaves no trace.
    """

    def __init__(
        self,
        pool: Pool,
        observers: Sequence[OutcomeObserver] = (),
        limits: Limits | None = None,
    ) -> None:
        self._pool = pool
        self._observers = tuple(observers)
        self._limits = limits or Limits()
        self._streams = 0  # streamed responses being read from upstream

    @staticmethod
    def _check_kind(supervisor: Supervisor, kind: ModelKind) -> None:
        if supervisor.settings.kind is kind:
            return
        alias = supervisor.alias
        if kind is ModelKind.EMBEDDING:
            raise WrongModelKind(
                f"model '{alias}' does not serve embeddings (it is not started with "
                "embedding: true)"
            )
        raise WrongModelKind(f"model '{alias}' is an embedding model; use /v1/embeddings")

    @contextlib.contextmanager
    def _observed(
        self, outcome: RequestOutcome, deadline: float | None
    ) -> Iterator[RequestOutcome]:
        try:
            yield outcome
        except RouterError as error:
            outcome.code, outcome.reason = error.code, error.reason_name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio cancels the handler both when the caller goes and when the caller's
            # deadline passes; in the second case the caller was told DEADLINE_EXCEEDED.
            if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_SEC:
                outcome.code, outcome.reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE"
            else:
                outcome.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            outcome.code, outcome.reason = grpc.StatusCode.INTERNAL, "INTERNAL"
            raise
        finally:
            self._record(outcome)

    def _record(self, outcome: RequestOutcome) -> None:
        outcome.duration = time.monotonic() - outcome.started
        if outcome.first_output and not outcome.ttft:  # it ended early, after output
            outcome.ttft = outcome.first_output - outcome.started
        for observer in self._observers:
            observer.record(outcome)
        _annotate_span(outcome)
        if _LOGGER.isEnabledFor(logging.DEBUG):  # a line per request only when asked
            _log_outcome(outcome)

    def record_refusal(
        self, model: str, endpoint: str, priority: Priority, error: RouterError
    ) -> None:
        """Count a request its key could not make (authentication, scope, rate limit): it never
        reached ``generate``/``embed``, but it is a 4xx for its model all the same. Only for a
        configured model, so that labels stay bounded."""
        if not self._pool.has(model):
            return
        outcome = RequestOutcome(model, endpoint, time.monotonic(), priority.name.lower())
        outcome.code, outcome.reason = error.code, error.reason_name
        self._record(outcome)

    async def complete(self, call: GenerateCall) -> Completion:
        """Run a request whose body does not ask for a stream; return its whole response."""
        body, text, done = "", "", None
        # Read to the end, not just to Done: leaving early would close the generator as if
        # the caller had gone (a CANCELLED outcome, the slot freed only at finalization).
        async for event in self.generate(call, stream_allowed=False):
            if type(event) is Chunks:
                body, text = event.data[0], event.text
            elif type(event) is Done:
                done = event
        assert done is not None, "generate() ends with Done or raises"
        return Completion(body, text, done)

    async def generate(
        self, call: GenerateCall, *, stream_allowed: bool = True
    ) -> AsyncIterator[GenerateEvent]:
        started = time.monotonic()
        if call.kind not in _PATHS:
            raise InvalidRequest("kind must be chat or completion")
        supervisor = self._pool.get(call.model)
        outcome = RequestOutcome(call.model, call.kind, started, call.priority.name.lower())
        with self._observed(outcome, call.deadline):
            self._check_kind(supervisor, ModelKind.CHAT)
            parsed = parse_body(call.body)
            body = call.body
            settings = supervisor.settings
            changed = apply_limits(
                parsed, call.kind, settings.spec.n_ctx, settings.max_tokens_cap, self._limits
            )
            if call.kind == CHAT and not settings.spec.multimodal:
                _check_no_media(parsed, call.model)
            if parsed.get("model") != call.model or changed:
                parsed["model"] = call.model
                body = json.dumps(parsed, separators=(",", ":"))
            outcome.streamed = stream = parsed.get("stream", False)
            if stream and not stream_allowed:
                raise InvalidRequest(
                    "'stream' must be false here; use Generate for a streamed response",
                    metadata={"param": "stream"},
                )
            ticket = supervisor.enter(call.priority)
            try:
                async for progress in _wait(ticket, started):
                    yield progress
                outcome.served = True
                _waited(outcome, ticket)
                async for event in self._run(
                    supervisor, ticket.lease, call.kind, body, stream, outcome
                ):
                    yield event
            finally:
                _waited(outcome, ticket)  # also when it gave up or timed out waiting
                ticket.close()

    async def _run(
        self,
        supervisor: Supervisor,
        lease: Lease,
        kind: str,
        body: str,
        stream: bool,
        outcome: RequestOutcome,
    ) -> AsyncIterator[GenerateEvent]:
        tally = _Tally()
        path = _PATHS[kind]
        encoded = body.encode()
        last: Chunks | None = None
        try:
            if stream:
                response = await lease.upstream.open_stream(path, encoded)
                lease.response = response
                try:
                    if lease.abort_error is not None:
                        raise lease.abort_error
                    reader = EventReader(response)
                    events = self._stream(reader, kind, tally, outcome)
                    async with contextlib.aclosing(events):
                        async for event in events:
                            if reader.finished:
                                last = event  # it goes with Done
                            else:
                                yield event
                finally:
                    response.close()
            else:
                payload = await lease.upstream.post(path, encoded)
                outcome.first_output = outcome.last_output = time.monotonic()
                text = tally.read(json.loads(payload), kind)
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
        usage = tally.usage_counts()
        outcome.prompt_tokens, outcome.completion_tokens = (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        if outcome.first_output:
            outcome.ttft = outcome.first_output - outcome.started
        outcome.finish_reason = tally.finish_reason
        yield Done(
            tally.finish_reason,
            usage,
            Timing(
                queue_ms=outcome.queue_wait * 1000,
                load_ms=outcome.load_wait * 1000,
                ttft_ms=outcome.ttft * 1000,
                total_ms=(time.monotonic() - outcome.started) * 1000,
            ),
            last,
        )

    async def _stream(
        self, reader: EventReader, kind: str, tally: _Tally, outcome: RequestOutcome
    ) -> AsyncGenerator[Chunks, None]:
        """The upstream events as Chunks, paced (see MAX_HOLD_SEC) once text flows."""
        hold_until = 0.0
        self._streams += 1
        try:
            while payloads := await reader.batch(hold_until):
                now = time.monotonic()
                if not outcome.first_output:
                    outcome.first_output = now
                outcome.last_output = now
                data = [p.decode() for p in payloads]
                text = "".join([tally.read_streamed(d, kind) for d in data])
                yield Chunks(data, text)
                if text and self._limits.stream_pacing_sec:
                    hold = min(MAX_HOLD_SEC, self._limits.stream_pacing_sec * self._streams)
                    hold_until = time.monotonic() + hold
        finally:
            self._streams -= 1

    async def embed(
        self,
        model: str,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        priority: Priority = Priority.NORMAL,
        deadline: float | None = None,
    ) -> EmbedResult:
        started = time.monotonic()
        supervisor = self._pool.get(model)
        outcome = RequestOutcome(model, EMBEDDINGS, started, priority.name.lower())
        with self._observed(outcome, deadline):
            self._check_kind(supervisor, ModelKind.EMBEDDING)
            if not inputs:
                raise InvalidRequest("at least one input is required")
            if len(inputs) > self._limits.max_embedding_inputs:
                raise InvalidRequest(
                    f"too many inputs ({len(inputs)} > {self._limits.max_embedding_inputs})",
                    metadata={"param": "input"},
                )
            body = json.dumps(
                {"model": model, "input": [i if isinstance(i, str) else list(i) for i in inputs]},
                separators=(",", ":"),
            ).encode()
            ticket = supervisor.enter(priority)
            try:
                async for _ in ticket.progress():
                    pass
                outcome.served = True
                _waited(outcome, ticket)
                lease = ticket.lease
                try:
                    payload = await lease.upstream.post("/v1/embeddings", body)
                except (UpstreamHTTPError, UpstreamTimeout, UpstreamBroken) as error:
                    if isinstance(error, UpstreamHTTPError) and _TOO_LONG_TO_EMBED in error.body:
                        raise InvalidRequest(
                            f"an input is longer than model '{model}' embeds at once "
                            f"({supervisor.settings.spec.micro_batch} tokens)",
                            metadata={"param": "input"},
                        ) from None
                    raise await _failure(error, lease, supervisor) from None
                result = _embeddings(payload, len(inputs))
                outcome.prompt_tokens = result.usage.prompt_tokens
                return result
            finally:
                _waited(outcome, ticket)
                ticket.close()


def _log_outcome(outcome: RequestOutcome) -> None:
    status = "ok" if outcome.code is None else outcome.code.name
    _LOGGER.debug(
        "%s %s: %s%s in %.1f ms (queue %.1f ms, load %.1f ms, ttft %.1f ms, tokens %d in / %d out)",
        outcome.endpoint,
        outcome.model,
        status,
        f" ({outcome.reason})" if outcome.reason else "",
        outcome.duration * 1000,
        outcome.queue_wait * 1000,
        outcome.load_wait * 1000,
        outcome.ttft * 1000,
        outcome.prompt_tokens,
        outcome.completion_tokens,
    )


def _annotate_span(outcome: RequestOutcome) -> None:
    """Put the request's facts on the current (router server) span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "routermodel.model": outcome.model,
            "routermodel.endpoint": outcome.endpoint,
            "routermodel.queue_ms": outcome.queue_wait * 1000,
            "routermodel.load_ms": outcome.load_wait * 1000,
            "routermodel.ttft_ms": outcome.ttft * 1000,
            "routermodel.tokens_in": outcome.prompt_tokens,
            "routermodel.tokens_out": outcome.completion_tokens,
        }
    )
    if outcome.priority:
        span.set_attribute("routermodel.priority", outcome.priority)
    if outcome.finish_reason:
        span.set_attribute("routermodel.finish_reason", outcome.finish_reason)
    if outcome.reason:
        span.set_attribute("routermodel.error_reason", outcome.reason)


def _waited(outcome: RequestOutcome, ticket: Ticket) -> None:
    outcome.queue_wait, outcome.load_wait = ticket.queue_wait_sec, ticket.load_wait_sec


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
