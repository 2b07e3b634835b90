"""Table tests of the placement and eviction policy (pure)."""

from __future__ import annotations

import pytest

from router.scheduler.policy import (
    Admit,
    CandidateView,
    DeviceView,
    Evict,
    Plan,
    Refuse,
    ResidentView,
    Wait,
    plan_admission,
)

GIB = 1024


def gpu(index: int, total_gib: float, used_by_others_gib: float = 0) -> DeviceView:
    return DeviceView(f"gpu:{index}", int(total_gib * GIB), int(used_by_others_gib * GIB))


def resident(
    alias: str,
    device: str = "gpu:0",
    gib: float = 1,
    *,
    busy: bool = False,
    pinned: bool = False,
    loading: bool = False,
    last_used: float = 0.0,
) -> ResidentView:
    return ResidentView(alias, device, int(gib * GIB), busy, pinned, loading, last_used)


def want(gib: float, *devices: str) -> CandidateView:
    return CandidateView("new", int(gib * GIB), devices or ("gpu:0", "gpu:1", "gpu:2", "gpu:3"))


CASES = [
    pytest.param(want(3), [], [gpu(0, 8)], 3, Admit("gpu:0"), id="empty-device-admits"),
    pytest.param(
        want(10, "gpu:0"),
        [],
        [gpu(0, 8)],
        3,
        Refuse(
            "the model needs about 10240 MiB but the largest allowed device has 8192 MiB available"
        ),
        id="8GiB-gpu-refuses-10GiB-model",
    ),
    pytest.param(
        want(3, "gpu:0"),
        [resident("a", gib=3)],
        [gpu(0, 8)],
        3,
        Admit("gpu:0"),
        id="two-3GiB-side-by-side",
    ),
    pytest.param(
        want(3, "gpu:0"),
        [resident("a", gib=3), resident("b", gib=3)],
        [gpu(0, 8)],
        3,
        Evict("gpu:0", ("a",)),
        id="third-3GiB-evicts-lru",
    ),
    pytest.param(
        want(3, "gpu:0"),
        [resident("a", gib=3, last_used=5), resident("b", gib=3, last_used=1)],
        [gpu(0, 8)],
        3,
        Evict("gpu:0", ("b",)),
        id="least-recently-used-goes-first",
    ),
    pytest.param(
        want(3, "gpu:0"),
        [resident("a", gib=3, busy=True), resident("b", gib=3, last_used=9)],
        [gpu(0, 8)],
        3,
        Evict("gpu:0", ("b",)),
        id="busy-is-never-evicted",
    ),
    pytest.param(
        want(3, "gpu:0"),
        [resident("a", gib=3, busy=True), resident("b", gib=3, pinned=True)],
        [gpu(0, 8)],
        3,
        Wait(("a",)),
        id="busy-and-pinned-means-wait-for-the-busy-one",
    ),
    pytest.param(
        want(3, "gpu:0"),
        [resident("a", gib=3, loading=True), resident("b", gib=3, busy=True)],
        [gpu(0, 8)],
        3,
        Wait(("b",)),
        id="loading-is-not-evictable-and-the-busy-one-is-waited-for-first",
    ),
    pytest.param(
        want(6, "gpu:0"),
        [resident("a", gib=3, last_used=1), resident("b", gib=3, last_used=2)],
        [gpu(0, 8)],
        3,
        Evict("gpu:0", ("a", "b")),
        id="evicts-as-many-as-needed",
    ),
    pytest.param(
        want(1),
        [
            resident("a", "gpu:0", last_used=5),
            resident("b", "gpu:1", last_used=3),
            resident("c", "gpu:2", last_used=1),
        ],
        [gpu(0, 8), gpu(1, 8), gpu(2, 8)],
        3,
        Evict("gpu:0", ("c",)),
        id="model-count-limit-evicts-lru-anywhere",
    ),
    pytest.param(
        want(5),
        [],
        [gpu(0, 24), gpu(1, 6), gpu(2, 12)],
        4,
        Admit("gpu:1"),
        id="best-fit-picks-the-tightest-device",
    ),
    pytest.param(
        want(5),
        [resident("a", "gpu:1", gib=4)],
        [gpu(0, 24), gpu(1, 6), gpu(2, 12)],
        4,
        Admit("gpu:2"),
        id="best-fit-counts-reservations",
    ),
    pytest.param(
        want(5),
        [],
        [gpu(0, 8, used_by_others_gib=4), gpu(1, 6)],
        4,
        Admit("gpu:1"),
        id="memory-used-by-others-counts",
    ),
    pytest.param(
        want(5, "gpu:1", "gpu:0"),
        [resident("x", "gpu:1", gib=4, last_used=1)],
        [gpu(0, 8, used_by_others_gib=8), gpu(1, 8)],
        4,
        Evict("gpu:1", ("x",)),
        id="allowed-devices-are-honoured",
    ),
    pytest.param(
        want(4),
        [
            resident("a", "gpu:0", gib=6, last_used=1),
            resident("b", "gpu:1", gib=4, last_used=2),
            resident("c", "gpu:1", gib=3, last_used=3),
        ],
        [gpu(0, 8), gpu(1, 8)],
        4,
        Evict("gpu:0", ("a",)),
        id="fewest-evictions-wins",
    ),
    pytest.param(
        CandidateView("new", 0, ("cpu",)),
        [resident("a", "cpu", gib=0), resident("b", "cpu", gib=0, last_used=-1)],
        [DeviceView("cpu", 16 * GIB, 0)],
        2,
        Evict("cpu", ("b",)),
        id="cpu-mode-count-limit",
    ),
    pytest.param(
        want(4, "gpu:0"),
        [
            resident("x", "gpu:1", gib=1, last_used=1),
            resident("y", "gpu:0", gib=6, last_used=2),
        ],
        [gpu(0, 8), gpu(1, 8)],
        2,
        Evict("gpu:0", ("y",)),
        id="count-limit-one-on-device-eviction-frees-memory-and-slot",
    ),
    pytest.param(
        want(6, "gpu:0"),
        [resident("a", gib=1, last_used=1), resident("b", gib=6, last_used=2)],
        [gpu(0, 8)],
        4,
        Evict("gpu:0", ("b",)),
        id="fewest-evictions-before-lru",
    ),
    pytest.param(
        want(5, "gpu:0"),
        [
            resident("a", gib=1, last_used=1),
            resident("b", gib=3, last_used=2),
            resident("c", gib=3, last_used=3),
            resident("d", gib=3, last_used=4),
        ],
        [gpu(0, 10)],
        5,
        Evict("gpu:0", ("b", "c")),
        id="two-evictions-not-three-and-of-those-the-least-recently-used",
    ),
    pytest.param(
        want(6, "gpu:0"),
        [resident("p", gib=4, pinned=True)],
        [gpu(0, 8)],
        4,
        Refuse(
            "the model needs about 6144 MiB and pinned models (p on gpu:0) hold the rest of "
            "every device it may use; they are never unloaded for another model"
        ),
        id="only-pinned-memory-in-the-way-refuses",
    ),
    pytest.param(
        want(1, "gpu:0"),
        [resident("p", "gpu:1", pinned=True), resident("q", pinned=True, loading=True)],
        [gpu(0, 8), gpu(1, 8)],
        2,
        Refuse(
            "all 2 model slots are held by pinned models (p, q), "
            "which are never unloaded for another model"
        ),
        id="only-pinned-models-at-the-count-limit-refuses",
    ),
    pytest.param(
        want(6, "gpu:0"),
        [resident("p", gib=2, pinned=True), resident("b", gib=2, busy=True)],
        [gpu(0, 8)],
        4,
        Wait(("b",)),
        id="pinned-and-busy-waits-when-the-busy-one-would-make-room",
    ),
    pytest.param(
        want(1, "gpu:0"),
        [resident("b", "gpu:1", busy=True)],
        [gpu(0, 8), gpu(1, 8)],
        1,
        Wait(("b",)),
        id="count-limit-busy-on-a-device-it-may-not-use-is-waited-for",
    ),
    pytest.param(
        want(1, "gpu:0"),
        [resident("l", "gpu:1", loading=True, last_used=0), resident("b", "gpu:0", busy=True)],
        [gpu(0, 8), gpu(1, 8)],
        2,
        Wait(("b",)),
        id="waits-for-a-busy-model-before-a-loading-one",
    ),
]


@pytest.mark.parametrize(("candidate", "residents", "devices", "max_models", "expected"), CASES)
def test_plan_admission(
    candidate: CandidateView,
    residents: list[ResidentView],
    devices: list[DeviceView],
    max_models: int,
    expected: Plan,
) -> None:
    assert plan_admission(candidate, residents, devices, max_models) == expected


def test_plan_never_names_a_busy_or_pinned_model() -> None:
    """Exhaustive over small worlds: evicting is only ever of idle, unpinned, loaded models."""
    import itertools

    flags = list(itertools.product([False, True], repeat=3))
    for combo in itertools.product(flags, repeat=3):
        residents = [
            resident(name, gib=3, busy=busy, pinned=pinned, loading=loading, last_used=i)
            for i, (name, (busy, pinned, loading)) in enumerate(zip("abc", combo, strict=True))
        ]
        plan = plan_admission(want(3, "gpu:0"), residents, [gpu(0, 9)], 3)
        if isinstance(plan, Evict):
            named = {r.alias: r for r in residents}
            for victim in plan.victims:
                r = named[victim]
                assert not (r.busy or r.pinned or r.loading)


def _smallest_working_eviction(
    candidate: CandidateView, residents: list[ResidentView], devices: list[DeviceView], limit: int
) -> int | None:
    """Brute force: the fewest idle models whose eviction admits ``candidate`` somewhere."""
    import itertools

    idle = [r for r in residents if not (r.busy or r.pinned or r.loading)]
    for size in range(len(idle) + 1):
        for gone in itertools.combinations(idle, size):
            left = [r for r in residents if r not in gone]
            for device in devices:
                if device.id not in candidate.devices:
                    continue
                held = sum(r.memory_mib for r in left if r.device == device.id)
                if device.capacity_mib - held >= candidate.memory_mib and len(left) < limit:
                    return size
    return None


def test_eviction_plans_are_the_smallest_that_work() -> None:
    """Random small worlds against brute force: an Evict plan has the fewest victims any
    plan could have, and the planner waits or refuses only when no idle set would do."""
    import random

    rng = random.Random(5)
    for _ in range(3000):
        devices = [gpu(i, rng.choice([4, 8, 12])) for i in range(rng.randint(1, 3))]
        residents = [
            resident(
                name,
                f"gpu:{rng.randrange(len(devices))}",
                rng.choice([1, 2, 3, 4]),
                busy=rng.random() < 0.2,
                pinned=rng.random() < 0.15,
                loading=rng.random() < 0.1,
                last_used=rng.random(),
            )
            for name in "abcde"[: rng.randint(0, 5)]
        ]
        allowed = tuple(d.id for d in devices if rng.random() < 0.7) or (devices[0].id,)
        candidate = want(rng.choice([1, 2, 3, 5]), *allowed)
        limit = rng.randint(1, 5)
        plan = plan_admission(candidate, residents, devices, limit)
        smallest = _smallest_working_eviction(candidate, residents, devices, limit)
        if isinstance(plan, Admit):
            assert smallest == 0
        elif isinstance(plan, Evict):
            assert smallest is not None and len(plan.victims) == smallest, (plan, smallest)
        else:
            assert smallest is None, (plan, residents, candidate, limit)
