"""The real NVML inventory (router.resources.nvml) against a stub ``pynvml`` module.

The stub stands in for the driver library only, injected through ``sys.modules`` where
``open_nvml`` imports it; the inventory code, the router and its children are real.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from clients import End
from router.resources.devices import HostMemory
from router.resources.nvml import NvmlGpus, open_nvml
from router.server import Router
from router.v1 import model_control_service_pb2 as mpb
from tests.helpers import chat_model, fake_server, running_router, settings_for, wait_until
from tests.procfs import children

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


def stub_pynvml(
    gpus: list[tuple[object, int, int]],
    processes: Callable[[int], list[tuple[int, int | None]]] = lambda index: [],
    *,
    init_error: bool = False,
    process_error: bool = False,
) -> types.ModuleType:
    """A ``pynvml`` with ``gpus`` as (name, total MiB, used MiB) and per-GPU processes."""
    module = types.ModuleType("pynvml")

    def init() -> None:
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def running(handle: int) -> list[SimpleNamespace]:
        if process_error:
            raise NVMLError("Not Supported")
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * MIB)
            for pid, mib in processes(handle)
        ]

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda handle: gpus[handle][0]  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(  # type: ignore[attr-defined]
        total=gpus[handle][1] * MIB,
        used=gpus[handle][2] * MIB,
        free=(gpus[handle][1] - gpus[handle][2]) * MIB,
    )
    module.nvmlDeviceGetComputeRunningProcesses = running  # type: ignore[attr-defined]
    return module


def install(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", module)  # None: "import pynvml" fails


def test_without_the_library_there_is_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, None)
    assert open_nvml([0]) is None


def test_without_a_driver_there_is_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, stub_pynvml([("GPU", 8192, 0)], init_error=True))
    assert open_nvml([0]) is None


def test_only_configured_gpus_that_exist_are_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(monkeypatch, stub_pynvml([(b"GPU A", 8192, 100), ("GPU B", 24576, 2048)]))
    gpus = open_nvml([1, 3])
    assert gpus is not None and not gpus.cpu_mode
    [device] = gpus.devices()
    assert (device.id, device.name, device.total_mib, device.used_mib) == (
        "gpu:1",
        "GPU B",
        24576,
        2048,
    )
    assert not device.simulated
    assert "gpu_devices [3] do not exist (found 2 GPUs)" in caplog.text
    assert open_nvml([5]) is None  # none of them exists


def test_names_may_come_as_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, stub_pynvml([(b"NVIDIA L4", 23034, 0)]))
    gpus = open_nvml([0])
    assert gpus is not None
    assert [d.name for d in gpus.devices()] == ["NVIDIA L4"]


def test_a_gpu_nvml_loses_after_start_counts_as_full_until_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = stub_pynvml([("A", 8192, 1000), ("B", 8192, 500)])
    gpus = NvmlGpus(nvml, [0, 1])
    read_memory = nvml.nvmlDeviceGetMemoryInfo

    def lost(handle: int) -> object:
        if handle == 1:
            raise NVMLError("GPU is lost")
        return read_memory(handle)

    nvml.nvmlDeviceGetMemoryInfo = lost  # type: ignore[attr-defined]
    assert [(d.id, d.total_mib, d.used_mib) for d in gpus.devices()] == [
        ("gpu:0", 8192, 1000),
        ("gpu:1", 8192, 8192),  # nothing more goes there
    ]
    gpus.devices()
    assert caplog.text.count("gpu 1: NVML cannot read it (GPU is lost)") == 1  # said once
    nvml.nvmlDeviceGetMemoryInfo = read_memory  # type: ignore[attr-defined]
    assert [d.used_mib for d in gpus.devices()] == [1000, 500]
    assert "gpu 1: NVML reads it again" in caplog.text


def test_a_gpu_nvml_cannot_open_at_start_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = stub_pynvml([("A", 8192, 0), ("B", 8192, 0)])

    def handle(index: int) -> int:
        if index == 0:
            raise NVMLError("Insufficient Permissions")
        return index

    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    install(monkeypatch, nvml)
    gpus = open_nvml([0, 1])
    assert gpus is not None
    assert [d.id for d in gpus.devices()] == ["gpu:1"]
    assert "gpu 0: NVML cannot read it (Insufficient Permissions)" in caplog.text
    assert open_nvml([0]) is None  # no GPU it can read: CPU mode


def test_process_memory_is_what_nvml_attributes_to_that_pid() -> None:
    per_gpu: dict[int, list[tuple[int, int | None]]] = {
        0: [(41, 100), (42, 1500)],
        1: [(42, None), (43, 700)],
    }
    nvml = stub_pynvml([("A", 8192, 0), ("B", 8192, 0)], lambda index: per_gpu[index])
    gpus = NvmlGpus(nvml, [0, 1])
    assert gpus.process_memory_mib(42) == 1500  # unknown usage on GPU 1 adds nothing
    assert gpus.process_memory_mib(43) == 700
    assert gpus.process_memory_mib(99) is None  # not a GPU process (or not visible)
    failing = stub_pynvml([("A", 8192, 0)], process_error=True)
    assert NvmlGpus(failing, [0]).process_memory_mib(42) is None


async def test_the_router_reports_nvml_gpus_and_pins_children_to_theirs(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the router: GetResources lists the NVML GPUs (not CPU mode), a model is placed
    on one, its child sees only that GPU, and its memory is measured per process."""

    def our_children(index: int) -> list[tuple[int, int | None]]:
        return [(pid, 600) for pid in children(os.getpid())] if index == 1 else []

    install(monkeypatch, stub_pynvml([("Small", 2048, 0), ("Big", 16384, 0)], our_children))
    settings = settings_for(
        tmp_path,
        {"m": {**chat_model(tiny_chat), "memory_mib": 4096}},
        system={"llama_server_path": fake_server(tmp_path), "gpu_devices": [0, 1]},
    )
    async with running_router(settings) as (router, client):
        assert isinstance(router.inventory, NvmlGpus)
        events = [
            e
            async for e in client.generate(
                "m", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            )
        ]
        assert isinstance(events[-1], End)
        supervisor = router.pool.get("m")
        assert supervisor.device == "gpu:1"  # 4 GiB does not fit the 2 GiB GPU
        assert supervisor.child is not None
        env = child_env(supervisor.child.pid)
        assert env["CUDA_VISIBLE_DEVICES"] == "1"
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # NVML's numbering, not CUDA's own
        await wait_until(lambda: supervisor.memory_measured_mib == 600, 5)
        resources = await client.control.GetResources(mpb.GetResourcesRequest())
    assert not resources.cpu_mode
    assert [(d.id, d.name, d.total_mib, d.simulated) for d in resources.devices] == [
        ("gpu:0", "Small", 2048, False),
        ("gpu:1", "Big", 16384, False),
    ]
    [model] = resources.models
    assert (model.device, model.measured_mib) == ("gpu:1", 600)


async def test_without_nvml_the_router_runs_in_cpu_mode_and_says_so(
    tmp_path: Path,
    tiny_chat: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    install(monkeypatch, stub_pynvml([("GPU", 8192, 0)], init_error=True))
    settings = settings_for(
        tmp_path,
        {"m": chat_model(tiny_chat)},
        system={"llama_server_path": fake_server(tmp_path), "memory_budget_mib": 4096},
    )
    async with running_router(settings) as (router, client):
        assert isinstance(router.inventory, HostMemory)
        await client.load("m")
        child = router.pool.get("m").child
        assert child is not None
        env = child_env(child.pid)
        resources = await client.control.GetResources(mpb.GetResourcesRequest())
        listed = await client.list_models()
    assert resources.cpu_mode and listed.server.cpu_mode
    [device] = resources.devices
    assert (device.id, device.total_mib, device.simulated) == ("cpu", 4096, False)
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert "running in CPU mode" in caplog.text


def child_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_router_picks_nvml_only_when_it_works(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path, {"m": chat_model(tiny_chat)})
    install(monkeypatch, stub_pynvml([("GPU", 8192, 0)]))
    assert isinstance(Router(settings).inventory, NvmlGpus)
    install(monkeypatch, None)
    assert isinstance(Router(settings).inventory, HostMemory)
