"""apply_limits: what the router sends llama-server can never ask for more than the cap."""

from __future__ import annotations

from typing import Any

import pytest

from router.errors import InvalidRequest
from router.inference import CHAT, COMPLETION, Limits, apply_limits

CAP = 6
N_CTX = 512
FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")


def limited(body: dict[str, Any], cap: int | None = CAP, kind: str = CHAT) -> dict[str, Any]:
    parsed = dict(body)
    apply_limits(parsed, kind, N_CTX, cap, Limits())
    return parsed


def honoured(parsed: dict[str, Any]) -> int | None:
    """The length llama-server generates for ``parsed``: the first present field in its order."""
    for name in ("n_predict", "max_completion_tokens", "max_tokens"):
        if name in parsed:
            value: int = parsed[name]
            return value
    return None


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", [CHAT, COMPLETION])
def test_minus_one_means_the_cap(field: str, kind: str) -> None:
    parsed = limited({field: -1}, kind=kind)
    assert parsed[field] == CAP and honoured(parsed) == CAP


@pytest.mark.parametrize("field", FIELDS)
def test_minus_one_next_to_a_smaller_value_is_still_bounded(field: str) -> None:
    # The audit's case: max_tokens 3 with n_predict -1 generated until the context was full.
    others = [name for name in FIELDS if name != field]
    parsed = limited({others[0]: 3, others[1]: 2, field: -1})
    assert all(parsed[name] <= CAP for name in FIELDS)
    assert honoured(parsed) is not None and 1 <= honoured(parsed) <= CAP  # type: ignore[operator]


@pytest.mark.parametrize("field", FIELDS)
def test_a_value_within_the_cap_is_what_llama_server_reads(field: str) -> None:
    parsed = limited({field: 4})
    assert parsed[field] == 4 and honoured(parsed) == 4 and parsed["n_predict"] == 4


def test_the_field_llama_server_reads_first_keeps_its_meaning() -> None:
    parsed = limited({"max_tokens": 2, "max_completion_tokens": 5})
    assert parsed["n_predict"] == 5 and parsed["max_tokens"] == 2


def test_no_length_asked_gets_the_cap() -> None:
    assert honoured(limited({"messages": []})) == CAP


@pytest.mark.parametrize("field", FIELDS)
def test_beyond_the_cap_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(InvalidRequest, match="at most 6") as caught:
        limited({field: CAP + 1})
    assert caught.value.metadata["param"] == field


@pytest.mark.parametrize("value", [0, -2, 1.5, "3", True, None])
@pytest.mark.parametrize("field", FIELDS)
def test_not_a_length_is_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest, match="positive integer"):
        limited({field: value})


def test_without_a_cap_minus_one_passes_and_nothing_is_added() -> None:
    body = {"n_predict": -1, "max_tokens": 3}
    parsed = dict(body)
    assert apply_limits(parsed, CHAT, N_CTX, None, Limits()) is False
    assert parsed == body
    with pytest.raises(InvalidRequest, match="context"):
        limited({"max_tokens": N_CTX + 1}, cap=None)
