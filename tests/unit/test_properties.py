"""Property tests (hypothesis): config validation, domain ⇄ proto conversion, policy, queue,
the facade's OpenAI request parsing, the router's access rules and length limits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients import GenerateKind
from facade.errors import ApiError
from facade.openai.protocol import parse_embedding_request, parse_generation_request
from router.auth import (
    REQUIRED,
    Authenticator,
    Principal,
    TokenBucket,
    allows,
    check_request,
    presented_key,
)
from router.config import ApiKey, ConfigError, load_settings
from router.errors import (
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from router.inference import CHAT, Chunks, Done, Limits, Timing, Usage, apply_limits
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
from router.v1 import model_control_service_pb2 as mpb
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


# The facade's OpenAI request parsing: a 4xx ApiError or a request that keeps the body.

FIELD_NAMES = st.sampled_from(
    [
        "model", "stream", "messages", "prompt", "tools", "role", "content", "type", "text",
        "function", "name", "tool_calls", "arguments", "id", "description", "tool_call_id",
        "reasoning_content", "input", "encoding_format",
    ]
)  # fmt: skip
BODY_VALUES = st.recursive(
    JSON_SCALARS | st.sampled_from(["function", "text", "user", "float", "base64", "m"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(FIELD_NAMES | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=16,
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool"])
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": ROLES, "content": PRINTABLE}), min_size=1, max_size=4
)
# Valid bodies of every kind, then some fields replaced, added or dropped: near the edge
# between accepted and refused, where a parser is likeliest to fail with something else.
LOOSE_FIELDS = st.dictionaries(FIELD_NAMES, BODY_VALUES, max_size=2)
LOOSE_MESSAGES = st.lists(
    st.tuples(st.fixed_dictionaries({"role": ROLES, "content": PRINTABLE}), LOOSE_FIELDS).map(
        lambda pair: {**pair[0], **pair[1]}
    ),
    min_size=1,
    max_size=3,
)
TOOLS = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function") | BODY_VALUES,
         "function": st.fixed_dictionaries({"name": PRINTABLE | BODY_VALUES},
                                           optional={"description": BODY_VALUES})}
    ),
    max_size=2,
)  # fmt: skip
VALID_BODIES = st.fixed_dictionaries(
    {"model": PRINTABLE.filter(bool)},
    optional={
        "messages": LOOSE_MESSAGES,
        "prompt": PRINTABLE,
        "stream": st.booleans(),
        "tools": TOOLS,
        "input": PRINTABLE
        | st.lists(PRINTABLE, min_size=1, max_size=3)
        | st.lists(st.integers(min_value=-1, max_value=2**31), min_size=1, max_size=3),
        "encoding_format": st.sampled_from(["float", "base64"]),
    },
)
NEAR_VALID = st.tuples(VALID_BODIES, LOOSE_FIELDS, st.sets(FIELD_NAMES, max_size=1)).map(
    lambda t: {k: v for k, v in {**t[0], **t[1]}.items() if k not in t[2]}
)
BODY_TEXTS = st.one_of(
    VALID_BODIES.map(json.dumps),
    NEAR_VALID.map(json.dumps),
    st.dictionaries(FIELD_NAMES, BODY_VALUES, max_size=6).map(json.dumps),
    BODY_VALUES.map(json.dumps),
    PRINTABLE,
    st.integers(min_value=1, max_value=200_000).map(lambda depth: "[" * depth),
)
EXTRA_FIELDS = st.dictionaries(
    st.sampled_from(["temperature", "seed", "stop", "response_format", "logprobs", "n"]),
    JSON_VALUES,
    max_size=3,
)


def refused_cleanly(error: ApiError) -> None:
    assert 400 <= error.status < 500 and error.message
    assert "Traceback" not in error.message


@settings(max_examples=300)
@given(text=BODY_TEXTS, kind=st.sampled_from(["chat", "completion"]))
def test_generation_bodies_are_kept_or_refused_with_a_4xx(text: str, kind: GenerateKind) -> None:
    try:
        request = parse_generation_request(text, kind)
    except ApiError as error:
        refused_cleanly(error)
        return
    body = json.loads(text)
    assert request.body == text  # the original text travels, byte for byte
    assert request.model == body["model"] and request.stream is body.get("stream", False)
    if kind == "chat":
        assert all(isinstance(message["role"], str) for message in body["messages"])
    else:
        assert body["prompt"] is not None


@given(
    model=PRINTABLE.filter(bool),
    stream=st.none() | st.booleans(),
    messages=MESSAGES,
    extra=EXTRA_FIELDS,
    kind=st.sampled_from(["chat", "completion"]),
)
def test_a_valid_generation_body_is_accepted_unchanged(
    model: str,
    stream: bool | None,
    messages: list[dict[str, str]],
    extra: dict[str, object],
    kind: GenerateKind,
) -> None:
    body: dict[str, object] = {**extra, "model": model}
    body.update({"messages": messages} if kind == "chat" else {"prompt": messages[0]["content"]})
    if stream is not None:
        body["stream"] = stream
    text = json.dumps(body)
    request = parse_generation_request(text, kind)
    assert (request.model, request.stream, request.body) == (model, bool(stream), text)


@settings(max_examples=300)
@given(text=BODY_TEXTS)
def test_embedding_bodies_are_read_or_refused_with_a_4xx(text: str) -> None:
    try:
        request = parse_embedding_request(text)
    except ApiError as error:
        refused_cleanly(error)
        return
    body = json.loads(text)
    value = body["input"]
    if isinstance(value, str) or all(type(item) is int for item in value):
        value = [value]
    assert request.inputs == value and request.model == body["model"]
    assert request.encoding_format == body.get("encoding_format", "float")


TOKEN_IDS = st.integers(min_value=0, max_value=2**31 - 1)


@given(
    model=PRINTABLE.filter(bool),
    inputs=st.one_of(
        PRINTABLE.filter(bool),
        st.lists(PRINTABLE.filter(bool), min_size=1, max_size=4),
        st.lists(TOKEN_IDS, min_size=1, max_size=4),
        st.lists(st.lists(TOKEN_IDS, min_size=1, max_size=4), min_size=1, max_size=3),
    ),
    encoding=st.sampled_from(["float", "base64", None]),
)
def test_a_valid_embedding_body_round_trips(
    model: str, inputs: object, encoding: str | None
) -> None:
    body: dict[str, object] = {"model": model, "input": inputs}
    if encoding is not None:
        body["encoding_format"] = encoding
    request = parse_embedding_request(json.dumps(body))
    expected = [inputs] if isinstance(inputs, str) or isinstance(inputs[0], int) else inputs  # type: ignore[index]
    assert (request.model, request.inputs) == (model, expected)
    assert request.encoding_format == (encoding or "float")


# The router's access rules (router/auth.py).

SCOPE_SETS = st.sets(st.sampled_from(["inference", "monitor", "admin"]))
REQUIREMENTS = st.sampled_from(["read", "inference", "monitor", "admin"])


@given(scopes=SCOPE_SETS, more=SCOPE_SETS, required=REQUIREMENTS)
def test_allows_follows_the_scope_table(scopes: set[str], more: set[str], required: str) -> None:
    granted = allows(scopes, required)
    if "admin" in scopes:
        assert granted
    elif required == "read":
        assert granted == bool(scopes)
    else:
        assert granted == (required in scopes)
    if granted:
        assert allows(scopes | more, required)  # a scope more never takes a right away


METHODS = st.sampled_from(
    [*REQUIRED, "/router.v1.ModelControlService/SomethingNew", "/other.Service/Call"]
)


@given(scopes=SCOPE_SETS.filter(bool), method=METHODS, right_key=st.booleans())
def test_authorize_fails_closed(scopes: set[str], method: str, right_key: bool) -> None:
    key = "the-key-0123456789"
    authenticator = Authenticator([ApiKey(key=key, scopes=sorted(scopes))])
    presented = key if right_key else key + "x"
    metadata = [("authorization", f"Bearer {presented}")]
    needed = REQUIRED.get(method, "admin")  # a method not in the table needs admin
    if not right_key:
        with pytest.raises(Unauthenticated):
            authenticator.authorize(method, metadata)
    elif not allows(scopes, needed):
        with pytest.raises(PermissionDenied):
            authenticator.authorize(method, metadata)
    else:
        assert authenticator.authorize(method, metadata).scopes == scopes
    assert authenticator.authorize("/grpc.health.v1.Health/Check", []).name == "anonymous"


HEADER_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=14).filter(
    lambda name: name not in ("authorization", "x-api-key")
)
HEADERS = st.lists(st.tuples(HEADER_NAMES, st.text(max_size=20) | st.binary(max_size=20)))
KEYS = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1)


@given(
    before=HEADERS,
    after=st.lists(
        st.tuples(st.sampled_from(["authorization", "x-api-key", "x"]), st.text(max_size=9))
    ),
    key=KEYS,
    header=st.sampled_from(
        [("Authorization", "Bearer "), ("authorization", "bearer "), ("AUTHORIZATION", "BEARER "),
         ("authorization", "bEaReR  "), ("x-api-key", ""), ("X-API-Key", " ")]
    ),
)  # fmt: skip
def test_presented_key_is_the_first_key_header(
    before: list[tuple[str, str | bytes]],
    after: list[tuple[str, str]],
    key: str,
    header: tuple[str, str],
) -> None:
    name, prefix = header
    metadata: list[tuple[str, str | bytes]] = [*before, (name, prefix + key + " "), *after]
    assert presented_key(metadata) == key
    assert presented_key(before) is None  # other headers, even binary ones, are no key


class FrozenClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


AMOUNTS = st.floats(min_value=0, max_value=20_000, allow_nan=False)


@given(
    per_minute=st.integers(min_value=1, max_value=10_000),
    steps=st.lists(
        st.tuples(st.sampled_from(["wait", "take", "debit", "positive"]), AMOUNTS), max_size=30
    ),
)
def test_token_bucket_invariants(per_minute: int, steps: list[tuple[str, float]]) -> None:
    clock = FrozenClock()
    bucket = TokenBucket(per_minute, clock)
    rate = per_minute / 60
    for action, amount in steps:
        before = bucket.level
        if action == "wait":
            clock.now += amount / 100
            assert before <= bucket.level <= max(before, per_minute)
        elif action == "debit":
            bucket.debit(amount)
            assert bucket.level == pytest.approx(before - amount)
        elif action == "positive":
            wait = bucket.wait_for_positive()
            assert (wait == 0) == (before > 0) and wait >= 0
            if wait:
                clock.now += wait * (1 + 1e-9) + 1e-9
                assert bucket.wait_for_positive() == 0
        else:
            wait = bucket.take(amount)
            if before >= amount:
                assert wait == 0 and bucket.level == pytest.approx(before - amount)
            else:
                assert wait == pytest.approx((amount - before) / rate)
                assert bucket.level == before  # a refused take takes nothing
                if amount <= per_minute:  # the promised wait is enough
                    clock.now += wait * (1 + 1e-9) + 1e-9
                    assert bucket.take(amount) == 0
        assert bucket.level <= per_minute


MODEL_NAMES = st.sampled_from(["a", "b", "c", ""])
PRIORITIES = st.sampled_from(
    [ipb.PRIORITY_UNSPECIFIED, ipb.PRIORITY_LOW, ipb.PRIORITY_NORMAL, ipb.PRIORITY_HIGH]
)


def rpc_request(kind: str, model: str, priority: int) -> Message:
    if kind == "generate":
        return ipb.GenerateRequest(model=model, priority=priority)  # type: ignore[arg-type]
    if kind == "embed":
        return ipb.EmbedRequest(model=model, priority=priority)  # type: ignore[arg-type]
    if kind == "get_model":
        return mpb.GetModelRequest(model=model)
    return mpb.ListModelsRequest()


RPC_KINDS = st.sampled_from(["generate", "embed", "get_model", "list"])


@given(
    allowed=st.none() | st.frozensets(st.sampled_from(["a", "b", "c"])),
    high=st.booleans(),
    kind=RPC_KINDS,
    model=MODEL_NAMES,
    priority=PRIORITIES,
)
def test_check_request_hides_other_models_and_guards_high_priority(
    allowed: frozenset[str] | None, high: bool, kind: str, model: str, priority: int
) -> None:
    principal = Principal("p", frozenset({"admin"}), allowed, high)
    request = rpc_request(kind, model, priority)
    named = getattr(request, "model", "")
    if named and allowed is not None and named not in allowed:
        with pytest.raises(ModelNotFound):
            check_request(principal, request)
    elif kind in ("generate", "embed") and priority == ipb.PRIORITY_HIGH and not high:
        with pytest.raises(PermissionDenied):
            check_request(principal, request)
    else:
        check_request(principal, request)


@given(
    per_minute=st.integers(min_value=1, max_value=10),
    calls=st.lists(RPC_KINDS, max_size=40),
    debt=st.floats(min_value=0, max_value=100, allow_nan=False),
)
def test_only_inference_calls_spend_a_keys_budget(
    per_minute: int, calls: list[str], debt: float
) -> None:
    clock = FrozenClock()
    tokens = TokenBucket(60, clock)
    tokens.debit(60 + debt)  # at or below zero: inference calls are refused on tokens
    principal = Principal(
        "p", frozenset({"admin"}), None, False, requests=TokenBucket(per_minute, clock)
    )
    admitted = 0
    for kind in calls:
        inference = kind in ("generate", "embed")
        try:
            check_request(principal, rpc_request(kind, "a", ipb.PRIORITY_NORMAL))
        except RateLimited as error:
            assert inference and admitted == per_minute, (kind, admitted)
            assert error.retry_after is not None and error.retry_after > 0
            continue
        admitted += inference
    assert admitted <= per_minute
    principal.tokens = tokens
    for kind in calls:
        if kind in ("generate", "embed"):
            with pytest.raises(RateLimited, match="tokens"):
                check_request(principal, rpc_request(kind, "a", ipb.PRIORITY_NORMAL))
        else:
            check_request(principal, rpc_request(kind, "a", ipb.PRIORITY_NORMAL))


# The router's length limits (router/inference.py apply_limits).

LENGTHS = st.integers(min_value=-3, max_value=700) | JSON_SCALARS


@given(
    lengths=st.dictionaries(
        st.sampled_from(["max_tokens", "max_completion_tokens", "n_predict"]), LENGTHS, max_size=3
    ),
    cap=st.none() | st.integers(min_value=1, max_value=600),
)
def test_apply_limits_never_lets_a_body_past_the_cap(
    lengths: dict[str, object], cap: int | None
) -> None:
    body: dict[str, object] = {"messages": [], **lengths}
    try:
        apply_limits(body, CHAT, 512, cap, Limits())
    except InvalidRequest as error:
        assert error.metadata["param"] in lengths
        return
    for name in lengths:
        value = body[name]
        assert isinstance(value, int) and (value == -1 or 1 <= value <= 512)
    if cap is not None:
        # n_predict, which llama-server reads first, is always there and within the cap, and
        # so is every other length field.
        for name in ("n_predict", *lengths):
            assert 1 <= body[name] <= cap  # type: ignore[operator]
