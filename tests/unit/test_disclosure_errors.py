"""assert_error_discloses_nothing checks all a gRPC caller receives of an error."""

from __future__ import annotations

import grpc
import pytest

from clients.errors import RouterError
from tests.disclosure import assert_error_discloses_nothing


def test_a_router_error_is_checked_in_its_message_and_its_metadata() -> None:
    clean = RouterError("model 'm' could not be loaded", code=grpc.StatusCode.UNAVAILABLE)
    assert_error_discloses_nothing(clean)
    in_metadata = RouterError(
        "model 'm' could not be loaded",
        code=grpc.StatusCode.UNAVAILABLE,
        metadata={"model": "m", "detail": "open /srv/models/m.gguf failed"},
    )
    with pytest.raises(AssertionError, match="path"):
        assert_error_discloses_nothing(in_metadata)
    with pytest.raises(AssertionError, match="secret"):
        assert_error_discloses_nothing(clean, secrets=["could not"])
