"""Who may call what: API keys, scopes, model allow-lists, priority rights, rate limits.

The router is the one place that enforces these; the facade forwards each
caller's key, so gRPC callers cannot bypass anything the HTTP side checks.

Access per RPC (with keys configured; without keys everything is open, which
the configuration only allows on loopback):

    public     grpc.health.v1                         no key
    any key    server reflection                      any valid key
    read       ListModels, GetModel                   inference, monitor or admin
    inference  Generate, Complete, Embed              inference or admin
    monitor    WatchModels, queue stats, resources,   monitor or admin
               model health, failed models, summary
    admin      LoadModel, UnloadModel, ResetModel,    admin
               GetModelLogs (and anything unlisted)

A model outside a key's allow-list is reported as not found, as OpenAI does.
Keys are compared in constant time.

Rate limits: a request takes one unit from its key's request bucket when admitted; tokens are
charged after the fact (``TokenCharge``: usage, or the chunks delivered when a stream ends
early), and a key is refused while its token bucket is empty or in debt. Requests admitted
together can overdraw it; the debt then delays the key's next requests, so the rate holds
on average.
"""

from __future__ import annotations

import contextvars
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from router.config import ApiKey
from router.errors import (
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    RouterError,
    Unauthenticated,
)
from router.interceptors import Bidi, Stream, Unary, responses, rewrap
from router.v1 import inference_service_pb2

_INFERENCE = "/router.v1.InferenceService/"
_CONTROL = "/router.v1.ModelControlService/"
REQUIRED: dict[str, str] = {
    _INFERENCE + "Generate": "inference",
    _INFERENCE + "Complete": "inference",
    _INFERENCE + "Embed": "inference",
    _CONTROL + "ListModels": "read",
    _CONTROL + "GetModel": "read",
    _CONTROL + "WatchModels": "monitor",
    _CONTROL + "ListFailedModels": "monitor",
    _CONTROL + "GetQueueStats": "monitor",
    _CONTROL + "GetResources": "monitor",
    _CONTROL + "GetModelHealth": "monitor",
    _CONTROL + "GetTelemetrySummary": "monitor",
    _CONTROL + "LoadModel": "admin",
    _CONTROL + "UnloadModel": "admin",
    _CONTROL + "ResetModel": "admin",
    _CONTROL + "GetModelLogs": "admin",
}
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)
_ANY_KEY_PREFIXES = ("/grpc.reflection.",)


def allows(scopes: Iterable[str], required: str) -> bool:
    granted = set(scopes)
    if "admin" in granted:
        return True
    if required == "read":
        return bool(granted & {"inference", "monitor"})
    return required in granted


class TokenBucket:
    """``per_minute`` units, refilled continuously; the burst is one minute's worth."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._level = self._capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self._capacity, self._level + (now - self._updated) * self._rate)
        self._updated = now

    @property
    def level(self) -> float:
        """Units available now (negative while in debt)."""
        self._refill()
        return self._level

    def take(self, amount: float = 1.0) -> float:
        """Take ``amount`` now and return 0, or return the seconds until it could be taken."""
        self._refill()
        if self._level >= amount:
            self._level -= amount
            return 0.0
        return (amount - self._level) / self._rate

    def wait_for_positive(self) -> float:
        """Seconds until the bucket holds anything (0 when it does)."""
        self._refill()
        return 0.0 if self._level > 0 else (1e-6 - self._level) / self._rate

    def debit(self, amount: float) -> None:
        """Charge what a request used after the fact (the level may go negative)."""
        self._refill()
        self._level -= amount


@dataclass(eq=False)
class Principal:
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None  # None = every model
    allow_high_priority: bool
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    key: bytes = field(default=b"", repr=False)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("anonymous", frozenset({"admin"}), None, True)
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being served (ANONYMOUS when no keys are configured)."""
    return _current.get()


def visible(aliases: Iterable[str]) -> list[str]:
    principal = current_principal()
    return [alias for alias in aliases if principal.may_use(alias)]


def presented_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key from ``authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    for name, value in metadata:
        lowered = name.lower()
        if lowered not in ("authorization", "x-api-key"):
            continue  # other headers may be binary (-bin): any bytes, not ours to decode
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        if lowered == "authorization" and text[:7].lower() == "bearer ":
            return text[7:].strip()
        if lowered == "x-api-key":
            return text.strip()
    return None


class Authenticator:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.enabled = bool(keys)
        self._principals = [
            Principal(
                name=key.name or f"key#{index + 1}",
                scopes=frozenset(key.scopes),
                models=frozenset(key.models) if key.models is not None else None,
                allow_high_priority=key.allow_high_priority,
                requests=TokenBucket(key.requests_per_minute) if key.requests_per_minute else None,
                tokens=TokenBucket(key.tokens_per_minute) if key.tokens_per_minute else None,
                key=key.key.encode(),
            )
            for index, key in enumerate(keys)
        ]

    def principal(self, key: str | None) -> Principal | None:
        """The principal holding ``key`` (ANONYMOUS when auth is off), None when unknown."""
        if not self.enabled:
            return ANONYMOUS
        if not key:
            return None
        candidate = key.encode()
        found = None
        for principal in self._principals:  # no early exit: same time whichever key matches
            if hmac.compare_digest(principal.key, candidate):
                found = principal
        return found

    def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The caller of ``method``, or raise Unauthenticated / PermissionDenied."""
        if method.startswith(_PUBLIC_PREFIXES) or not self.enabled:
            return ANONYMOUS
        principal = self.principal(presented_key(metadata))
        if principal is None:
            raise Unauthenticated("a valid API key is required (Authorization: Bearer <key>)")
        if method.startswith(_ANY_KEY_PREFIXES):
            return principal
        required = REQUIRED.get(method, "admin")
        if not allows(principal.scopes, required):
            raise PermissionDenied(f"this key lacks the '{required}' scope")
        return principal


_METERED = (
    inference_service_pb2.GenerateRequest,
    inference_service_pb2.CompleteRequest,
    inference_service_pb2.EmbedRequest,
)


def check_request(principal: Principal, request: Any) -> None:
    """Per-request rules: model allow-list, HIGH priority, rate limits (inference only)."""
    model = getattr(request, "model", "")
    if model and not principal.may_use(model):
        raise ModelNotFound(model)
    priority = getattr(request, "priority", None)
    if priority == inference_service_pb2.PRIORITY_HIGH and not principal.allow_high_priority:
        raise PermissionDenied("this key may not use high priority")
    if isinstance(request, _METERED):
        for bucket, what in ((principal.tokens, "tokens"), (principal.requests, "requests")):
            if bucket is None:
                continue
            wait = bucket.wait_for_positive() if what == "tokens" else bucket.take()
            if wait:
                raise RateLimited(f"rate limit of this key's {what} reached", retry_after=wait)


class TokenCharge:
    """The tokens one call used, charged to its key's bucket once.

    Why after the fact rather than reserving max_tokens up front: this interceptor does not
    know the length a request will be given (the model's cap and context live in the pool, and
    the body is JSON only the engine parses), so a reservation would be a guess needing a
    refund path anyway. Usage from llama-server (the End event) is exact; a stream that is
    abandoned or fails before its End is charged one token per upstream chunk it delivered
    (llama-server streams one token per chunk), so leaving early is no way around the limit.
    A unary call (Complete, Embed) that ends without its response delivered nothing and is
    charged nothing: its usage is unknown, and `requests_per_minute` bounds how often a key can
    start calls it then abandons.
    """

    __slots__ = ("_bucket", "_pending")

    def __init__(self, bucket: TokenBucket) -> None:
        self._bucket = bucket
        self._pending = 0

    def count(self, response: Any) -> None:
        """Account for one response message about to be sent."""
        if isinstance(response, inference_service_pb2.GenerateResponse):
            if response.HasField("chunk"):
                self._pending += len(response.chunk.data)
            elif response.HasField("end"):
                self._settle_end(response.end, unreported=self._pending)  # the chunk count
        elif isinstance(response, inference_service_pb2.CompleteResponse):
            self._settle_end(response.end, unreported=1)  # as a non-streamed Generate's chunk
        elif isinstance(response, inference_service_pb2.EmbedResponse):
            self._pending = response.usage.prompt_tokens
            self.settle()

    def _settle_end(self, end: inference_service_pb2.End, unreported: int) -> None:
        """Charge a finished call's usage; usage 0 means llama-server did not report it."""
        self._pending = end.usage.prompt_tokens + end.usage.completion_tokens or unreported
        self.settle()

    def settle(self) -> None:
        """Charge what is counted and not yet charged (safe to call any number of times)."""
        if self._pending:
            self._bucket.debit(self._pending)
            self._pending = 0


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in grpc-stubs, not at runtime
    _ServerInterceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_ServerInterceptor):
    """Authenticate each call, authorize it, and rate-limit it; errors surface as statuses
    through the error interceptor around this one. ``on_refused`` hears of each refused
    call with its request (the router counts those for a model in its metrics)."""

    def __init__(
        self,
        authenticator: Authenticator,
        on_refused: Callable[[Any, RouterError], None] | None = None,
    ) -> None:
        self._auth = authenticator
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not self._auth.enabled:
            return handler
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata or ()

        def admit(request: Any) -> Principal:
            try:
                principal = self._auth.authorize(method, metadata)
                check_request(principal, request)
            except RouterError as error:
                if self._on_refused is not None:
                    self._on_refused(request, error)
                raise
            _current.set(principal)
            return principal

        def guard_unary(behavior: Unary) -> Unary:
            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal = admit(request)
                response = await behavior(request, context)
                if principal.tokens is not None:
                    TokenCharge(principal.tokens).count(response)
                return response

            return guarded

        def guard_stream(behavior: Stream) -> Stream:
            async def guarded(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                principal = admit(request)
                if principal.tokens is None:
                    async for response in responses(behavior, request, context):
                        yield response
                    return
                charge = TokenCharge(principal.tokens)
                # grpc.aio does not always resume a streaming handler whose client went away
                # (see router.interceptors._EarlyEnd), so the call's end settles the charge too.
                context.add_done_callback(lambda _: charge.settle())  # type: ignore[arg-type]
                try:
                    async for response in responses(behavior, request, context):
                        charge.count(response)
                        yield response
                finally:
                    charge.settle()

            return guarded

        def guard_bidi(behavior: Bidi) -> Bidi:  # server reflection: any valid key
            async def guarded(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                _current.set(self._auth.authorize(method, metadata))
                async for response in responses(behavior, requests, context):
                    yield response

            return guarded

        return rewrap(
            handler,
            unary=guard_unary,
            stream=guard_stream,
            bidi=guard_bidi,
            refuse=PermissionDenied("this method cannot be authorized"),
        )
