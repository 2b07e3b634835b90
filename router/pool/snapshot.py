"""Plain-data views of models, shared by the pool, the status hub and the servicers."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from router.pool.state import ModelState


class ModelKind(enum.Enum):
    CHAT = "chat"
    EMBEDDING = "embedding"


class LoadStage(enum.Enum):
    NONE = "none"
    WAITING_FOR_CAPACITY = "waiting_for_capacity"
    EVICTING = "evicting"
    SPAWNING = "spawning"
    LOADING_WEIGHTS = "loading_weights"
    READY = "ready"


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """A model as seen at one instant (times are Unix seconds, 0 when unset)."""

    alias: str
    state: ModelState
    kind: ModelKind
    port: int
    pid: int
    slots: int
    in_flight: int
    queued: int
    n_ctx: int
    pinned: bool
    last_error: str
    state_since: float
    last_used_at: float
    retry_at: float
    consecutive_failures: int
    restarts: int
    device: str
    memory_estimate_mib: int
    memory_measured_mib: int
    load_seconds: float
    ttl_sec: float
    load_stage: LoadStage
    created_at: float
