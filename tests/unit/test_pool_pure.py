"""Pure pieces of the pool: transition table, argv builder, failure classes, SSE parser."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

import pytest

from router.config import Settings
from router.pool.command import LaunchSpec, build_command, with_death_signal
from router.pool.failures import FailureKind, classify_exit
from router.pool.pool import launch_spec
from router.pool.registry import ChildRegistry
from router.pool.state import TRANSITIONS, InvalidTransition, ModelState, check_transition
from router.pool.upstream import SSEParser, UpstreamHTTPError

S = ModelState

ALLOWED = {
    (S.STOPPED, S.STARTING),
    (S.STOPPED, S.FAILED),
    (S.STARTING, S.LOADING),
    (S.STARTING, S.READY),
    (S.STARTING, S.STOPPING),
    (S.STARTING, S.STOPPED),
    (S.STARTING, S.FAILED),
    (S.LOADING, S.READY),
    (S.LOADING, S.STOPPING),
    (S.LOADING, S.STOPPED),
    (S.LOADING, S.FAILED),
    (S.READY, S.DRAINING),
    (S.READY, S.STOPPING),
    (S.READY, S.STOPPED),
    (S.READY, S.FAILED),
    (S.DRAINING, S.STOPPING),
    (S.DRAINING, S.STOPPED),
    (S.DRAINING, S.FAILED),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.FAILED),
    (S.FAILED, S.STARTING),
    (S.FAILED, S.STOPPED),
}


@pytest.mark.parametrize(
    ("current", "target"),
    list(itertools.product(ModelState, ModelState)),
    ids=lambda s: s.value,
)
def test_every_transition_is_allowed_or_refused_by_the_table(
    current: ModelState, target: ModelState
) -> None:
    if (current, target) in ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, target)


def test_table_has_an_entry_for_every_state() -> None:
    assert set(TRANSITIONS) == set(ModelState)


def test_ready_is_reachable_only_from_starting_or_loading() -> None:
    sources = {current for current, targets in TRANSITIONS.items() if S.READY in targets}
    assert sources == {S.STARTING, S.LOADING}


SPEC = LaunchSpec(alias="chat", model_path=Path("/models/m.gguf"), server=("llama-server",))


def test_command_carries_the_router_owned_flags() -> None:
    argv = build_command(SPEC, port=4321, api_key_file=Path("/state/keys/k"))
    assert argv[0] == "llama-server"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--host"] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "4321"
    assert argv[argv.index("--alias") + 1] == "chat"
    assert argv[argv.index("--api-key-file") + 1] == "/state/keys/k"
    assert argv[argv.index("--parallel") + 1] == "4"
    assert "--kv-unified" in argv
    assert "--api-key" not in argv  # never a secret on the command line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"use_mmap": False}, ["--no-mmap"], id="no-mmap"),
        pytest.param({"embedding": True}, ["--embedding"], id="embedding"),
        pytest.param({"pooling": "mean"}, ["--pooling", "mean"], id="pooling"),
        pytest.param({"ubatch_size": 64}, ["--ubatch-size", "64"], id="ubatch"),
        pytest.param({"rope_freq_base": 10000.0}, ["--rope-freq-base", "10000"], id="rope-int"),
        pytest.param({"rope_freq_base": 0.5}, ["--rope-freq-base", "0.5"], id="rope-float"),
        pytest.param({"chat_template": "chatml"}, ["--chat-template", "chatml"], id="template"),
        pytest.param({"extra_args": ("--top-k", "5")}, ["--top-k", "5"], id="extra-args-last"),
    ],
)
def test_optional_flags(change: dict[str, object], expected: list[str]) -> None:
    argv = build_command(_spec(**change), port=1, api_key_file=Path("k"))
    start = argv.index(expected[0])
    assert argv[start : start + len(expected)] == expected


def _spec(**change: object) -> LaunchSpec:
    fields = {name: getattr(SPEC, name) for name in SPEC.__slots__}
    fields.update(change)
    return LaunchSpec(**fields)


def test_command_is_the_same_without_options() -> None:
    argv = build_command(SPEC, port=1, api_key_file=Path("k"))
    for flag in ("--no-mmap", "--embedding", "--pooling", "--rope-freq-base", "--chat-template"):
        assert flag not in argv


def test_death_signal_wraps_argv() -> None:
    assert with_death_signal(["a", "b"], "/usr/bin/setpriv") == [
        "/usr/bin/setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        "a",
        "b",
    ]
    assert with_death_signal(["a"], None) == ["a"]


@pytest.mark.parametrize(
    ("returncode", "log", "kind", "summary_part"),
    [
        pytest.param(
            1, ["couldn't bind HTTP server socket"], FailureKind.PORT_CONFLICT, "port", id="port"
        ),
        pytest.param(
            1,
            ["error: unknown argument: --bogus"],
            FailureKind.PERMANENT,
            "arguments",
            id="bad-flag",
        ),
        pytest.param(
            2,
            ["error: unrecognized arguments: --x"],
            FailureKind.PERMANENT,
            "arguments",
            id="argparse",
        ),
        pytest.param(
            1,
            ["llama_model_load: error loading model: tensor"],
            FailureKind.PERMANENT,
            "model file",
            id="bad-model",
        ),
        pytest.param(
            1,
            ["failed to load model '/x/y.gguf'"],
            FailureKind.PERMANENT,
            "model file",
            id="load-failed",
        ),
        pytest.param(1, ["ggml_cuda: out of memory"], FailureKind.RETRYABLE, "memory", id="oom"),
        pytest.param(-signal.SIGKILL, [], FailureKind.RETRYABLE, "killed", id="sigkill"),
        pytest.param(-signal.SIGSEGV, [], FailureKind.RETRYABLE, "SIGSEGV", id="segv"),
        pytest.param(
            3,
            ["llama_model_loader: loaded meta data"],
            FailureKind.RETRYABLE,
            "status 3",
            id="routine-loader-line",
        ),
    ],
)
def test_exit_classification(
    returncode: int, log: list[str], kind: FailureKind, summary_part: str
) -> None:
    failure = classify_exit(returncode, log)
    assert failure.kind is kind
    assert summary_part in failure.summary
    assert "/" not in failure.summary  # summaries never carry paths or log text


def test_sse_parser_joins_split_events_and_skips_comments() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert parser.feed(b":2}\n\n: keep-alive\n\n") == [b'{"b":2}']
    assert not parser.done
    assert parser.feed(b"data: [DONE]\n\n") == []
    assert parser.done


def test_sse_parser_accepts_crlf_and_no_space() -> None:
    parser = SSEParser()
    assert parser.feed(b'data:{"x":1}\r\n\r\n') == [b'{"x":1}']


def test_sse_parser_raises_on_error_event() -> None:
    with pytest.raises(UpstreamHTTPError):
        SSEParser().feed(b'error: {"message":"boom"}\n\n')


def test_leftover_child_keys_go_and_other_files_stay(tmp_path: Path) -> None:
    registry = ChildRegistry(tmp_path)
    registry.acquire()
    try:
        _, leftover = registry.new_api_key("chat")
        mine = tmp_path / "keys" / "admin.key"  # e.g. state_dir set to a folder with keys/
        mine.write_text("operator's own key")
        registry.reap_leftovers()
    finally:
        registry.release()
    assert not leftover.exists()
    assert mine.read_text() == "operator's own key"


@pytest.mark.parametrize(
    ("params", "batches"),
    [
        # llama-server refuses an embedding input longer than its micro-batch (512 by
        # default, capped by --batch-size 256): by default an embedding model gets both at its
        # context, so every input that fits the context embeds.
        pytest.param({"n_ctx": 2048}, (2048, 2048), id="embedding-default"),
        pytest.param({"n_ctx": 32768}, (4096, 4096), id="embedding-capped"),
        pytest.param({"n_ctx": 2048, "ubatch_size": 300}, (256, 300), id="embedding-ubatch-set"),
        pytest.param(
            {"n_ctx": 2048, "batch_override": 1024}, (1024, None), id="embedding-batch-set"
        ),
        pytest.param({"n_ctx": 2048, "embedding": False}, (256, None), id="chat"),
    ],
)
def test_an_embedding_model_embeds_inputs_as_long_as_its_context(
    params: dict[str, object], batches: tuple[int, int | None]
) -> None:
    model = {"model_path": "/m.gguf", "params": {"embedding": True, **params}}
    settings = Settings.model_validate({"models": {"m": model}})
    spec = launch_spec("m", settings.models["m"], settings)
    assert (spec.n_batch, spec.ubatch_size) == batches
    assert spec.micro_batch == min(batches[1] or 512, batches[0])


@pytest.mark.parametrize(
    ("extra_args", "multimodal"),
    [
        ((), False),
        (("--mmproj", "p.gguf"), True),
        (("-mm", "p.gguf"), True),
        (("--mmproj-url=https://x/p.gguf",), True),
        (("--mmproj", "p.gguf", "--no-mmproj"), False),
        (("--top-k", "5"), False),
    ],
)
def test_a_child_takes_media_only_with_a_projector(
    extra_args: tuple[str, ...], multimodal: bool
) -> None:
    assert _spec(extra_args=extra_args).multimodal is multimodal
