"""router.config: seed configs load unchanged; every fault is named by key, value and rule."""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from router.config import (
    CHILD_LINK_FLAGS,
    ROUTER_CONTROLLED_FLAGS,
    ApiKey,
    ConfigError,
    GrpcConfig,
    ModelConfig,
    Settings,
    SystemConfig,
    demo_settings,
    load_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The seed code's defaults (seed-inventory §2), which a file without the key must get.
SEED_SYSTEM_DEFAULTS: dict[str, object] = {
    "enable_idle_timeout": True,
    "idle_timeout_sec": 300,
    "llama_server_path": None,
    "base_models_path": None,
    "max_concurrent_models": 3,
    "request_timeout_sec": 300,
    "preload_models": [],
    "preload_delay_sec": 5,
    "min_vram_required": 500,
    "vram_multiplier": 1.1,
    "keep_warm_models": 2,
    "gpu_devices": [0],
    "parallel_requests": 4,
    "cpu_threads": 8,
    "use_mmap": True,
    "flash_attention": "on",
    "max_queue_size_per_model": 100,
    "queue_timeout_sec": 300,
    "timeout_warmup_sec": 180,
    "wait_ready_sec": 120,
    "http_max_keepalive": 100,
    "http_max_connections": 200,
    "queue_processor_idle_sec": 120,
    "model_load_max_retries": 2,
}
SEED_PARAMS_DEFAULTS: dict[str, object] = {
    "n_gpu_layers": 99,
    "n_ctx": 4096,
    "n_batch": 256,
    "rope_freq_base": None,
    "embedding": False,
    "chat_template": None,
    "parallel_override": None,
    "batch_override": None,
    "type_k": "f16",
    "type_v": "f16",
}
NO_EFFECT_KEYS = [
    "preload_delay_sec",
    "keep_warm_models",
    "timeout_warmup_sec",
    "http_max_keepalive",
    "queue_processor_idle_sec",
]


# ---------------------------------------------------------------------------------------------
# helpers


def minimal() -> dict[str, Any]:
    return {"models": {"m": {"model_path": "m.gguf"}}}


def merged(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def at(dotted: str, value: object) -> dict[str, Any]:
    """A patch setting one dotted key (aliases in these tests contain no dots)."""
    patch: Any = value
    for part in reversed(dotted.split(".")):
        patch = {part: patch}
    result: dict[str, Any] = patch
    return result


def write_config(folder: Path, data: object, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def load(folder: Path, data: object, env: Mapping[str, str] | None = None) -> Settings:
    return load_settings(write_config(folder, data), env=env or {})


def problems_of(folder: Path, data: object, env: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(folder, data, env)
    return caught.value.problems


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def llama_server(tmp_path: Path) -> Path:
    return make_executable(tmp_path / "bin" / "llama-server")


@pytest.fixture
def seed_config(tmp_path: Path, llama_server: Path) -> dict[str, Any]:
    """A seed config.json with every key the seed's code reads, each set to a non-default."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    return {
        "api": {"host": "127.0.0.1", "port": 8080, "cors_origins": ["http://localhost:3000"]},
        "system": {
            "enable_idle_timeout": False,
            "idle_timeout_sec": 600,
            "llama_server_path": str(llama_server),
            "base_models_path": str(models_dir),
            "max_concurrent_models": 2,
            "request_timeout_sec": 120,
            "preload_models": ["qwen3-4b-chat"],
            "preload_delay_sec": 10,
            "min_vram_required": 600,
            "vram_multiplier": 1.5,
            "keep_warm_models": 1,
            "gpu_devices": [0],
            "parallel_requests": 2,
            "cpu_threads": 4,
            "use_mmap": False,
            "flash_attention": "off",
            "max_queue_size_per_model": 50,
            "queue_timeout_sec": 60,
            "timeout_warmup_sec": 240,
            "wait_ready_sec": 180,
            "http_max_keepalive": 50,
            "http_max_connections": 100,
            "queue_processor_idle_sec": 60,
            "model_load_max_retries": 3,
        },
        "models": {
            "qwen3-4b-chat": {
                "model_path": "/app/models/Qwen3-4B-Instruct.gguf",
                "params": {
                    "n_gpu_layers": 99,
                    "n_ctx": 4096,
                    "n_batch": 512,
                    "rope_freq_base": 1000000,
                    "embedding": False,
                    "chat_template": "chatml",
                    "parallel_override": 2,
                    "batch_override": 1024,
                    "type_k": "q8_0",
                    "type_v": "q4_0",
                },
            },
            "nomic-embed": {
                "model_path": "nomic-embed-text-v1.5.Q8_0.gguf",
                "params": {"n_gpu_layers": -1, "n_ctx": 2048, "embedding": True, "type_k": None},
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# seed compatibility


def test_full_seed_config_loads_unchanged(tmp_path: Path, seed_config: dict[str, Any]) -> None:
    settings = load(tmp_path, seed_config)

    assert settings.api.model_dump() == {
        **seed_config["api"],
        "max_body_bytes": 8 * 1024 * 1024,
        "tls": None,
    }
    for key, value in seed_config["system"].items():
        got = getattr(settings.system, key)
        assert (str(got) if isinstance(got, Path) else got) == value, key
    assert list(settings.models) == ["qwen3-4b-chat", "nomic-embed"]
    chat = settings.models["qwen3-4b-chat"]
    assert (
        chat.params.model_dump(include=set(SEED_PARAMS_DEFAULTS))
        == (seed_config["models"]["qwen3-4b-chat"]["params"])
    )
    assert chat.resolved_path == Path("/app/models/Qwen3-4B-Instruct.gguf")
    embed = settings.models["nomic-embed"]
    assert embed.is_embedding
    assert embed.params.type_k == "f16"  # the seed read null as the default
    assert embed.resolved_path == tmp_path / "models" / "nomic-embed-text-v1.5.Q8_0.gguf"
    assert len(settings.warnings) == len(NO_EFFECT_KEYS)


def test_seed_readme_example_loads(tmp_path: Path, llama_server: Path) -> None:
    readme_example = {
        "api": {"host": "0.0.0.0", "port": 8000},
        "system": {
            "idle_timeout_sec": 300,
            "llama_server_path": str(llama_server),
            "max_concurrent_models": 2,
            "gpu_devices": [0],
            "flash_attention": "on",
        },
        "models": {
            "qwen3-4b-chat": {
                "model_path": "/app/models/Qwen3-4B-Instruct.gguf",
                "params": {"n_gpu_layers": 99, "n_ctx": 4096},
            }
        },
    }
    settings = load(tmp_path, readme_example)
    assert settings.api.host == "0.0.0.0"
    assert settings.system.llama_server_path == llama_server
    assert settings.warnings == []


@pytest.mark.parametrize(("key", "default"), SEED_SYSTEM_DEFAULTS.items(), ids=str)
def test_system_defaults_follow_the_seed_code(tmp_path: Path, key: str, default: object) -> None:
    assert getattr(load(tmp_path, minimal()).system, key) == default


@pytest.mark.parametrize(("key", "default"), SEED_PARAMS_DEFAULTS.items(), ids=str)
def test_params_defaults_follow_the_seed_code(tmp_path: Path, key: str, default: object) -> None:
    assert getattr(load(tmp_path, minimal()).models["m"].params, key) == default


def test_deliberate_default_changes(tmp_path: Path) -> None:
    settings = load(tmp_path, minimal())
    assert settings.api.host == "127.0.0.1"  # the seed bound 0.0.0.0
    assert settings.api.cors_origins == []  # the seed allowed http://localhost:3000 implicitly
    assert settings.grpc == GrpcConfig(host="127.0.0.1", port=50051, grace_sec=10.0)


@pytest.mark.parametrize(
    ("patch", "attribute", "expected"),
    [
        pytest.param(at("system.idle_timeout_sec", 1), "system.idle_timeout_sec", 1, id="idle-1s"),
        pytest.param(
            at("system.request_timeout_sec", 0.5), "system.request_timeout_sec", 0.5, id="req-0.5s"
        ),
        pytest.param(
            at("system.queue_timeout_sec", 0.1), "system.queue_timeout_sec", 0.1, id="queue-0.1s"
        ),
        pytest.param(at("system.wait_ready_sec", 2), "system.wait_ready_sec", 2, id="ready-2s"),
        pytest.param(
            at("system.preload_delay_sec", 0), "system.preload_delay_sec", 0, id="preload-delay-0"
        ),
        pytest.param(
            at("system.max_queue_size_per_model", 1),
            "system.max_queue_size_per_model",
            1,
            id="queue-size-1",
        ),
        pytest.param(at("system.flash_attention", "auto"), "system.flash_attention", "auto"),
        pytest.param(
            at("models.m.params.rope_freq_base", 10000.5),
            "models.m.params.rope_freq_base",
            10000.5,
            id="rope-float",
        ),
        pytest.param(
            at("models.m.params.type_v", ""), "models.m.params.type_v", "f16", id="type-v-empty"
        ),
        pytest.param(at("system.llama_server_path", ""), "system.llama_server_path", None),
        pytest.param(at("system.base_models_path", ""), "system.base_models_path", None),
        pytest.param(at("api.port", "8001"), "api.port", 8001, id="numeric-string"),
    ],
)
def test_widened_and_lenient_values_are_accepted(
    tmp_path: Path, patch: dict[str, Any], attribute: str, expected: object
) -> None:
    value: Any = load(tmp_path, merged(minimal(), patch))
    for part in attribute.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    assert value == expected


# ---------------------------------------------------------------------------------------------
# validation messages


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        pytest.param("api.port", 80, "api.port: must be >= 1024 (got 80)"),
        pytest.param("api.port", 70000, "api.port: must be <= 65535 (got 70000)"),
        pytest.param("api.max_body_bytes", 10, "api.max_body_bytes: must be >= 1024 (got 10)"),
        pytest.param("api.cors_origins", "*", "api.cors_origins: must be a list (got '*')"),
        pytest.param("grpc.port", -1, "grpc.port: must be >= 0 (got -1)"),
        pytest.param("grpc.grace_sec", 301, "grpc.grace_sec: must be <= 300 (got 301)"),
        pytest.param(
            "system.idle_timeout_sec", 0.5, "system.idle_timeout_sec: must be >= 1 (got 0.5)"
        ),
        pytest.param(
            "system.idle_timeout_sec",
            True,
            "system.idle_timeout_sec: must be a number, not true/false (got True)",
            id="bool-as-number",
        ),
        pytest.param(
            "system.idle_timeout_sec",
            "soon",
            "system.idle_timeout_sec: must be a number (got 'soon')",
            id="string-as-number",
        ),
        pytest.param(
            "system.idle_timeout_sec",
            float("inf"),
            "system.idle_timeout_sec: must be a finite number (got inf)",
            id="infinity",
        ),
        pytest.param(
            "system.max_concurrent_models",
            11,
            "system.max_concurrent_models: must be <= 10 (got 11)",
        ),
        pytest.param(
            "system.request_timeout_sec", 0, "system.request_timeout_sec: must be > 0 (got 0)"
        ),
        pytest.param(
            "system.request_timeout_sec",
            3601,
            "system.request_timeout_sec: must be <= 3600 (got 3601)",
        ),
        pytest.param(
            "system.queue_timeout_sec", 601, "system.queue_timeout_sec: must be <= 600 (got 601)"
        ),
        pytest.param("system.wait_ready_sec", 0, "system.wait_ready_sec: must be > 0 (got 0)"),
        pytest.param(
            "system.timeout_warmup_sec",
            3601,
            "system.timeout_warmup_sec: must be <= 3600 (got 3601)",
        ),
        pytest.param(
            "system.preload_delay_sec", -1, "system.preload_delay_sec: must be >= 0 (got -1)"
        ),
        pytest.param(
            "system.queue_processor_idle_sec",
            0,
            "system.queue_processor_idle_sec: must be > 0 (got 0)",
        ),
        pytest.param(
            "system.min_vram_required", 100, "system.min_vram_required: must be >= 200 (got 100)"
        ),
        pytest.param(
            "system.vram_multiplier", 0.9, "system.vram_multiplier: must be >= 1 (got 0.9)"
        ),
        pytest.param(
            "system.keep_warm_models", -1, "system.keep_warm_models: must be >= 0 (got -1)"
        ),
        pytest.param(
            "system.parallel_requests", 33, "system.parallel_requests: must be <= 32 (got 33)"
        ),
        pytest.param("system.cpu_threads", 0, "system.cpu_threads: must be >= 1 (got 0)"),
        pytest.param(
            "system.max_queue_size_per_model",
            1001,
            "system.max_queue_size_per_model: must be <= 1000 (got 1001)",
        ),
        pytest.param(
            "system.http_max_keepalive", 9, "system.http_max_keepalive: must be >= 10 (got 9)"
        ),
        pytest.param(
            "system.http_max_connections",
            1001,
            "system.http_max_connections: must be <= 1000 (got 1001)",
        ),
        pytest.param(
            "system.model_load_max_retries",
            6,
            "system.model_load_max_retries: must be <= 5 (got 6)",
        ),
        pytest.param(
            "system.flash_attention",
            "yes",
            "system.flash_attention: must be one of 'on', 'off' or 'auto' (got 'yes')",
        ),
        pytest.param("system.gpu_devices", [], "system.gpu_devices: must not be empty (got [])"),
        pytest.param(
            "system.gpu_devices",
            [0, 1, 0],
            "system.gpu_devices: must not list a device twice (got [0, 1, 0])",
        ),
        pytest.param("system.gpu_devices", [0, -1], "system.gpu_devices[1]: must be >= 0 (got -1)"),
        pytest.param(
            "system.preload_models",
            ["*", "m"],
            "system.preload_models: \"*\" (every model) must be the only entry (got ['*', 'm'])",
        ),
        pytest.param(
            "system.failure_threshold", 0, "system.failure_threshold: must be >= 1 (got 0)"
        ),
        pytest.param(
            "system.failure_cooldown_sec", 0, "system.failure_cooldown_sec: must be > 0 (got 0)"
        ),
        pytest.param(
            "system.aging_dispatches", 1001, "system.aging_dispatches: must be <= 1000 (got 1001)"
        ),
        pytest.param(
            "system.probe_interval_sec", 0, "system.probe_interval_sec: must be > 0 (got 0)"
        ),
        pytest.param(
            "system.probe_timeout_sec", -1, "system.probe_timeout_sec: must be > 0 (got -1)"
        ),
        pytest.param(
            "system.probe_failures_to_replace",
            0,
            "system.probe_failures_to_replace: must be >= 1 (got 0)",
        ),
        pytest.param(
            "system.stop_grace_sec", 121, "system.stop_grace_sec: must be <= 120 (got 121)"
        ),
        pytest.param(
            "system.drain_timeout_sec", -1, "system.drain_timeout_sec: must be >= 0 (got -1)"
        ),
        pytest.param(
            "system.max_loads_per_device", 17, "system.max_loads_per_device: must be <= 16 (got 17)"
        ),
        pytest.param("system.swap_batch_limit", 0, "system.swap_batch_limit: must be >= 1 (got 0)"),
        pytest.param("system.heartbeat_sec", 0, "system.heartbeat_sec: must be > 0 (got 0)"),
        pytest.param("system.log_ring_lines", 99, "system.log_ring_lines: must be >= 100 (got 99)"),
        pytest.param(
            "system.memory_budget_mib", 0, "system.memory_budget_mib: must be > 0 (got 0)"
        ),
        pytest.param(
            "system.simulated_gpus", [], "system.simulated_gpus: must not be empty (got [])"
        ),
        pytest.param(
            "system.simulated_gpus",
            [{"total_mib": 0}],
            "system.simulated_gpus[0].total_mib: must be > 0 (got 0)",
        ),
        pytest.param(
            "system.simulated_gpus",
            [{"total_mib": 100, "used_mib": 101}],
            "system.simulated_gpus[0].used_mib: must be <= total_mib (100) (got 101)",
        ),
        pytest.param(
            "models.m.params.n_ctx", 511, "models.m.params.n_ctx: must be >= 512 (got 511)"
        ),
        pytest.param(
            "models.m.params.n_ctx", 131073, "models.m.params.n_ctx: must be <= 131072 (got 131073)"
        ),
        pytest.param(
            "models.m.params.n_batch", 64, "models.m.params.n_batch: must be >= 128 (got 64)"
        ),
        pytest.param(
            "models.m.params.n_batch", 1024, "models.m.params.n_batch: must be <= 512 (got 1024)"
        ),
        pytest.param(
            "models.m.params.n_gpu_layers",
            -2,
            "models.m.params.n_gpu_layers: must be >= -1 (got -2)",
        ),
        pytest.param(
            "models.m.params.rope_freq_base",
            -1,
            "models.m.params.rope_freq_base: must be >= 0 (got -1)",
        ),
        pytest.param(
            "models.m.params.parallel_override",
            33,
            "models.m.params.parallel_override: must be <= 32 (got 33)",
        ),
        pytest.param(
            "models.m.params.batch_override",
            127,
            "models.m.params.batch_override: must be >= 128 (got 127)",
        ),
        pytest.param(
            "models.m.params.type_k",
            "q3_k",
            "models.m.params.type_k: must be one of 'f16', 'f32', 'bf16', 'q8_0', 'q4_0', "
            "'q4_1', 'iq4_nl', 'q5_0' or 'q5_1' (got 'q3_k')",
        ),
        pytest.param(
            "models.m.params.threads", 65, "models.m.params.threads: must be <= 64 (got 65)"
        ),
        pytest.param(
            "models.m.params.ubatch_size",
            8193,
            "models.m.params.ubatch_size: must be <= 8192 (got 8193)",
        ),
        pytest.param(
            "models.m.params.pooling",
            "max",
            "models.m.params.pooling: must be one of 'none', 'mean', 'cls', 'last' or 'rank' "
            "(got 'max')",
        ),
        pytest.param(
            "models.m.params.embedding",
            "maybe",
            "models.m.params.embedding: must be true or false (got 'maybe')",
        ),
        pytest.param(
            "models.m.model_path",
            "m.bin",
            "models.m.model_path: must be a .gguf file (got 'm.bin')",
        ),
        pytest.param("models.m.model_path", "", "models.m.model_path: must not be empty (got '')"),
        pytest.param("models.m.ttl_sec", -1, "models.m.ttl_sec: must be >= 0 (got -1)"),
        pytest.param("models.m.max_tokens_cap", 0, "models.m.max_tokens_cap: must be >= 1 (got 0)"),
        pytest.param("models.m.devices", [], "models.m.devices: must not be empty (got [])"),
        pytest.param(
            "models.m.env",
            {"A=B": "1"},
            "models.m.env: 'A=B' is not a valid environment variable name",
        ),
        pytest.param("models.m.params", [], "models.m.params: must be an object (got [])"),
        pytest.param(
            "telemetry.metrics_port", 70000, "telemetry.metrics_port: must be <= 65535 (got 70000)"
        ),
        pytest.param("system", 5, "system: must be an object (got 5)", id="section-not-object"),
    ],
)
def test_invalid_value_names_key_value_and_rule(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    problems = problems_of(tmp_path, merged(minimal(), at(key, value)))
    assert any(p == message or p.startswith(message) for p in problems), problems


def test_missing_model_path_is_required(tmp_path: Path) -> None:
    assert problems_of(tmp_path, {"models": {"m": {"params": {}}}}) == [
        "models.m.model_path: is required"
    ]


def test_missing_models_is_required(tmp_path: Path) -> None:
    assert problems_of(tmp_path, {"system": {}}) == ["models: is required"]


def test_models_must_not_be_empty(tmp_path: Path) -> None:
    assert problems_of(tmp_path, {"models": {}}) == ["models: must not be empty"]


def test_every_problem_is_reported_one_per_line(tmp_path: Path) -> None:
    data = merged(minimal(), {"api": {"port": 1}, "system": {"cpu_threads": 0, "typo": 1}})
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data)
    assert str(caught.value).splitlines() == caught.value.problems
    assert len(caught.value.problems) == 3
    assert caught.value.path == tmp_path / "config.json"


def test_long_values_are_truncated(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, merged(minimal(), at("api.cors_origins", "x" * 500)))
    shown = problem.split("(got ", 1)[1][:-1]
    assert len(shown) == 80
    assert shown.endswith("...")


# ---------------------------------------------------------------------------------------------
# unknown keys


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        pytest.param({"sytem": {}}, "unknown key 'sytem'; did you mean 'system'?", id="top-hint"),
        pytest.param({"zzz": 1}, "unknown key 'zzz'", id="top-no-hint"),
        pytest.param(at("api.prot", 1), "unknown key 'api.prot'; did you mean 'port'?", id="api"),
        pytest.param(at("grpc.hots", "x"), "unknown key 'grpc.hots'; did you mean 'host'?"),
        pytest.param(
            at("system.idle_timout_sec", 5),
            "unknown key 'system.idle_timout_sec'; did you mean 'idle_timeout_sec'?",
            id="system-hint",
        ),
        pytest.param(at("system.colour", 5), "unknown key 'system.colour'", id="system-no-hint"),
        pytest.param(
            at("models.m.parms", {}),
            "unknown key 'models.m.parms'; did you mean 'params'?",
            id="model",
        ),
        pytest.param(
            at("models.m.params.n_ctxx", 1),
            "unknown key 'models.m.params.n_ctxx'; did you mean 'n_ctx'?",
            id="params-hint",
        ),
        pytest.param(
            at("models.m.params.mmproj", "x"),
            "unknown key 'models.m.params.mmproj'",
            id="params-no-hint",
        ),
        pytest.param(
            {"auth": {"api_keys": [{"key": "k", "scope": ["admin"]}]}},
            "unknown key 'auth.api_keys[0].scope'; did you mean 'scopes'?",
            id="api-key",
        ),
        pytest.param(
            at("telemetry.metric_port", 9000),
            "unknown key 'telemetry.metric_port'; did you mean 'metrics_port'?",
            id="telemetry",
        ),
        pytest.param(
            at("system.simulated_gpus", [{"total": 1}]),
            "unknown key 'system.simulated_gpus[0].total'; did you mean 'total_mib'?",
            id="simulated-gpu",
        ),
    ],
)
def test_unknown_key_is_an_error_with_a_suggestion(
    tmp_path: Path, patch: dict[str, Any], message: str
) -> None:
    assert message in problems_of(tmp_path, merged(minimal(), patch))


# ---------------------------------------------------------------------------------------------
# aliases, extra_args, cross-field rules


@pytest.mark.parametrize(
    "alias", ["a", "7b", "qwen3-4b-chat", "org:model.v1_2", "Status", "A" * 64], ids=str
)
def test_valid_aliases(tmp_path: Path, alias: str) -> None:
    settings = load(tmp_path, {"models": {alias: {"model_path": "m.gguf"}}})
    assert list(settings.models) == [alias]


@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        pytest.param("", "must be 1-64 characters", id="empty"),
        pytest.param("-x", "must be 1-64 characters", id="leading-dash"),
        pytest.param(".x", "must be 1-64 characters", id="leading-dot"),
        pytest.param("org/model", "must be 1-64 characters", id="slash"),
        pytest.param("a b", "must be 1-64 characters", id="space"),
        pytest.param("é", "must be 1-64 characters", id="non-ascii"),
        pytest.param("a" * 65, "must be 1-64 characters", id="too-long"),
        *(pytest.param(name, "is reserved", id=name) for name in ["status", "failed", "eject"]),
        *(pytest.param(name, "is reserved", id=name) for name in ["stream", "file"]),
    ],
)
def test_invalid_aliases(tmp_path: Path, alias: str, reason: str) -> None:
    (problem,) = problems_of(tmp_path, {"models": {alias: {"model_path": "m.gguf"}}})
    assert problem.startswith(f"models: invalid model alias {alias!r}: {reason}")


@pytest.mark.parametrize(
    "args",
    [
        *([flag, "1"] for flag in sorted(ROUTER_CONTROLLED_FLAGS)),
        ["--temp", "0.7", "--port=9000"],
        ["--kv-unified"],
        ["--alias=other"],
    ],
    ids=lambda args: " ".join(args),
)
def test_extra_args_cannot_override_router_flags(tmp_path: Path, args: list[str]) -> None:
    (problem,) = problems_of(tmp_path, merged(minimal(), at("models.m.params.extra_args", args)))
    flag = next(a.split("=")[0] for a in args if a.split("=")[0] in ROUTER_CONTROLLED_FLAGS)
    assert problem.startswith(f"models.m.params.extra_args: {flag!r} is set by the router")


@pytest.mark.parametrize("flag", sorted(CHILD_LINK_FLAGS))
def test_extra_args_cannot_change_how_the_router_reaches_its_child(
    tmp_path: Path, flag: str
) -> None:
    args = ["--temp", "0.7", f"{flag}=/x"]
    (problem,) = problems_of(tmp_path, merged(minimal(), at("models.m.params.extra_args", args)))
    assert problem.startswith(f"models.m.params.extra_args: {flag!r} would change how the router")


def test_extra_args_pass_other_flags(tmp_path: Path) -> None:
    args = ["--temp", "0.7", "--mlock", "--reasoning-format=none", "--portal"]
    settings = load(tmp_path, merged(minimal(), at("models.m.params.extra_args", args)))
    assert settings.models["m"].params.extra_args == args


def test_preload_unknown_alias_suggests_the_closest(tmp_path: Path) -> None:
    data = {
        "system": {"preload_models": ["qwen-chat", "qwen3-4b-chta", "zzz"]},
        "models": {
            "qwen-chat": {"model_path": "a.gguf"},
            "qwen3-4b-chat": {"model_path": "b.gguf"},
        },
    }
    assert problems_of(tmp_path, data) == [
        "system.preload_models[1]: unknown model alias 'qwen3-4b-chta'; "
        "did you mean 'qwen3-4b-chat'?",
        "system.preload_models[2]: unknown model alias 'zzz'",
    ]


@pytest.mark.parametrize(
    ("preload", "expected"),
    [
        pytest.param([], [], id="none"),
        pytest.param(["*"], ["b", "a"], id="star-keeps-config-order"),
        pytest.param(["a", "a", "b"], ["a", "b"], id="duplicates"),
    ],
)
def test_preload_aliases(tmp_path: Path, preload: list[str], expected: list[str]) -> None:
    data = {
        "system": {"preload_models": preload},
        "models": {"b": {"model_path": "b.gguf"}, "a": {"model_path": "a.gguf"}},
    }
    assert load(tmp_path, data).preload_aliases() == expected


def test_model_devices_must_be_configured_gpus(tmp_path: Path) -> None:
    data = merged(
        minimal(), {"system": {"gpu_devices": [0, 1]}, "models": {"m": {"devices": [1, 2, 3]}}}
    )
    assert problems_of(tmp_path, data) == [
        "models.m.devices: devices [2, 3] are not in system.gpu_devices (got [1, 2, 3])"
    ]


def test_gpu_devices_index_simulated_gpus(tmp_path: Path) -> None:
    gpus = [{"total_mib": 8192}, {"name": "B", "total_mib": 4096, "used_mib": 512}]
    ok = load(
        tmp_path, merged(minimal(), {"system": {"gpu_devices": [1, 0], "simulated_gpus": gpus}})
    )
    assert ok.system.simulated_gpus is not None
    assert [g.name for g in ok.system.simulated_gpus] == ["Simulated GPU", "B"]

    bad = merged(minimal(), {"system": {"gpu_devices": [0, 2], "simulated_gpus": gpus}})
    assert problems_of(tmp_path, bad) == [
        "system.gpu_devices[1]: no such simulated GPU (simulated_gpus has 2) (got 2)"
    ]


def test_pinned_model_rejects_an_idle_ttl(tmp_path: Path) -> None:
    data = merged(minimal(), {"models": {"m": {"pinned": True, "ttl_sec": 60}}})
    assert problems_of(tmp_path, data) == [
        "models.m.ttl_sec: a pinned model is never unloaded when idle (got 60.0)"
    ]


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        pytest.param(
            {"grpc": {"port": 8000}},
            "api.port: already used by grpc.port (got 8000)",
            id="api-grpc",
        ),
        pytest.param(
            {"telemetry": {"metrics_port": 50051}},
            "telemetry.metrics_port: already used by grpc.port (got 50051)",
            id="metrics-grpc",
        ),
    ],
)
def test_listeners_need_distinct_ports(tmp_path: Path, ports: dict[str, Any], message: str) -> None:
    assert problems_of(tmp_path, merged(minimal(), ports)) == [message]


def test_ephemeral_ports_never_collide(tmp_path: Path) -> None:
    data = merged(minimal(), {"grpc": {"port": 0}, "telemetry": {"metrics_port": 0}})
    assert load(tmp_path, data).grpc.port == 0


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        pytest.param("missing", "no such file: {tmp}/missing", id="missing"),
        pytest.param(".", "not a file: {tmp}", id="directory"),
        pytest.param("plain-file", "not executable: {tmp}/plain-file", id="not-executable"),
    ],
)
def test_llama_server_path_must_be_an_executable_file(
    tmp_path: Path, value: str, rule: str
) -> None:
    (tmp_path / "plain-file").write_text("")
    data = merged(minimal(), at("system.llama_server_path", value))
    assert problems_of(tmp_path, data) == [
        f"system.llama_server_path: {rule.format(tmp=tmp_path)} (got {value!r})"
    ]


def test_relative_llama_server_path_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    server = make_executable(tmp_path / "conf" / "bin" / "llama-server")
    data = merged(minimal(), at("system.llama_server_path", "bin/llama-server"))
    assert load(tmp_path / "conf", data).system.llama_server_path == server


def test_base_models_path_must_be_a_directory(tmp_path: Path) -> None:
    data = merged(minimal(), at("system.base_models_path", "nowhere"))
    assert problems_of(tmp_path, data) == [
        f"system.base_models_path: not an existing directory: {tmp_path / 'nowhere'} "
        "(got 'nowhere')"
    ]


# ---------------------------------------------------------------------------------------------
# model paths


@pytest.mark.parametrize(
    ("model_path", "base_models_path", "expected"),
    [
        pytest.param("m.gguf", None, "conf/m.gguf", id="config-folder"),
        pytest.param("sub/m.gguf", None, "conf/sub/m.gguf", id="config-subfolder"),
        pytest.param("../shared/m.gguf", None, "shared/m.gguf", id="normalised"),
        pytest.param("m.gguf", "{tmp}/store", "store/m.gguf", id="base-models-path"),
        pytest.param("m.gguf", "../store", "store/m.gguf", id="relative-base-models-path"),
        pytest.param("/abs/m.GGUF", "{tmp}/store", "/abs/m.GGUF", id="absolute"),
    ],
)
def test_relative_model_path_resolution(
    tmp_path: Path, model_path: str, base_models_path: str | None, expected: str
) -> None:
    (tmp_path / "store").mkdir()
    system = {"base_models_path": base_models_path.format(tmp=tmp_path)} if base_models_path else {}
    data = {"system": system, "models": {"m": {"model_path": model_path}}}
    settings = load(tmp_path / "conf", data)
    assert settings.models["m"].resolved_path == tmp_path / expected
    assert settings.models["m"].model_path == model_path  # as written, for messages and status
    assert not settings.models["m"].resolved_path.exists()  # a missing file is not a config error


def test_base_models_path_env_rebases_models(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    settings = load(tmp_path / "conf", minimal(), env={"BASE_MODELS_PATH": str(store)})
    assert settings.system.base_models_path == store
    assert settings.models["m"].resolved_path == store / "m.gguf"


# ---------------------------------------------------------------------------------------------
# environment


def test_llama_server_path_env_overrides_the_file(tmp_path: Path, llama_server: Path) -> None:
    other = make_executable(tmp_path / "other" / "llama-server")
    data = merged(minimal(), at("system.llama_server_path", str(llama_server)))
    assert load(tmp_path, data, {"LLAMA_SERVER_PATH": str(other)}).system.llama_server_path == other
    assert load(tmp_path, data, {"LLAMA_SERVER_PATH": ""}).system.llama_server_path == llama_server


def test_relative_env_paths_are_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_executable(tmp_path / "cwd" / "llama-server")
    monkeypatch.chdir(tmp_path / "cwd")
    settings = load(tmp_path / "conf", minimal(), {"LLAMA_SERVER_PATH": "llama-server"})
    assert settings.system.llama_server_path == server


def test_bad_env_path_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    (problem,) = problems_of(tmp_path, minimal(), {"LLAMA_SERVER_PATH": str(missing)})
    assert problem.startswith(
        f"system.llama_server_path (from LLAMA_SERVER_PATH): no such file: {missing} (got "
    )


@pytest.mark.parametrize(
    ("in_file", "env_value", "expected"),
    [
        pytest.param(None, None, False, id="default"),
        pytest.param(True, None, True, id="file"),
        pytest.param(None, "true", True, id="env-true"),
        pytest.param(None, "TRUE", True, id="env-upper"),
        pytest.param(True, "false", False, id="env-false-wins"),
        pytest.param(True, "", True, id="env-empty-is-unset"),
    ],
)
def test_structured_logs_env(
    tmp_path: Path, in_file: bool | None, env_value: str | None, expected: bool
) -> None:
    data = (
        minimal()
        if in_file is None
        else merged(minimal(), at("telemetry.structured_logs", in_file))
    )
    env = {} if env_value is None else {"STRUCTURED_LOGS": env_value}
    assert load(tmp_path, data, env).telemetry.structured_logs is expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, False, id="unset"),
        pytest.param({"DEBUG": "true"}, True, id="true"),
        pytest.param({"DEBUG": "1"}, True, id="one"),
        pytest.param({"DEBUG": "no"}, False, id="no"),
    ],
)
def test_debug_env(tmp_path: Path, env: dict[str, str], expected: bool) -> None:
    assert load(tmp_path, minimal(), env).debug is expected


# ---------------------------------------------------------------------------------------------
# selection


@pytest.fixture
def three_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A config for -c, one for CONFIG_PATH and ./config.json, each with its own alias."""
    monkeypatch.chdir(tmp_path)
    return {
        name: write_config(tmp_path / folder, {"models": {name: {"model_path": "m.gguf"}}})
        for name, folder in [("flag", "a"), ("env", "b"), ("cwd", ".")]
    }


def test_selection_flag_wins(three_configs: dict[str, Path]) -> None:
    env = {"CONFIG_PATH": str(three_configs["env"])}
    settings = load_settings(three_configs["flag"], env=env)
    assert list(settings.models) == ["flag"]
    assert settings.config_path == three_configs["flag"]
    assert settings.base_dir == three_configs["flag"].parent


def test_selection_config_path_env_beats_cwd(three_configs: dict[str, Path]) -> None:
    settings = load_settings(env={"CONFIG_PATH": "b/config.json"})
    assert list(settings.models) == ["env"]
    assert settings.config_path == three_configs["env"]


def test_selection_cwd_config_json(three_configs: dict[str, Path]) -> None:
    settings = load_settings(env={"CONFIG_PATH": ""})
    assert list(settings.models) == ["cwd"]
    assert settings.config_path == three_configs["cwd"]


def test_selection_falls_back_to_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    demo = types.ModuleType("router.embedded.demo")
    demo.default_demo_dir = lambda: tmp_path / "demo"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "router.embedded.demo", demo)
    settings = load_settings(env={})
    assert settings.config_path is None
    assert settings.base_dir == tmp_path
    assert settings.models["tiny-chat"].resolved_path == tmp_path / "demo" / "tiny-chat.gguf"


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"^config file not found: {missing}$"):
        load_settings(missing, env={})
    with pytest.raises(ConfigError, match=r"\(from CONFIG_PATH\)$"):
        load_settings(env={"CONFIG_PATH": str(missing)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('{"models": {', "invalid JSON at line 1, column 13", id="truncated"),
        pytest.param('{\n  "api": {"port": 8000,}\n}', "invalid JSON at line 2, column 24"),
        pytest.param('{"api": {}, "api": {}}', "key 'api' appears twice in the same object"),
        pytest.param("[1, 2]", "the configuration must be a JSON object", id="not-object"),
    ],
)
def test_unparsable_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert message in str(caught.value)
    assert caught.value.path == path


def test_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(minimal()), encoding="utf-8-sig")
    assert list(load_settings(path, env={}).models) == ["m"]


@pytest.mark.parametrize("depth", [100_000, sys.getrecursionlimit() + 10])
def test_json_nested_beyond_the_parser_is_a_config_error_naming_the_file(
    tmp_path: Path, depth: int
) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"models": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.problems == [f"{path}: invalid JSON: nested too deeply"]
    assert caught.value.path == path


NUL_RULE = "must not contain a NUL byte (\\u0000)"


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        pytest.param(at("models.m.env", {"A": "x\0y"}), "models.m.env.A", id="env-value"),
        pytest.param(
            at("models.m.params.extra_args", ["--ok", "a\0b"]),
            "models.m.params.extra_args[1]",
            id="extra_args",
        ),
        pytest.param(
            at("models.m.params.chat_template", "a\0b"),
            "models.m.params.chat_template",
            id="chat_template",
        ),
        pytest.param(at("system.state_dir", "state\0dir"), "system.state_dir", id="state_dir"),
        pytest.param(at("models.m.model_path", "a\0.gguf"), "models.m.model_path", id="model_path"),
        pytest.param(
            at("system.llama_server_path", "/bin/sh\0"),
            "system.llama_server_path",
            id="llama_server_path",
        ),
        pytest.param(
            {"auth": {"api_keys": [{"key": "secret\0value"}]}},
            "auth.api_keys[0].key",
            id="api-key",
        ),
    ],
)
def test_nul_bytes_in_strings_are_refused_naming_the_key(
    tmp_path: Path, patch: dict[str, Any], key: str
) -> None:
    problems = problems_of(tmp_path, merged(minimal(), patch))
    assert problems == [f"{key}: {NUL_RULE}"]
    assert "secret" not in problems[0]  # values are not echoed: one may be an API key


def test_nul_bytes_in_keys_are_refused_and_every_one_is_listed(tmp_path: Path) -> None:
    data = merged(minimal(), {"models": {"m": {"env": {"A\0": "x", "B": "\0"}}}})
    assert problems_of(tmp_path, data) == [
        f"models.m.env: key 'A\\x00' {NUL_RULE}",
        f"models.m.env.B: {NUL_RULE}",
    ]


# ---------------------------------------------------------------------------------------------
# API keys


def test_env_reference_key(tmp_path: Path) -> None:
    data = merged(minimal(), {"auth": {"api_keys": [{"key": "${env.ROUTER_KEY}"}]}})
    (api_key,) = load(tmp_path, data, {"ROUTER_KEY": "s3cret-value"}).auth.api_keys
    assert api_key.key == "s3cret-value"
    assert api_key.scopes == ["inference"]


@pytest.mark.parametrize("env", [{}, {"ROUTER_KEY": ""}], ids=["unset", "empty"])
def test_env_reference_key_must_be_set(tmp_path: Path, env: dict[str, str]) -> None:
    data = merged(minimal(), {"auth": {"api_keys": [{"key": "${env.ROUTER_KEY}"}]}})
    assert problems_of(tmp_path, data, env) == [
        "auth.api_keys[0].key: environment variable ROUTER_KEY is not set"
    ]


def test_key_file_relative_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "conf" / "secrets").mkdir(parents=True)
    (tmp_path / "conf" / "secrets" / "admin.key").write_text("  file-secret\n")
    data = merged(minimal(), {"auth": {"api_keys": [{"key_file": "secrets/admin.key"}]}})
    (api_key,) = load(tmp_path / "conf", data).auth.api_keys
    assert api_key.key == "file-secret"
    assert api_key.key_file == tmp_path / "conf" / "secrets" / "admin.key"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param({}, "auth.api_keys[0]: set exactly one of 'key' and 'key_file'", id="none"),
        pytest.param(
            {"key": "hunter2-secret", "key_file": "k"},
            "auth.api_keys[0]: set exactly one of 'key' and 'key_file'",
            id="both",
        ),
        pytest.param({"key": ""}, "auth.api_keys[0].key: must not be empty", id="empty"),
        pytest.param(
            {"key": "hunter2-secret", "scopes": ["root"]},
            "auth.api_keys[0].scopes[0]: must be one of 'inference', 'monitor' or 'admin'",
            id="scope",
        ),
        pytest.param(
            {"key": "hunter2-secret", "scopes": []},
            "auth.api_keys[0].scopes: must not be empty",
            id="no-scopes",
        ),
        pytest.param(
            {"key": "hunter2-secret", "models": ["m", "mm"]},
            "auth.api_keys[0].models[1]: unknown model alias 'mm'; did you mean 'm'?",
            id="model",
        ),
        pytest.param(
            {"key_file": "missing.key"},
            "auth.api_keys[0].key_file: cannot read {tmp}/missing.key: No such file or directory",
            id="key-file-missing",
        ),
    ],
)
def test_api_key_errors_never_show_the_key(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    problems = problems_of(tmp_path, merged(minimal(), {"auth": {"api_keys": [entry]}}))
    assert problems == [message.format(tmp=tmp_path)]
    assert "hunter2" not in "\n".join(problems)


def test_duplicate_keys_are_rejected_without_showing_them(tmp_path: Path) -> None:
    keys = [{"key": "hunter2-secret"}, {"key": "other"}, {"key": "hunter2-secret"}]
    problems = problems_of(tmp_path, merged(minimal(), {"auth": {"api_keys": keys}}))
    assert problems == ["auth.api_keys[2]: same key as auth.api_keys[0]"]


def test_key_is_not_in_repr(tmp_path: Path) -> None:
    data = merged(minimal(), {"auth": {"api_keys": [{"key": "hunter2-secret", "name": "ci"}]}})
    settings = load(tmp_path, data)
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.auth.api_keys[0])
    assert "hunter2" not in settings.model_dump_json()
    assert "name='ci'" in repr(settings.auth.api_keys[0])


def test_api_key_in_code_needs_no_context(tmp_path: Path) -> None:
    assert ApiKey(key="k", scopes=["admin"], allow_high_priority=True).scopes == ["admin"]
    (tmp_path / "k").write_text("from-file\n")
    assert ApiKey.model_validate({"key_file": tmp_path / "k"}).key == "from-file"


# ---------------------------------------------------------------------------------------------
# warnings and listen safety


@pytest.mark.parametrize("key", NO_EFFECT_KEYS)
def test_no_effect_key_warns_only_when_set(tmp_path: Path, key: str) -> None:
    default = SEED_SYSTEM_DEFAULTS[key]
    (warning,) = load(tmp_path, merged(minimal(), at(f"system.{key}", default))).warnings
    assert warning.startswith(f"system.{key} is accepted for seed compatibility but has no effect")
    assert load(tmp_path, minimal()).warnings == []


@pytest.mark.parametrize(
    "key",
    sorted(set(SEED_SYSTEM_DEFAULTS) - set(NO_EFFECT_KEYS) - {"llama_server_path"}),
)
def test_honoured_seed_key_does_not_warn(tmp_path: Path, key: str) -> None:
    default = SEED_SYSTEM_DEFAULTS[key]
    assert load(tmp_path, merged(minimal(), at(f"system.{key}", default))).warnings == []


@pytest.mark.parametrize(
    ("grpc_host", "api_host", "keys", "allow", "exposed"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", False, False, [], id="loopback"),
        pytest.param("localhost", "::1", False, False, [], id="localhost-v6"),
        pytest.param("127.0.0.2", "[::1]", False, False, [], id="loopback-range"),
        pytest.param("0.0.0.0", "127.0.0.1", False, False, ["grpc.host"], id="grpc-open"),
        pytest.param("127.0.0.1", "::", False, False, ["api.host"], id="api-open"),
        pytest.param("10.0.0.5", "myhost", False, False, ["grpc.host", "api.host"], id="both"),
        pytest.param("0.0.0.0", "0.0.0.0", True, False, [], id="with-keys"),
        pytest.param("0.0.0.0", "0.0.0.0", False, True, [], id="insecure-listen"),
    ],
)
def test_listen_safety(
    tmp_path: Path, grpc_host: str, api_host: str, keys: bool, allow: bool, exposed: list[str]
) -> None:
    patch: dict[str, Any] = {"grpc": {"host": grpc_host}, "api": {"host": api_host}}
    if keys:
        patch["auth"] = {"api_keys": [{"key": "k"}]}
    settings = load(tmp_path, merged(minimal(), patch))
    if not exposed:
        # True: an exposed listener goes ahead only because of --insecure-listen (warn).
        assert settings.check_listen_safety(allow_insecure=allow) is (allow and not keys)
        return
    with pytest.raises(ConfigError) as caught:
        settings.check_listen_safety(allow_insecure=allow)
    assert [p.split(" ", 1)[0] for p in caught.value.problems] == exposed
    for problem in caught.value.problems:
        assert "auth.api_keys" in problem
        assert "--insecure-listen" in problem


# ---------------------------------------------------------------------------------------------
# helpers the router calls


@pytest.mark.parametrize(
    ("model", "system", "expected"),
    [
        pytest.param({}, {}, 300, id="seed-idle-timeout"),
        pytest.param({}, {"enable_idle_timeout": False}, None, id="idle-disabled"),
        pytest.param({"ttl_sec": 60}, {"enable_idle_timeout": False}, 60, id="own-ttl-wins"),
        pytest.param({"ttl_sec": 0}, {}, None, id="zero-is-never"),
        pytest.param({"pinned": True}, {}, None, id="pinned"),
        pytest.param({"ttl_sec": 0.5}, {"idle_timeout_sec": 10}, 0.5, id="fraction"),
    ],
)
def test_effective_ttl(
    model: dict[str, Any], system: dict[str, Any], expected: float | None
) -> None:
    config = ModelConfig(model_path="m.gguf", **model)
    assert config.effective_ttl(SystemConfig(**system)) == expected


@pytest.mark.parametrize(
    ("params", "parallel_requests", "expected"),
    [
        pytest.param({}, 4, 4, id="system"),
        pytest.param({"parallel_override": 2}, 4, 2, id="override"),
    ],
)
def test_slots(params: dict[str, Any], parallel_requests: int, expected: int) -> None:
    config = ModelConfig.model_validate({"model_path": "m.gguf", "params": params})
    assert config.slots(SystemConfig(parallel_requests=parallel_requests)) == expected


@pytest.mark.parametrize(
    ("state_dir", "env", "grpc", "expected"),
    [
        pytest.param(
            None,
            {"XDG_STATE_HOME": "/xdg"},
            GrpcConfig(),
            "/xdg/routermodel/127.0.0.1_50051",
            id="xdg",
        ),
        pytest.param(
            None,
            {"XDG_STATE_HOME": "relative"},
            GrpcConfig(host="::1", port=6000),
            "{home}/.local/state/routermodel/::1_6000",
            id="relative-xdg-ignored",
        ),
        pytest.param(None, {}, GrpcConfig(), "{home}/.local/state/routermodel/127.0.0.1_50051"),
        pytest.param(
            None,
            {"XDG_STATE_HOME": "/xdg"},
            GrpcConfig(port=0),
            "/xdg/routermodel/127.0.0.1_0-{pid}",
        ),
        pytest.param("state", {"XDG_STATE_HOME": "/xdg"}, GrpcConfig(), "{conf}/state", id="set"),
    ],
)
def test_resolved_state_dir(
    tmp_path: Path, state_dir: str | None, env: dict[str, str], grpc: GrpcConfig, expected: str
) -> None:
    data = merged(minimal(), at("system.state_dir", state_dir)) if state_dir else minimal()
    system = load(tmp_path, data).system
    want = expected.format(home=Path.home(), conf=tmp_path, pid=os.getpid())
    assert system.resolved_state_dir(grpc, env) == Path(want)


def test_model_status_path_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    data = merged(minimal(), at("telemetry.model_status_path", "logs/model_status.json"))
    status_path = load(tmp_path / "conf", data).telemetry.model_status_path
    assert status_path == tmp_path / "conf" / "logs" / "model_status.json"


def test_models_are_bound_per_settings(tmp_path: Path) -> None:
    shared = ModelConfig(model_path="m.gguf")
    (tmp_path / "store").mkdir()
    system = SystemConfig(base_models_path=tmp_path / "store")
    settings = Settings(models={"m": shared}, system=system)
    assert settings.models["m"].resolved_path == tmp_path / "store" / "m.gguf"
    assert shared.resolved_path == Path.cwd() / "m.gguf"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load(tmp_path, minimal())
    with pytest.raises(ValueError, match="frozen"):
        settings.system.cpu_threads = 2  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# demo, example and docs


def test_demo_settings(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path, env={})
    assert settings.config_path is None
    assert settings.system.llama_server_path is None  # the embedded server
    chat, embed = settings.models["tiny-chat"], settings.models["tiny-embed"]
    assert chat.resolved_path == tmp_path / "tiny-chat.gguf"
    assert (chat.params.n_ctx, chat.params.parallel_override, chat.params.threads) == (4096, 4, 1)
    assert not chat.is_embedding
    assert embed.resolved_path == tmp_path / "tiny-embed.gguf"
    assert embed.is_embedding
    assert (embed.params.n_ctx, embed.slots(settings.system), embed.params.ubatch_size) == (
        2048,
        2,
        2048,
    )
    assert settings.warnings == []
    settings.check_listen_safety(allow_insecure=False)


def test_demo_honours_env(tmp_path: Path, llama_server: Path) -> None:
    settings = demo_settings(tmp_path, env={"LLAMA_SERVER_PATH": str(llama_server), "DEBUG": "1"})
    assert settings.system.llama_server_path == llama_server
    assert settings.debug


def test_example_config_loads_without_warnings() -> None:
    env = {"ROUTERMODEL_API_KEY": "a", "ROUTERMODEL_ADMIN_KEY": "b"}
    settings = load_settings(REPO_ROOT / "config.example.json", env=env)
    assert settings.warnings == []
    for model in settings.models.values():
        assert not Path(model.model_path).is_absolute()
        assert model.resolved_path.is_relative_to(REPO_ROOT)
    settings.check_listen_safety(allow_insecure=False)


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every JSON key path of the schema, written the way the docs table writes them."""
    paths: list[str] = []
    for name, info in model.model_fields.items():
        path = prefix + name
        paths.append(path)
        annotation: Any = info.annotation
        present = [a for a in get_args(annotation) if a is not type(None)]
        if type(None) in get_args(annotation) and len(present) == 1:
            annotation = present[0]
        if get_origin(annotation) is dict:
            child, joiner = get_args(annotation)[1], ".<alias>."
        elif get_origin(annotation) is list:
            child, joiner = get_args(annotation)[0], "[]."
        else:
            child, joiner = annotation, "."
        if isinstance(child, type) and issubclass(child, BaseModel):
            paths += _key_paths(child, path + joiner)
    return paths


def test_readme_table_covers_every_key() -> None:
    table = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [path for path in _key_paths(Settings) if f"`{path}`" not in table]
    assert missing == []


def test_an_empty_state_dir_is_unset(tmp_path: Path) -> None:
    """Not the config folder: the router empties its state directory's keys/ at start."""
    system = load(tmp_path, merged(minimal(), at("system.state_dir", ""))).system
    assert system.state_dir is None
