"""Typed values the client returns: Generate events, model and server snapshots, watch events.

Usage:

```python
async for event in client.generate("qwen", body):
    match event:
        case clients.Queued(position=position):
            print(f"waiting, #{position}")
        case clients.Loading(stage=stage):
            print(f"loading the model: {stage}")
        case clients.Chunk(data=data):
            for chunk_json in data:
                send_sse(chunk_json)
        case clients.End(finish_reason=reason, usage=usage):
            print(reason, usage.total_tokens)
```

Every class is a frozen dataclass with slots, built by `RouterClient` from the router.v1
messages. Enum values become lower-case strings without their prefix (`MODEL_STATE_READY` is
"ready", `LOAD_STAGE_SPAWNING` is "spawning", an unset value is "unspecified", a value newer
than this client is ""), and unset timestamps become None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeAlias

__all__ = [
    "Chunk",
    "EmbedResult",
    "End",
    "GenerateEvent",
    "Loading",
    "ModelInfo",
    "ModelList",
    "Queued",
    "ServerInfo",
    "StatusSummary",
    "Timing",
    "Usage",
    "WatchEvent",
    "WatchEventKind",
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, as llama-server reported them.

    **Parameters:**

    * **prompt_tokens** - the prompt's tokens.
    * **completion_tokens** - the generated tokens.
    * **total_tokens** - prompt plus completion tokens.
    * **cached_tokens** - prompt tokens served from llama-server's prompt cache.
    """

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Timing:
    """A request's latency split into phases, in milliseconds.

    **Parameters:**

    * **queue_ms** - waiting for a slot, excluding the load.
    * **load_ms** - waiting for the model to load; 0 when it was ready.
    * **ttft_ms** - from the call's start to the first upstream output.
    * **total_ms** - from the call's start to its end.
    """

    queue_ms: float
    load_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits in its model's queue at the 1-based `position` of `queue_length`."""

    position: int
    queue_length: int


@dataclass(frozen=True, slots=True)
class Loading:
    """The model is being loaded for the request; `stage` is e.g. "loading_weights"."""

    stage: str
    elapsed_sec: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """Upstream output: OpenAI chunk JSON strings exactly as llama-server sent them.

    `data` holds one or more chunk objects of a streamed request (chunks read together ride in
    one event), or the one complete response object of a non-streamed request. It is a read-only
    view over the received message, not a copy. `text` is the generated text they add.
    """

    data: Sequence[str]
    text: str


@dataclass(frozen=True, slots=True)
class End:
    """The last event of a successful Generate call.

    **Parameters:**

    * **finish_reason** - the OpenAI finish reason: "stop", "length", "tool_calls"...
    * **usage** - the request's token counts.
    * **timing** - the request's latency phases.
    """

    finish_reason: str
    usage: Usage
    timing: Timing


GenerateEvent: TypeAlias = Queued | Loading | Chunk | End


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole answer to a non-streamed request (`RouterClient.complete`).

    **Parameters:**

    * **body** - llama-server's complete OpenAI response JSON object, verbatim.
    * **text** - the generated text.
    * **end** - the finish reason, token counts and latency phases.
    """

    body: str
    text: str
    end: End


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A snapshot of one configured model and its llama-server child (router.v1.Model).

    **Parameters:**

    * **alias** - the configured name requests use as `model`.
    * **state** - "stopped", "starting", "loading", "ready", "draining", "stopping" or "failed".
    * **kind** - "chat" (chat and text completions) or "embedding".
    * **port**, **pid** - the child's loopback port and process id; 0 when none runs.
    * **slots** - requests the router runs at once on the model.
    * **in_flight**, **queued** - requests running now, and waiting.
    * **n_ctx** - the configured context size in tokens, shared by the slots.
    * **pinned** - whether policy (idle TTL, eviction) never unloads the model.
    * **last_error** - a short summary of the last failure, "" when none.
    * **state_since** - when the model entered its state.
    * **last_used_at** - when its last request ended, None before the first.
    * **retry_at** - when a failed model's circuit half-opens, None unless failed.
    * **consecutive_failures** - failed loads or crashes since the last success.
    * **restarts** - child starts after the first one.
    * **device** - where the model is placed: "cpu" or "gpu:<index>".
    * **memory_estimate_mib**, **memory_measured_mib** - expected and measured memory; the
      measurement is 0 when unknown.
    * **load_seconds** - how long the last successful load took.
    * **ttl_sec** - idle time after which the model is unloaded; 0 when never.
    * **load_stage** - the step of the load in progress, e.g. "loading_weights";
      "unspecified" when no load runs.
    * **created_at** - the model file's modification time (OpenAI's `created`), None when the
      router could not read it.
    """

    alias: str
    state: str
    kind: str
    port: int
    pid: int
    slots: int
    in_flight: int
    queued: int
    n_ctx: int
    pinned: bool
    last_error: str
    state_since: datetime | None
    last_used_at: datetime | None
    retry_at: datetime | None
    consecutive_failures: int
    restarts: int
    device: str
    memory_estimate_mib: int
    memory_measured_mib: int
    load_seconds: float
    ttl_sec: int
    load_stage: str
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A snapshot of the router process (router.v1.ServerStatus).

    **Parameters:**

    * **state** - "starting" (still preloading), "serving" or "shutting_down".
    * **started_at** - when this router process started.
    * **epoch** - identifies this router run; watch revisions compare only within one epoch.
    * **version** - the router's version string.
    * **cpu_mode** - whether the router manages no GPU.
    * **updated_at** - when the server or any model last changed.
    """

    state: str
    started_at: datetime | None
    epoch: str
    version: str
    cpu_mode: bool
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """Model counts: `total`, and `by_state` from a lower-case state name to a count."""

    total: int
    by_state: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ModelList:
    """Every configured model in configuration order, with the router's status."""

    models: Sequence[ModelInfo]
    server: ServerInfo
    summary: StatusSummary


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One vector per input, `embeddings[i]` for input i, with the prompt token counts."""

    embeddings: list[list[float]]
    prompt_tokens: int
    total_tokens: int


WatchEventKind: TypeAlias = Literal["full_status", "model_update", "server_update", "heartbeat"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of the model status stream.

    `event_id` ("<epoch>-<revision>") resumes the stream after this event. Which payload fields
    are set depends on `kind`:

    * "full_status": `server`, `models` (every configured model) and `summary`;
    * "model_update": `model`, the changed model's new snapshot;
    * "server_update": `server`;
    * "heartbeat": `timestamp` and `server_state`.

    `server_state` is also set whenever `server` is, so it is known on every kind but
    "model_update".
    """

    revision: int
    event_id: str
    kind: WatchEventKind
    server: ServerInfo | None = None
    models: Sequence[ModelInfo] = ()
    summary: StatusSummary | None = None
    model: ModelInfo | None = None
    timestamp: datetime | None = None
    server_state: str | None = None
