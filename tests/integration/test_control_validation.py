"""ModelControl duration fields: NaN, infinities and negatives are INVALID_ARGUMENT.

The router runs as its own process here. A NaN timeout used to reach asyncio and stall every
timer of the router's event loop; in-process, that loop would be the test's own and the test
would hang instead of failing.
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from router.v1 import inference_service_pb2 as ipb
from router.v1 import inference_service_pb2_grpc as igrpc
from router.v1 import model_control_service_pb2 as mpb
from router.v1 import model_control_service_pb2_grpc as mgrpc
from router.v1 import model_pb2
from tests.helpers import fake_server, free_port, router_process, write_config

BAD_SECONDS = (math.nan, math.inf, -math.inf, -1.0)
# A deadline on every call: against an unfixed router a refused value hangs instead.
CALL_TIMEOUT = 10


def _refused(call: Callable[..., object], request: object, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=CALL_TIMEOUT)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert field in (error.details() or "")


def test_non_finite_or_negative_durations_are_refused_and_the_router_keeps_working(
    tmp_path: Path, tiny_chat: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        {"m": {"model_path": str(tiny_chat), "params": {"n_ctx": 4096}}},
        grpc_port=port,
        # A load that takes a while, so a waiting LoadModel really reaches its timeout logic.
        system={"llama_server_path": fake_server(tmp_path, "--load-delay", "1")},
    )
    with router_process(config, port) as process:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            control = mgrpc.ModelControlServiceStub(channel)
            for value in BAD_SECONDS:
                load = mpb.LoadModelRequest(model="m", wait=True, timeout_sec=value)
                _refused(control.LoadModel, load, "timeout_sec")
            # Refused before anything started.
            model = control.GetModel(mpb.GetModelRequest(model="m"), timeout=CALL_TIMEOUT).model
            assert model.state == model_pb2.MODEL_STATE_STOPPED

            loaded = control.LoadModel(
                mpb.LoadModelRequest(model="m", wait=True, timeout_sec=20), timeout=30
            )
            assert loaded.model.state == model_pb2.MODEL_STATE_READY
            for value in BAD_SECONDS:
                unload = mpb.UnloadModelRequest(model="m", drain_timeout_sec=value)
                _refused(control.UnloadModel, unload, "drain_timeout_sec")
            model = control.GetModel(mpb.GetModelRequest(model="m"), timeout=CALL_TIMEOUT).model
            assert model.state == model_pb2.MODEL_STATE_READY and model.pid == loaded.model.pid

            # The event loop's timers still run: a stream completes, then a graceful stop.
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            generate = ipb.GenerateRequest(
                model="m", kind=ipb.GENERATE_KIND_CHAT, body=json.dumps({**body, "stream": True})
            )
            stream = igrpc.InferenceServiceStub(channel).Generate(generate, timeout=CALL_TIMEOUT)
            *events, end = list(stream)
            assert end.WhichOneof("event") == "end"
            # The output arrives in chunk events and the last of it with the end (End.chunk).
            chunks = [event.chunk for event in events if event.HasField("chunk")] + [end.end.chunk]
            assert sum(len(chunk.data) for chunk in chunks) >= 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
