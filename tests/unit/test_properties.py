"""Property tests (hypothesis): config validation, domain ⇄ proto conversion, policy, queue."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import ConfigError, load_settings
from router.inference import Chunks, Done, Timing, Usage
from router.pool.snapshot import LoadStage, ModelKind, ModelSnapshot
from router.pool.state import ModelState
from router.scheduler.policy import (
    Admit,
    CandidateView,
    DeviceView,
    Evict,
    Refuse,
    ResidentView,
    Wait,
    evictable,
    plan_admission,
)
from router.scheduler.queue import Priority, SlotQueue
from router.servicers.convert import generate_event_to_pb, model_to_pb
from router.v1 import inference_service_pb2 as ipb
from router.v1 import model_pb2

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
SYSTEM_KEYS = st.sampled_from(
    [
        "idle_timeout_sec",
        "max_concurrent_models",
        "request_timeout_sec",
        "parallel_requests",
        "max_queue_size_per_model",
        "queue_timeout_sec",
        "gpu_devices",
        "flash_attention",
        "aging_dispatches",
        "idle_timout_sec",  # a typo: must be named, with a hint
    ]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(system=st.dictionaries(SYSTEM_KEYS, JSON_VALUES, max_size=4), n_ctx=JSON_VALUES)
def test_config_either_loads_or_names_every_bad_key(
    tmp_path: Path, system: dict[str, object], n_ctx: object
) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "system": system,
                "models": {"m": {"model_path": "m.gguf", "params": {"n_ctx": n_ctx}}},
            }
        )
    )
    try:
        settings_ = load_settings(path, env={})
    except ConfigError as error:
        text = str(error)
        assert error.problems and all(problem.strip() for problem in error.problems)
        named = [key for key in system if f"system.{key}" in text]
        assert named or "models.m.params.n_ctx" in text, text
        assert "Traceback" not in text
    else:
        assert 512 <= settings_.models["m"].params.n_ctx <= 131072
        for key, value in system.items():
            loaded = getattr(settings_.system, key)
            assert loaded == value or (isinstance(value, int) and loaded == float(value))


PRINTABLE = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)


@given(data=st.lists(PRINTABLE, min_size=1, max_size=5), text=PRINTABLE)
def test_chunks_survive_the_wire_exactly(data: list[str], text: str) -> None:
    wire = generate_event_to_pb(Chunks(data, text)).SerializeToString()
    parsed = ipb.GenerateResponse.FromString(wire)
    assert list(parsed.chunk.data) == data and parsed.chunk.text == text


COUNTS = st.integers(min_value=0, max_value=2**31 - 1)
MILLIS = st.floats(min_value=0, max_value=1e9, allow_nan=False)


@given(
    reason=st.sampled_from(["stop", "length", "tool_calls", ""]),
    counts=st.tuples(COUNTS, COUNTS, COUNTS, COUNTS),
    times=st.tuples(MILLIS, MILLIS, MILLIS, MILLIS),
)
def test_end_event_keeps_usage_and_timing(
    reason: str, counts: tuple[int, int, int, int], times: tuple[float, float, float, float]
) -> None:
    end = generate_event_to_pb(Done(reason, Usage(*counts), Timing(*times))).end
    parsed = ipb.End.FromString(end.SerializeToString())
    usage = parsed.usage
    assert parsed.finish_reason == reason
    assert (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cached_tokens,
    ) == counts
    assert (
        parsed.timing.queue_ms,
        parsed.timing.load_ms,
        parsed.timing.ttft_ms,
        parsed.timing.total_ms,
    ) == times


@given(
    state=st.sampled_from(list(ModelState)),
    stage=st.sampled_from(list(LoadStage)),
    since=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    counts=st.tuples(*(st.integers(min_value=0, max_value=2**31 - 1) for _ in range(6))),
)
def test_model_snapshot_maps_every_state_and_time(
    state: ModelState, stage: LoadStage, since: float, counts: tuple[int, ...]
) -> None:
    snapshot = ModelSnapshot(
        alias="m", state=state, kind=ModelKind.CHAT, port=counts[0] % 65536, pid=counts[1],
        slots=counts[2], in_flight=counts[3], queued=counts[4], n_ctx=counts[5], pinned=False,
        last_error="", state_since=since, last_used_at=0.0, retry_at=0.0,
        consecutive_failures=0, restarts=0, device="cpu", memory_estimate_mib=0,
        memory_measured_mib=0, load_seconds=0.0, ttl_sec=0.0, load_stage=stage, created_at=0.0,
    )  # fmt: skip
    model = model_pb2.Model.FromString(model_to_pb(snapshot).SerializeToString())
    assert model_pb2.ModelState.Name(model.state) == f"MODEL_STATE_{state.name}"
    assert model.HasField("state_since") == bool(since)
    if since:
        assert abs(model.state_since.seconds + model.state_since.nanos / 1e9 - since) < 1e-6
    assert not model.HasField("last_used_at")
    assert (model.pid, model.slots, model.in_flight, model.queued) == counts[1:5]


DEVICE_IDS = ("gpu:0", "gpu:1", "gpu:2")
devices_strategy = st.lists(
    st.builds(
        DeviceView,
        id=st.sampled_from(DEVICE_IDS),
        total_mib=st.integers(min_value=0, max_value=16384),
        used_by_others_mib=st.integers(min_value=0, max_value=8192),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda d: d.id,
)
residents_strategy = st.lists(
    st.builds(
        ResidentView,
        alias=st.sampled_from(["a", "b", "c", "d", "e"]),
        device=st.sampled_from(DEVICE_IDS),
        memory_mib=st.integers(min_value=0, max_value=8192),
        busy=st.booleans(),
        pinned=st.booleans(),
        loading=st.booleans(),
        last_used=st.floats(min_value=0, max_value=1000, allow_nan=False),
    ),
    max_size=5,
    unique_by=lambda r: r.alias,
)


@given(
    devices=devices_strategy,
    residents=residents_strategy,
    memory=st.integers(min_value=0, max_value=16384),
    allowed=st.lists(st.sampled_from(DEVICE_IDS), min_size=1, max_size=3, unique=True),
    max_models=st.integers(min_value=1, max_value=6),
)
def test_every_plan_keeps_the_rules(
    devices: list[DeviceView],
    residents: list[ResidentView],
    memory: int,
    allowed: list[str],
    max_models: int,
) -> None:
    candidate = CandidateView("new", memory, tuple(allowed))
    plan = plan_admission(candidate, residents, devices, max_models)
    usable = [d for d in devices if d.id in allowed]

    def room(device_id: str, gone: set[str]) -> int:
        device = next(d for d in devices if d.id == device_id)
        held = sum(r.memory_mib for r in residents if r.device == device_id and r.alias not in gone)
        return device.capacity_mib - held

    unpinned = {r.alias for r in residents if not r.pinned}
    # Whether evicting every unpinned model (busy ones once idle) would make room somewhere.
    room_later = (
        any(d.capacity_mib >= memory and room(d.id, unpinned) >= memory for d in usable)
        and len(residents) - len(unpinned) < max_models
    )
    if isinstance(plan, Refuse):
        # Too big for every usable device, or pinned models (never evicted) hold the room.
        assert not room_later
    elif isinstance(plan, Admit):
        assert plan.device in allowed
        assert room(plan.device, set()) >= memory and len(residents) < max_models
    elif isinstance(plan, Evict):
        assert plan.device in allowed and plan.victims
        named = {r.alias: r for r in residents}
        assert all(evictable(named[v]) for v in plan.victims)  # never busy, pinned or loading
        assert room(plan.device, set(plan.victims)) >= memory
        assert len(residents) - len(plan.victims) < max_models
    else:
        assert isinstance(plan, Wait)
        assert room_later and plan.blockers
        named = {r.alias: r for r in residents}
        assert all(not evictable(named[b]) and not named[b].pinned for b in plan.blockers)


@settings(max_examples=150)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("join"), st.sampled_from(list(Priority))),
            st.tuples(st.just("release"), st.just(None)),
            st.tuples(st.just("capacity"), st.integers(min_value=0, max_value=3)),
        ),
        max_size=40,
    ),
    aging=st.integers(min_value=1, max_value=4),
)
def test_queue_never_runs_more_than_its_capacity(
    steps: list[tuple[str, object]], aging: int
) -> None:
    async def scenario() -> None:
        queue = SlotQueue(max_waiting=1000, aging_dispatches=aging)
        for action, value in steps:
            before = queue.running
            if action == "join":
                assert isinstance(value, Priority)
                queue.join(value)
            elif action == "release" and queue.running:
                queue.release()
            elif action == "capacity":
                assert isinstance(value, int)
                queue.set_capacity(value)
            # A step may leave more running than the capacity only if they were already
            # running (the capacity shrank under them); dispatch never adds beyond it.
            assert queue.running <= max(queue.capacity, before)
            if queue.running < queue.capacity:
                assert queue.waiting == 0  # a free slot is never left while someone waits

    asyncio.run(scenario())
