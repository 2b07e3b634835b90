"""The rolling telemetry summary: totals and per-model figures, restricted to a key's models."""

from __future__ import annotations

import time

import grpc

from router.telemetry.records import RequestOutcome
from router.telemetry.summary import SAMPLE_LIMIT, RollingSummary


def _outcome(model: str, code: grpc.StatusCode | None = None, tokens: int = 0) -> RequestOutcome:
    return RequestOutcome(
        model, "chat", time.monotonic(), code=code, duration=0.01, completion_tokens=tokens
    )


def test_a_restricted_summary_counts_only_the_models_given() -> None:
    summary = RollingSummary(["chat", "other"])
    summary.record(_outcome("chat", tokens=5))
    summary.record(_outcome("other", grpc.StatusCode.UNAVAILABLE, tokens=7))
    summary.record(_outcome("other", grpc.StatusCode.INVALID_ARGUMENT))

    everything = summary.summary()
    assert everything.total.requests == 3
    assert set(everything.per_model) == {"chat", "other"}

    mine = summary.summary({"chat"})
    assert set(mine.per_model) == {"chat"}
    assert mine.total.requests == 1  # no trace of 'other' in the totals either
    assert mine.total.errors_4xx == mine.total.errors_5xx == 0
    assert mine.total == mine.per_model["chat"]


def test_counts_stay_exact_past_the_percentile_sample() -> None:
    # Found by review: the summary kept at most 100,000 requests per window and silently
    # stopped counting beyond (requests, errors and tokens all under-reported).
    summary = RollingSummary(["chat"])
    count = SAMPLE_LIMIT + 500
    for index in range(count):
        code = grpc.StatusCode.UNAVAILABLE if index % 100 == 0 else None
        summary.record(_outcome("chat", code, tokens=2))

    stats = summary.summary().total
    assert (stats.requests, stats.errors_5xx, stats.completion_tokens) == (
        count,
        len(range(0, count, 100)),
        2 * count,
    )
    assert stats.latency_p50_ms == 10.0  # from the sample
