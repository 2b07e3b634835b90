"""The mapping from a failed gRPC call to the client's exceptions, over a real channel."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

import clients
from clients import RouterClient
from router.v1 import errors_pb2
from tests.clients.fake_router import FakeRouter, rich_status, serve_fake_router

Code = grpc.StatusCode

# One row per (status code, router reason) the router sends, per DESIGN.md §3 and errors.proto.
MAPPING = [
    pytest.param(
        Code.INVALID_ARGUMENT, "INVALID_REQUEST", clients.InvalidRequestError, id="invalid"
    ),
    pytest.param(
        Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED", clients.InvalidRequestError, id="upstream-4xx"
    ),
    pytest.param(Code.UNAUTHENTICATED, "UNAUTHENTICATED", clients.AuthenticationError, id="authn"),
    pytest.param(
        Code.PERMISSION_DENIED, "PERMISSION_DENIED", clients.PermissionDeniedError, id="authz"
    ),
    pytest.param(Code.NOT_FOUND, "MODEL_NOT_FOUND", clients.ModelNotFoundError, id="not-found"),
    pytest.param(
        Code.FAILED_PRECONDITION, "WRONG_MODEL_KIND", clients.WrongModelKindError, id="wrong-kind"
    ),
    pytest.param(Code.RESOURCE_EXHAUSTED, "QUEUE_FULL", clients.RateLimitError, id="queue-full"),
    pytest.param(Code.RESOURCE_EXHAUSTED, "RATE_LIMITED", clients.RateLimitError, id="rate-limit"),
    pytest.param(Code.UNAVAILABLE, "LOAD_FAILED", clients.UnavailableError, id="load-failed"),
    pytest.param(Code.UNAVAILABLE, "CIRCUIT_OPEN", clients.UnavailableError, id="circuit-open"),
    pytest.param(Code.UNAVAILABLE, "MODEL_CRASHED", clients.UnavailableError, id="crashed"),
    pytest.param(Code.UNAVAILABLE, "NO_CAPACITY", clients.UnavailableError, id="no-capacity"),
    pytest.param(Code.UNAVAILABLE, "MODEL_UNLOADED", clients.UnavailableError, id="unloaded"),
    pytest.param(Code.UNAVAILABLE, "SHUTTING_DOWN", clients.UnavailableError, id="shutting-down"),
    pytest.param(Code.UNAVAILABLE, "UPSTREAM_ERROR", clients.UnavailableError, id="upstream-5xx"),
    pytest.param(
        Code.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT", clients.DeadlineExceededError, id="queue-timeout"
    ),
    pytest.param(
        Code.DEADLINE_EXCEEDED, "LOAD_TIMEOUT", clients.DeadlineExceededError, id="load-timeout"
    ),
    pytest.param(
        Code.DEADLINE_EXCEEDED,
        "UPSTREAM_TIMEOUT",
        clients.DeadlineExceededError,
        id="upstream-timeout",
    ),
    pytest.param(Code.INTERNAL, "INTERNAL", clients.InternalError, id="internal"),
]


@dataclass(frozen=True)
class RawStatus(grpc.Status):
    """A status with trailing metadata exactly as given, to send what no router would."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


@pytest.fixture
async def router() -> AsyncIterator[tuple[FakeRouter, RouterClient]]:
    async with serve_fake_router() as (fake, target), RouterClient(target) as client:
        yield fake, client


def test_mapping_covers_every_error_reason() -> None:
    sent = {param.values[1] for param in MAPPING}
    declared = {
        name.removeprefix("ERROR_REASON_")
        for name in errors_pb2.ErrorReason.keys()
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert sent == declared


@pytest.mark.parametrize(("code", "reason", "error_class"), MAPPING)
async def test_status_maps_to_exception_with_details(
    router: tuple[FakeRouter, RouterClient],
    code: grpc.StatusCode,
    reason: str,
    error_class: type[clients.RouterError],
) -> None:
    fake, client = router
    fake.errors["GetModel"] = rich_status(
        code, "it failed", reason=reason, metadata={"model": "m1"}, retry_after=2.5
    )

    with pytest.raises(clients.RouterError) as caught:
        await client.get_model("m1")

    error = caught.value
    assert type(error) is error_class
    assert (error.code, error.reason, error.message) == (code, reason, "it failed")
    assert error.retry_after == 2.5
    assert error.metadata == {"model": "m1"}
    assert str(error) == "it failed"
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        pytest.param(Code.CANCELLED, clients.RequestCancelledError, id="cancelled"),
        pytest.param(Code.UNKNOWN, clients.InternalError, id="unknown"),
        pytest.param(Code.UNIMPLEMENTED, clients.InternalError, id="unimplemented"),
        pytest.param(Code.DATA_LOSS, clients.InternalError, id="data-loss"),
        pytest.param(Code.INVALID_ARGUMENT, clients.InvalidRequestError, id="invalid"),
        pytest.param(Code.UNAVAILABLE, clients.UnavailableError, id="unavailable"),
    ],
)
async def test_status_without_details_maps_on_code_alone(
    router: tuple[FakeRouter, RouterClient],
    code: grpc.StatusCode,
    error_class: type[clients.RouterError],
) -> None:
    fake, client = router
    fake.errors["ListModels"] = rich_status(code, "bare")

    with pytest.raises(error_class) as caught:
        await client.list_models()

    assert (caught.value.reason, caught.value.retry_after, caught.value.metadata) == ("", None, {})


async def test_resource_exhausted_without_reason_is_request_too_large(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.errors["Embed"] = rich_status(Code.RESOURCE_EXHAUSTED, "message too large")

    with pytest.raises(clients.RequestTooLargeError) as caught:
        await client.embed("m1", ["hello"])

    assert isinstance(caught.value, clients.InvalidRequestError)
    assert caught.value.code == Code.RESOURCE_EXHAUSTED


async def test_error_info_of_another_domain_is_ignored(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.errors["Embed"] = rich_status(
        Code.RESOURCE_EXHAUSTED, "proxy says no", reason="QUEUE_FULL", domain="proxy.example"
    )

    with pytest.raises(clients.RequestTooLargeError) as caught:
        await client.embed("m1", ["hello"])

    assert caught.value.reason == ""


async def test_unreadable_status_details_are_ignored(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.errors["GetModel"] = RawStatus(
        Code.NOT_FOUND, "gone", (("grpc-status-details-bin", b"\xff\xff not a Status"),)
    )

    with pytest.raises(clients.ModelNotFoundError) as caught:
        await client.get_model("m1")

    assert (caught.value.reason, caught.value.message) == ("", "gone")


async def test_message_over_the_clients_limit_is_request_too_large() -> None:
    async with serve_fake_router() as (_, target):
        async with RouterClient(target, max_message_bytes=1024) as client:
            with pytest.raises(clients.RequestTooLargeError):
                await client.embed("m1", ["x" * 4096])


async def test_message_over_the_routers_limit_is_request_too_large() -> None:
    options = [("grpc.max_receive_message_length", 1024)]
    async with serve_fake_router(options=options) as (fake, target):
        async with RouterClient(target) as client:
            with pytest.raises(clients.RequestTooLargeError):
                await client.embed("m1", ["x" * 4096])
    assert fake.calls == []


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_unreachable_router_is_unavailable() -> None:
    async with RouterClient(f"127.0.0.1:{_unused_port()}") as client:
        with pytest.raises(clients.UnavailableError) as caught:
            await client.list_models(timeout=5)

    assert (caught.value.code, caught.value.reason) == (Code.UNAVAILABLE, "")


async def test_wait_ready_on_unreachable_router_is_unavailable() -> None:
    async with RouterClient(f"127.0.0.1:{_unused_port()}") as client:
        with pytest.raises(clients.UnavailableError):
            await client.wait_ready(timeout=0.2)


async def test_caller_deadline_is_deadline_exceeded_without_reason(
    router: tuple[FakeRouter, RouterClient],
) -> None:
    fake, client = router
    fake.delay = 5

    with pytest.raises(clients.DeadlineExceededError) as caught:
        await client.list_models(timeout=0.1)

    assert caught.value.reason == ""
