"""The auth interceptor fails closed on a kind of call it has no guard for.

A real grpc.aio server with the router's own interceptors serves a synthetic service: a
client-streaming method (no router RPC is one yet, which is exactly the case a future RPC
would meet) next to a unary one as the control.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from router.auth import Authenticator, AuthInterceptor
from router.config import ApiKey
from router.interceptors import ErrorInterceptor

ADMIN = "adm-key-0123456789"
METADATA = (("authorization", f"Bearer {ADMIN}"),)


def _identity(data: bytes) -> bytes:
    return data


class Served:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def ping(self, request: bytes, context: Any) -> bytes:
        self.calls.append("ping")
        return request

    async def upload(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        self.calls.append("upload")
        return b"".join([r async for r in requests])


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Served]]:
    served = Served()
    handlers = {
        "Ping": grpc.unary_unary_rpc_method_handler(
            served.ping, request_deserializer=_identity, response_serializer=_identity
        ),
        "Upload": grpc.stream_unary_rpc_method_handler(
            served.upload, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    interceptors = [
        ErrorInterceptor(),
        AuthInterceptor(Authenticator([ApiKey(key=ADMIN, scopes=["admin"])])),
    ]
    instance = grpc.aio.server(interceptors=interceptors)
    instance.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Synthetic", handlers),)
    )
    port = instance.add_insecure_port("127.0.0.1:0")
    await instance.start()
    try:
        yield f"127.0.0.1:{port}", served
    finally:
        await instance.stop(None)


async def test_a_client_streaming_call_is_refused_even_with_an_admin_key(
    server: tuple[str, Served],
) -> None:
    target, served = server
    async with grpc.aio.insecure_channel(target) as channel:
        codec = {"request_serializer": _identity, "response_deserializer": _identity}
        ping = channel.unary_unary("/test.Synthetic/Ping", **codec)
        upload = channel.stream_unary("/test.Synthetic/Upload", **codec)
        assert await ping(b"x", metadata=METADATA, timeout=10) == b"x"  # the key works
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await ping(b"x", timeout=10)
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED

        async def parts() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        for metadata in (METADATA, ()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await upload(parts(), metadata=metadata, timeout=10)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert refused.value.details() == "this method cannot be authorized"
    assert served.calls == ["ping"]  # the unguarded behavior never ran


async def test_binary_metadata_next_to_the_key_is_no_internal_error(
    server: tuple[str, Served],
) -> None:
    # Binary (-bin) headers reach the server as bytes, any bytes: tracing systems and clients
    # send them. Reading the key must skip them, not fail the call with INTERNAL.
    target, _ = server
    blob = (("x-trace-bin", b"\xff\xfe\x00"),)
    async with grpc.aio.insecure_channel(target) as channel:
        ping = channel.unary_unary(
            "/test.Synthetic/Ping", request_serializer=_identity, response_deserializer=_identity
        )
        assert await ping(b"x", metadata=blob + METADATA, timeout=10) == b"x"
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await ping(b"x", metadata=blob, timeout=10)
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
