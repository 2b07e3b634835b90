"""What one finished request looked like; the engine builds it, observers consume it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc


@dataclass(slots=True)
class RequestOutcome:
    model: str
    endpoint: str  # "chat", "completion" or "embeddings"
    started: float  # monotonic
    priority: str = ""  # "low", "normal" or "high" as the caller asked; "" = not recorded
    code: grpc.StatusCode | None = None  # None = success
    reason: str = ""  # ErrorInfo reason of a failure
    served: bool = False  # reached a model slot
    duration: float = 0.0
    queue_wait: float = 0.0
    load_wait: float = 0.0
    ttft: float = 0.0  # 0 = no output
    first_output: float = 0.0  # monotonic, 0 = none
    last_output: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    streamed: bool = False
    finish_reason: str = ""  # upstream's ("stop", "length", ...); "" = unfinished or embeddings

    @property
    def inter_token(self) -> float:
        """Mean seconds between generated tokens of a streamed request (0 when unknown)."""
        if not self.streamed or self.completion_tokens < 2 or not self.first_output:
            return 0.0
        return (self.last_output - self.first_output) / (self.completion_tokens - 1)


class OutcomeObserver(Protocol):
    def record(self, outcome: RequestOutcome) -> None: ...
