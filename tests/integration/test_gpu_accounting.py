"""Memory accounting on a real (non-simulated) GPU, through a stub of what NVML reports.

NVML's device-wide "used" includes the router's own children, which the policy also counts
through their reservations; the pool takes what each child holds out of "used" first. The
stub stands in for the driver only: the router, its pool and children are real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import Settings
from router.pool.pool import held_mib
from router.resources.devices import DeviceInfo
from router.scheduler.policy import Admit, Wait
from tests.helpers import chat_model, fake_server, running_router, settings_for, wait_until

FOREIGN_MIB = 1024  # another process on the GPU
MODEL_MIB = 3072


class StubGpu:
    """One 8 GiB GPU as NVML would describe it; the test says what is in use."""

    cpu_mode = False

    def __init__(self) -> None:
        self.used_mib = FOREIGN_MIB
        self.per_pid: dict[int, int] = {}  # empty: NVML cannot see the children's PIDs

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo("gpu:0", "Stub 8G", 8192, self.used_mib)]

    def process_memory_mib(self, pid: int) -> int | None:
        return self.per_pid.get(pid)


def two_models(tmp_path: Path, tiny_chat: Path, *knobs: str) -> Settings:
    model = {**chat_model(tiny_chat), "memory_mib": MODEL_MIB}
    return settings_for(
        tmp_path,
        {"a": model, "b": model},
        system={"llama_server_path": fake_server(tmp_path, *knobs), "max_concurrent_models": 4},
    )


async def test_a_loaded_model_nvml_cannot_attribute_is_not_counted_twice(
    tmp_path: Path, tiny_chat: Path
) -> None:
    """8 GiB: 1 GiB foreign + a (3 GiB) leaves room for b (3 GiB). With a's usage counted
    both as someone else's and as its reservation, b used to evict a."""
    gpu = StubGpu()
    async with running_router(two_models(tmp_path, tiny_chat), gpu) as (router, client):
        await client.load("a")
        gpu.used_mib = FOREIGN_MIB + MODEL_MIB  # what the driver now reports
        await client.load("b")
        states = {m.alias: (m.state, m.device) for m in (await client.list_models()).models}
        assert states == {"a": ("ready", "gpu:0"), "b": ("ready", "gpu:0")}


async def test_a_loading_model_counts_what_nvml_sees_it_hold(
    tmp_path: Path, tiny_chat: Path
) -> None:
    gpu = StubGpu()
    settings = two_models(tmp_path, tiny_chat, "--load-delay 30")
    async with running_router(settings, gpu) as (router, client):
        await client.load("a", wait=False)
        a, b = router.pool.get("a"), router.pool.get("b")
        await wait_until(lambda: a.child is not None and b.memory_estimate_mib == MODEL_MIB, 5)
        assert a.child is not None
        gpu.per_pid[a.child.pid] = 2048  # part-way through allocating
        gpu.used_mib = FOREIGN_MIB + 2048
        # 8192 - 1024 foreign - 3072 reserved for a leaves 4096: b fits beside it.
        assert router.pool.plan_for(b) == Admit("gpu:0")
        # Were a's 2 GiB taken for someone else's, only 2048 would be left: b would wait.
        del gpu.per_pid[a.child.pid]
        assert router.pool.plan_for(b) == Wait(("a",))


@pytest.mark.parametrize(
    ("reservation", "measured", "live", "loaded", "held"),
    [
        pytest.param(3072, 0, 2048, False, 2048, id="per-process-figure-is-exact"),
        pytest.param(3072, 3500, 3400, True, 3400, id="per-process-figure-over-measured"),
        pytest.param(3072, 0, None, True, 3072, id="loaded-unseen-holds-its-reservation"),
        pytest.param(3072, 3500, None, True, 3500, id="loaded-unseen-measured-more"),
        pytest.param(3072, 0, None, False, 0, id="loading-unseen-holds-nothing-yet"),
    ],
)
def test_held_mib(
    reservation: int, measured: int, live: int | None, loaded: bool, held: int
) -> None:
    assert held_mib(reservation, measured, live, loaded=loaded) == held


async def test_a_model_waiting_for_its_load_turn_holds_no_memory_yet(
    tmp_path: Path, tiny_chat: Path
) -> None:
    """b loads (slowly) and holds the device's one load turn; a has its room reserved and
    waits for the turn, still STOPPED. a has allocated nothing, so its reservation must not
    be taken out of what the driver reports as used by others: that made its room look free
    twice, and admitted c into it (an OOM once all three load)."""
    gpu = StubGpu()
    gpu.used_mib = 2048  # another process
    model = chat_model(tiny_chat)
    settings = settings_for(
        tmp_path,
        {
            "a": {**model, "memory_mib": 2048},
            "b": {**model, "memory_mib": 2048},
            "c": {**model, "memory_mib": 3072},
        },
        system={
            "llama_server_path": fake_server(tmp_path, "--load-delay 30"),
            "max_concurrent_models": 4,
        },
    )
    async with running_router(settings, gpu) as (router, client):
        a, b, c = (router.pool.get(alias) for alias in "abc")
        await client.load("b", wait=False)
        await wait_until(lambda: b.child is not None, 5)
        await client.load("a", wait=False)
        await wait_until(lambda: "a" in router.pool.reservations(), 5)
        await wait_until(lambda: c.memory_estimate_mib == 3072, 5)
        assert a.state.value == "stopped" and a.child is None
        # 8192 - 2048 others - 2048 (a) - 2048 (b) leaves 2048: c (3072) must wait.
        assert isinstance(router.pool.plan_for(c), Wait)
