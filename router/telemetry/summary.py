"""A rolling-window summary of requests, in total and per model (GetTelemetrySummary).

Numbers are numbers (the seed returned "0.123s" strings), and every 4xx and 5xx
counts as an error (the seed counted HTTP errors as successes). Counts and token
totals are exact, from per-second counters whatever the rate; the latency
percentiles come from the window's most recent SAMPLE_LIMIT requests.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from router.telemetry.metrics import status_class
from router.telemetry.records import RequestOutcome

SAMPLE_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float  # monotonic end time
    model: str
    duration: float
    ttft: float  # 0 = none (not streamed, or no output)


@dataclass(slots=True)
class _Counts:
    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: _Counts) -> None:
        self.requests += other.requests
        self.errors_4xx += other.errors_4xx
        self.errors_5xx += other.errors_5xx
        self.cancelled += other.cancelled
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


@dataclass(slots=True)
class _Second:
    second: int  # int(time.monotonic()) of the requests' ends
    per_model: dict[str, _Counts] = field(default_factory=dict)


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


def _stats(counts: _Counts, samples: Iterable[_Sample], window: float) -> Stats:
    items = list(samples)
    durations = [s.duration * 1000 for s in items]
    ttfts = [s.ttft * 1000 for s in items if s.ttft]
    errors = counts.errors_4xx + counts.errors_5xx
    return Stats(
        requests=counts.requests,
        errors_4xx=counts.errors_4xx,
        errors_5xx=counts.errors_5xx,
        cancelled=counts.cancelled,
        error_rate=errors / counts.requests if counts.requests else 0.0,
        latency_p50_ms=percentile(durations, 0.5),
        latency_p95_ms=percentile(durations, 0.95),
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p95_ms=percentile(ttfts, 0.95),
        prompt_tokens=counts.prompt_tokens,
        completion_tokens=counts.completion_tokens,
        tokens_per_second=counts.completion_tokens / window if window else 0.0,
    )


class RollingSummary:
    def __init__(
        self, aliases: Iterable[str], window_sec: float = 300.0, sample_limit: int = SAMPLE_LIMIT
    ) -> None:
        self._aliases = list(aliases)
        self._window = window_sec
        self._seconds: deque[_Second] = deque()
        self._samples: deque[_Sample] = deque(maxlen=sample_limit)
        self._started = time.monotonic()

    def record(self, outcome: RequestOutcome) -> None:
        at = outcome.started + outcome.duration
        second = int(at)
        if not self._seconds or self._seconds[-1].second < second:
            self._seconds.append(_Second(second))  # (a late record joins the newest second)
        counts = self._seconds[-1].per_model.setdefault(outcome.model, _Counts())
        counts.requests += 1
        status = status_class(outcome.code)
        if status == "4xx":
            counts.errors_4xx += 1
        elif status == "5xx":
            counts.errors_5xx += 1
        elif status == "cancelled":
            counts.cancelled += 1
        counts.prompt_tokens += outcome.prompt_tokens
        counts.completion_tokens += outcome.completion_tokens
        ttft = outcome.ttft if outcome.streamed else 0.0
        self._samples.append(_Sample(at, outcome.model, outcome.duration, ttft))

    def summary(self, models: Collection[str] | None = None) -> Summary:
        """The window's figures, over ``models`` only when given (a key's allow-list: its
        totals must not count models it may not see)."""
        now = time.monotonic()
        # Whole seconds: a second that began inside the window counts whole.
        while self._seconds and self._seconds[0].second + 1 <= now - self._window:
            self._seconds.popleft()
        while self._samples and self._samples[0].at < now - self._window:
            self._samples.popleft()
        # A router younger than the window has only been counting for its age.
        window = min(self._window, max(now - self._started, 1e-9))
        aliases = self._aliases if models is None else [a for a in self._aliases if a in models]
        per_model = {alias: _Counts() for alias in aliases}
        for second in self._seconds:
            for model, counts in second.per_model.items():
                if model in per_model:
                    per_model[model].add(counts)
        total = _Counts()
        for counts in per_model.values():
            total.add(counts)
        samples = [s for s in self._samples if s.model in per_model]
        return Summary(
            window_sec=self._window,
            total=_stats(total, samples, window),
            per_model={
                alias: _stats(per_model[alias], (s for s in samples if s.model == alias), window)
                for alias in aliases
            },
        )
