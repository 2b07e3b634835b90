"""A rolling-window summary of requests, in total and per model (GetTelemetrySummary).

Numbers are numbers (the seed returned "0.123s" strings), and every 4xx and 5xx
counts as an error (the seed counted HTTP errors as successes).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from router.telemetry.metrics import status_class
from router.telemetry.records import RequestOutcome


@dataclass(frozen=True, slots=True)
class _Entry:
    at: float  # monotonic end time
    model: str
    status: str
    duration: float
    ttft: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Stats:
    requests: int
    errors_4xx: int
    errors_5xx: int
    cancelled: int
    error_rate: float  # (4xx + 5xx) / requests
    latency_p50_ms: float
    latency_p95_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float  # completion tokens over the window


@dataclass(frozen=True, slots=True)
class Summary:
    window_sec: float
    total: Stats
    per_model: dict[str, Stats]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _stats(entries: Iterable[_Entry], window: float) -> Stats:
    items = list(entries)
    count = len(items)
    by_status = {"4xx": 0, "5xx": 0, "cancelled": 0}
    for item in items:
        if item.status in by_status:
            by_status[item.status] += 1
    durations = [e.duration * 1000 for e in items]
    ttfts = [e.ttft * 1000 for e in items if e.ttft]
    completion = sum(e.completion_tokens for e in items)
    return Stats(
        requests=count,
        errors_4xx=by_status["4xx"],
        errors_5xx=by_status["5xx"],
        cancelled=by_status["cancelled"],
        error_rate=(by_status["4xx"] + by_status["5xx"]) / count if count else 0.0,
        latency_p50_ms=percentile(durations, 0.5),
        latency_p95_ms=percentile(durations, 0.95),
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p95_ms=percentile(ttfts, 0.95),
        prompt_tokens=sum(e.prompt_tokens for e in items),
        completion_tokens=completion,
        tokens_per_second=completion / window if window else 0.0,
    )


class RollingSummary:
    def __init__(self, aliases: Iterable[str], window_sec: float = 300.0, limit: int = 100_000):
        self._aliases = list(aliases)
        self._window = window_sec
        self._entries: deque[_Entry] = deque(maxlen=limit)
        self._started = time.monotonic()

    def record(self, outcome: RequestOutcome) -> None:
        self._entries.append(
            _Entry(
                at=outcome.started + outcome.duration,
                model=outcome.model,
                status=status_class(outcome.code),
                duration=outcome.duration,
                ttft=outcome.ttft if outcome.streamed else 0.0,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
            )
        )

    def summary(self, models: Collection[str] | None = None) -> Summary:
        """The window's figures, over ``models`` only when given (a key's allow-list: its
        totals must not count models it may not see)."""
        now = time.monotonic()
        while self._entries and self._entries[0].at < now - self._window:
            self._entries.popleft()
        # A router younger than the window has only been counting for its age.
        window = min(self._window, max(now - self._started, 1e-9))
        entries = list(self._entries)
        aliases = self._aliases
        if models is not None:
            entries = [e for e in entries if e.model in models]
            aliases = [a for a in aliases if a in models]
        return Summary(
            window_sec=self._window,
            total=_stats(entries, window),
            per_model={
                alias: _stats((e for e in entries if e.model == alias), window) for alias in aliases
            },
        )
