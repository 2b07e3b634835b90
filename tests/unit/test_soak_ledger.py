"""Ledger.reconcile: the router's count against the soak clients' ledger."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.soak.driver import Ledger


def ledger(router: dict[tuple[str, str], int]) -> Ledger:
    result = Ledger(duration_sec=1.0)
    result.requests = Counter(
        {
            ("chat", "completed"): 10,
            ("chat_stream", "completed"): 5,
            ("chat_stream", "cancelled"): 3,
            ("chat", "error"): 2,
            ("embeddings", "completed"): 7,
            ("list", "completed"): 4,  # not an inference request: the router does not count it
        }
    )
    result.router = Counter(router)
    return result


AGREES = {
    ("chat", "2xx"): 15,
    ("chat", "5xx"): 2,
    ("chat", "cancelled"): 3,
    ("embeddings", "2xx"): 7,
}


def test_the_same_count_agrees() -> None:
    assert ledger(AGREES).reconcile() == []


@pytest.mark.parametrize(
    "router",
    [
        # A stream the client left finished at the router first, or failed there first.
        {**AGREES, ("chat", "cancelled"): 2, ("chat", "2xx"): 16},
        {**AGREES, ("chat", "cancelled"): 2, ("chat", "4xx"): 1},
        # A request left before the facade called the router never reached it.
        {**AGREES, ("chat", "cancelled"): 2},
    ],
)
def test_a_request_the_client_left_may_end_any_way(router: dict[tuple[str, str], int]) -> None:
    assert ledger(router).reconcile() == []


@pytest.mark.parametrize(
    ("router", "what"),
    [
        ({**AGREES, ("embeddings", "2xx"): 6}, "embeddings: router successes 6"),  # lost
        ({**AGREES, ("embeddings", "2xx"): 8}, "embeddings: router successes 8"),  # twice
        ({**AGREES, ("chat", "5xx"): 1}, "chat: router errors 1"),
        ({**AGREES, ("chat", "cancelled"): 4}, "chat: router cancellations 4"),
        # Each within its own bound, but more requests than the clients made.
        ({**AGREES, ("chat", "2xx"): 18}, "chat: router requests 23"),
        # Every request the clients left unseen, and one more lost.
        ({**AGREES, ("chat", "cancelled"): 0, ("chat", "2xx"): 14}, "chat: router successes"),
    ],
)
def test_a_lost_or_extra_request_shows(router: dict[tuple[str, str], int], what: str) -> None:
    problems = ledger(router).reconcile()
    assert any(problem.startswith(what) for problem in problems), problems
