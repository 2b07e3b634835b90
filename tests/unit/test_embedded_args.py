"""llama-server flags -> xllamacpp.CommonParams, checked without starting a server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import xllamacpp as xlc

from router.embedded.__main__ import LaunchPlan, build_params


def plan(*flags: str) -> LaunchPlan:
    return build_params(["-m", "model.gguf", *flags])


def test_defaults_follow_llama_server_and_never_fit_params() -> None:
    result = plan()
    params = result.params
    assert params.model.path == "model.gguf"
    assert params.hostnames == ["127.0.0.1"]
    assert params.port == 8080
    assert params.fit_params is False
    assert params.kv_unified is False
    assert params.embedding is False
    assert result.warnings == ()


def test_long_flags_map_onto_common_params() -> None:
    params = plan(
        "--host", "0.0.0.0", "--port", "18090", "--ctx-size", "4096", "--parallel", "2",
        "--threads", "3", "--threads-batch", "5", "--n-predict", "64", "--batch-size", "256",
        "--ubatch-size", "128", "--embeddings", "--pooling", "mean", "--metrics", "--props",
        "--no-slots", "--chat-template", "chatml", "--seed", "42", "--verbosity", "1",
        "--n-gpu-layers", "99", "--kv-unified", "--cache-type-k", "q8_0",
        "--cache-type-v", "q4_0", "--flash-attn", "off", "--rope-freq-base", "500000",
        "--jinja", "--no-warmup",
    ).params  # fmt: skip
    assert params.hostnames == ["0.0.0.0"]
    assert params.port == 18090
    assert params.n_ctx == 4096
    assert params.n_parallel == 2
    assert params.cpuparams.n_threads == 3
    assert params.cpuparams_batch.n_threads == 5
    assert params.n_predict == 64
    assert params.n_batch == 256
    assert params.n_ubatch == 128
    assert params.embedding is True
    assert params.pooling_type == xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    assert params.endpoint_metrics is True
    assert params.endpoint_props is True
    assert params.endpoint_slots is False
    assert params.chat_template == "chatml"
    assert params.sampling.seed == 42
    assert params.verbosity == 1
    assert params.n_gpu_layers == 99
    assert params.kv_unified is True
    assert params.cache_type_k == xlc.ggml_type.GGML_TYPE_Q8_0
    assert params.cache_type_v == xlc.ggml_type.GGML_TYPE_Q4_0
    assert params.flash_attn_type == xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert params.rope_freq_base == 500000.0
    assert params.use_jinja is True
    assert params.warmup is False


def test_short_flags_are_llama_servers_spellings() -> None:
    params = build_params(
        ["-m", "x.gguf", "-c", "1024", "-np", "4", "-t", "2", "-tb", "1", "-n", "8", "-b", "64",
         "-ub", "32", "-a", "chat", "-s", "7", "-lv", "2", "-ngl", "0", "-kvu", "-ctk", "f32",
         "-ctv", "bf16", "-fa", "on", "-dev", "none"]
    ).params  # fmt: skip
    assert params.model.path == "x.gguf"
    assert (params.n_ctx, params.n_parallel, params.n_predict) == (1024, 4, 8)
    assert (params.cpuparams.n_threads, params.cpuparams_batch.n_threads) == (2, 1)
    assert (params.n_batch, params.n_ubatch) == (64, 32)
    assert params.model_alias == {"chat"}
    assert (params.sampling.seed, params.verbosity, params.n_gpu_layers) == (7, 2, 0)
    assert params.kv_unified is True
    assert params.cache_type_k == xlc.ggml_type.GGML_TYPE_F32
    assert params.cache_type_v == xlc.ggml_type.GGML_TYPE_BF16
    assert params.flash_attn_type == xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED


def test_batch_threads_default_to_threads() -> None:
    params = plan("-t", "3").params
    assert params.cpuparams_batch.n_threads == 3


def test_bare_flash_attn_means_on() -> None:
    params = plan("-fa").params
    assert params.flash_attn_type == xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12", 12), ("auto", -1), ("all", -2)],
)
def test_gpu_layers_take_a_count_auto_or_all(value: str, expected: int) -> None:
    for flag in ("-ngl", "--n-gpu-layers", "--gpu-layers"):
        assert plan(flag, value).params.n_gpu_layers == expected


@pytest.mark.parametrize(
    ("name", "member"),
    [
        ("none", "LLAMA_POOLING_TYPE_NONE"),
        ("mean", "LLAMA_POOLING_TYPE_MEAN"),
        ("cls", "LLAMA_POOLING_TYPE_CLS"),
        ("last", "LLAMA_POOLING_TYPE_LAST"),
        ("rank", "LLAMA_POOLING_TYPE_RANK"),
    ],
)
def test_pooling_names_select_llama_pooling_types(name: str, member: str) -> None:
    assert plan("--pooling", name).params.pooling_type == getattr(xlc.llama_pooling_type, member)


@pytest.mark.parametrize(
    ("flags", "member"),
    [
        (("--no-mmap",), "LLAMA_LOAD_MODE_NONE"),
        (("--mlock",), "LLAMA_LOAD_MODE_MMAP_MLOCK"),
        (("--no-mmap", "--mlock"), "LLAMA_LOAD_MODE_MLOCK"),
        ((), "LLAMA_LOAD_MODE_AUTO"),
    ],
)
def test_mmap_and_mlock_flags_pick_the_load_mode(flags: tuple[str, ...], member: str) -> None:
    assert plan(*flags).params.load_mode == getattr(xlc.llama_load_mode, member)


def test_aliases_and_api_keys_repeat_and_split_on_commas() -> None:
    params = plan("-a", "one,two", "--alias", "three", "--api-key", "k1,k2", "--api-key", "k3")
    assert params.params.model_alias == {"one", "two", "three"}
    assert params.params.api_keys == ["k1", "k2", "k3"]


def test_api_key_file_adds_one_key_per_nonempty_line(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("secret-a\n\nsecret-b\n")
    params = plan("--api-key", "inline", "--api-key-file", str(key_file)).params
    assert params.api_keys == ["inline", "secret-a", "secret-b"]


def test_unreadable_api_key_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plan("--api-key-file", str(tmp_path / "missing"))
    assert exit_info.value.code == 2


def test_cpu_device_is_silent_but_a_gpu_device_is_ignored_with_a_warning() -> None:
    assert plan("--device", "CPU").warnings == ()
    assert plan("-dev", "none").warnings == ()
    (warning,) = plan("--device", "CUDA0,CPU").warnings
    assert warning.startswith("--device CUDA0 ignored")


@pytest.mark.parametrize(
    "flags",
    [
        ("--no-such-flag",),
        ("--pooling", "median"),
        ("-ctk", "q3_k"),
        ("-fa", "maybe"),
        ("-ngl", "many"),
        ("--port", "http"),
        ("--ctx", "1024"),  # abbreviations are off: llama-server has no --ctx
    ],
)
def test_unknown_or_malformed_flags_exit_with_usage_error(
    flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plan(*flags)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_model_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_params(["--port", "1"])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err


_REAL_PARAMS = xlc.CommonParams


class _ParamsWithoutKvUnified:
    """A CommonParams as a build without the kv_unified setting would present it."""

    def __init__(self) -> None:
        object.__setattr__(self, "_real", _REAL_PARAMS())

    def __getattr__(self, name: str) -> Any:
        if name == "kv_unified":
            raise AttributeError(name)
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)


def test_flag_without_a_setting_in_this_build_warns_instead_of_failing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(xlc, "CommonParams", _ParamsWithoutKvUnified)
    result = plan("--kv-unified", "-np", "2")
    (warning,) = result.warnings
    assert warning.startswith("--kv-unified ignored")
    assert result.params.n_parallel == 2
