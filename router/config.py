"""Settings model: the seed's ``config.json`` schema, unchanged, plus RouterModel's own keys.

Schema (every level rejects unknown keys; every model is frozen)::

    api        the facade's HTTP listener: seed keys + max_body_bytes
    grpc       the router's gRPC listener (ours)
    system     every seed key, seed defaults, ranges only ever widened + router behaviour (ours)
    models     <alias> -> model_path, params (llama-server flags), ttl_sec, pinned, devices, ...
    auth       API keys with scopes (ours)
    telemetry  metrics, tracing, structured logs, status file (ours)

``load_settings`` picks the file (``-c`` > ``CONFIG_PATH`` > ``./config.json`` > the built-in demo),
applies the seed's environment overrides and turns every validation failure into one
``ConfigError`` naming each key path, the offending value and the rule. Relative paths in a file
are relative to that file's folder. Seed keys that are accepted but have no effect here produce
``Settings.warnings`` when the file sets them.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "CACHE_TYPES",
    "RESERVED_ALIASES",
    "ROUTER_CONTROLLED_FLAGS",
    "CHILD_LINK_FLAGS",
    "CacheType",
    "FlashAttention",
    "Pooling",
    "Scope",
    "ApiConfig",
    "ApiKey",
    "AuthConfig",
    "ConfigError",
    "GrpcConfig",
    "ModelConfig",
    "ModelParams",
    "Settings",
    "SimulatedGpu",
    "SystemConfig",
    "TelemetryConfig",
    "demo_settings",
    "load_settings",
]

_KIB: Final = 1024
_MIB: Final = 1024 * 1024

CacheType = Literal["f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
CACHE_TYPES: Final[tuple[str, ...]] = get_args(CacheType)
Scope = Literal["inference", "monitor", "admin"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]
FlashAttention = Literal["on", "off", "auto"]

# Management routes live under /v1/models/<name>; an alias equal to one would shadow them.
RESERVED_ALIASES: Final = frozenset({"status", "failed", "stream", "file", "eject"})
_ALIAS_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

# Flags the router sets itself on every child: overriding them would break routing (port, host),
# slot accounting (parallel, unified KV), the per-child key, the alias clients see, or which file
# is served (model and its download sources).
ROUTER_CONTROLLED_FLAGS: Final = frozenset(
    {
        "--port",
        "--host",
        "-np",
        "--parallel",
        "--api-key",
        "--api-key-file",
        "-a",
        "--alias",
        "-m",
        "--model",
        "-mu",
        "--model-url",
        "-hf",
        "-hfr",
        "--hf-repo",
        "-kvu",
        "--kv-unified",
        "-no-kvu",
        "--no-kv-unified",
    }
)

# llama-server flags that would change how the router reaches its child (plain HTTP to
# 127.0.0.1:<port>/v1/..., no path prefix): in extra_args they would fail every load of the model.
CHILD_LINK_FLAGS: Final = frozenset({"--api-prefix", "--ssl-key-file", "--ssl-cert-file"})

# Seed keys kept only so seed files load; each explicit use is reported in Settings.warnings.
_NO_EFFECT_SYSTEM_KEYS: Final[Mapping[str, str]] = {
    "preload_delay_sec": "preloads run in the background and loads are paced by the scheduler",
    "keep_warm_models": "use models.<alias>.pinned or models.<alias>.ttl_sec to keep models loaded",
    "timeout_warmup_sec": "system.wait_ready_sec bounds every load, preloads included",
    "http_max_keepalive": "upstream connections are pooled per child and capped by "
    "system.http_max_connections",
    "queue_processor_idle_sec": "queues have no per-model processor task to stop",
}

_ENV_REF_RE: Final = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
_VALUE_REPR_MAX: Final = 80


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one human-readable line per fault.

    ``str()`` lists the problems one per line. ``path`` is the file at fault, when there is one.
    """

    def __init__(self, problems: Sequence[str], *, path: Path | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------------------------
# Validation plumbing


@dataclass(frozen=True)
class _LoadContext:
    """What validators need beyond the JSON: where relative paths start and the environment."""

    base_dir: Path
    env: Mapping[str, str]
    config_path: Path | None = None
    debug: bool = False
    # Key path -> the environment variable that supplied its value, for error messages.
    env_sources: Mapping[tuple[str, ...], str] = field(default_factory=dict)


def _context(info: ValidationInfo) -> _LoadContext:
    # Models built directly in code (tests, the demo) have no context: the cwd and the real
    # environment stand in for the config folder.
    if isinstance(info.context, _LoadContext):
        return info.context
    return _LoadContext(base_dir=Path.cwd(), env=os.environ)


_NO_VALUE: Final = object()


@dataclass(frozen=True)
class _Problem:
    """A fault found by a cross-field check; ``loc`` is relative to the model that found it."""

    loc: tuple[str | int, ...]
    rule: str
    value: object = _NO_VALUE


def _raise_problems(problems: Sequence[_Problem]) -> None:
    # One custom error carries them all, so each keeps its own key path in the ConfigError.
    if problems:
        raise PydanticCustomError(
            "config_problems",
            "{summary}",
            {"summary": "; ".join(p.rule for p in problems), "problems": tuple(problems)},
        )


def _reject_bool(value: object) -> object:
    # pydantic's lax mode reads JSON true/false as 1/0; a boolean in a number field is a mistake.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "must be a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_reject_bool)]
Float = Annotated[float, BeforeValidator(_reject_bool)]


def _distinct(devices: list[int]) -> list[int]:
    if len(set(devices)) != len(devices):
        raise ValueError("must not list a device twice")
    return devices


DeviceList = Annotated[list[Annotated[Int, Field(ge=0)]], AfterValidator(_distinct)]


def _absolute(path: Path, base: Path) -> Path:
    """``path`` made absolute against ``base`` and normalised (symlinks are left alone)."""
    return Path(os.path.normpath(base / path.expanduser()))


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _env_flag(env: Mapping[str, str], name: str) -> bool | None:
    """A seed boolean env var: unset or empty -> None, a true word -> True, anything else False."""
    value = env.get(name, "").strip().lower()
    if not value:
        return None
    return value in _TRUE_WORDS


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Sections


class TlsFiles(_ConfigModel):
    """PEM files for a TLS listener, and for the clients connecting to it.

    ``cert_file``/``key_file`` serve the listener. ``client_ca_file`` makes the
    listener require client certificates signed by that CA (mTLS). Clients (the
    facade) verify the server with ``ca_file`` (default: ``cert_file`` itself, for a
    self-signed certificate) and present ``client_cert_file``/``client_key_file``
    when the listener asks for one. Paths are relative to the config file's folder.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @field_validator(
        "cert_file", "key_file", "client_ca_file", "ca_file", "client_cert_file", "client_key_file"
    )
    @classmethod
    def _readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _absolute(value, _context(info).base_dir)
        if not path.is_file():
            raise ValueError(f"must be a readable file ({path} is not)")
        return path

    @model_validator(mode="after")
    def _client_pair(self) -> TlsFiles:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("set both client_cert_file and client_key_file, or neither")
        return self


class ApiConfig(_ConfigModel):
    """The facade's HTTP listener (seed section ``api``).

    The seed bound 0.0.0.0 and allowed ``http://localhost:3000`` by default; both are opt-in here.
    """

    host: str = Field("127.0.0.1", min_length=1)
    port: Int = Field(8000, ge=1024, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: Int = Field(8 * _MIB, ge=_KIB, le=256 * _MIB)
    tls: TlsFiles | None = None  # HTTPS for the facade (client_* keys unused here)

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC request a body within ``max_body_bytes`` becomes. Protobuf takes
        at most 5/4 of the JSON's bytes: an embeddings input of one-token arrays spends 5
        bytes (framing and varint) on each 4-byte ``[0],``; text, bigger ids and longer
        arrays take less than their JSON. Plus room for the request's other fields."""
        return self.max_body_bytes * 5 // 4 + 64 * _KIB


class GrpcConfig(_ConfigModel):
    """The router's gRPC listener; the facade finds the router here too."""

    host: str = Field("127.0.0.1", min_length=1)
    port: Int = Field(50051, ge=0, le=65535)  # 0 = an ephemeral port chosen by the OS
    grace_sec: Float = Field(10.0, ge=0, le=300)  # in-flight RPC drain on graceful stop
    tls: TlsFiles | None = None  # TLS (or mTLS) for the router's port and the facade's channel


class SimulatedGpu(_ConfigModel):
    """One GPU of a simulated inventory, used instead of NVML (tests, demos)."""

    name: str = "Simulated GPU"
    total_mib: Int = Field(gt=0)
    used_mib: Int = Field(0, ge=0)

    @model_validator(mode="after")
    def _used_fits(self) -> SimulatedGpu:
        if self.used_mib > self.total_mib:
            _raise_problems(
                [_Problem(("used_mib",), f"must be <= total_mib ({self.total_mib})", self.used_mib)]
            )
        return self


class SystemConfig(_ConfigModel):
    """Seed section ``system`` (every seed key, the seed code's defaults) plus router behaviour.

    Ranges differ from the seed only by widening, so every valid seed value stays valid: times
    are floats with lower minimums, and ``gpu_devices``/``flash_attention`` are now validated.
    """

    # --- seed keys ---
    enable_idle_timeout: bool = True
    idle_timeout_sec: Float = Field(300.0, ge=1, le=86400)
    llama_server_path: Path | None = None  # None = the embedded server, python -m router.embedded
    base_models_path: Path | None = None
    max_concurrent_models: Int = Field(3, ge=1, le=10)
    request_timeout_sec: Float = Field(300.0, gt=0, le=3600)
    preload_models: list[str] = Field(default_factory=list)
    preload_delay_sec: Float = Field(5.0, ge=0, le=120)
    min_vram_required: Int = Field(500, ge=200, le=750)
    vram_multiplier: Float = Field(1.1, ge=1.0, le=3.0)
    keep_warm_models: Int = Field(2, ge=0)
    gpu_devices: DeviceList = Field(default_factory=lambda: [0], min_length=1)
    parallel_requests: Int = Field(4, ge=1, le=32)
    cpu_threads: Int = Field(8, ge=1, le=64)
    use_mmap: bool = True
    flash_attention: FlashAttention = "on"
    max_queue_size_per_model: Int = Field(100, ge=1, le=1000)
    queue_timeout_sec: Float = Field(300.0, gt=0, le=600)
    timeout_warmup_sec: Float = Field(180.0, gt=0, le=3600)
    wait_ready_sec: Float = Field(120.0, gt=0, le=3600)
    http_max_keepalive: Int = Field(100, ge=10, le=500)
    http_max_connections: Int = Field(200, ge=20, le=1000)
    queue_processor_idle_sec: Float = Field(120.0, gt=0, le=600)
    model_load_max_retries: Int = Field(2, ge=0, le=5)
    # --- ours ---
    state_dir: Path | None = None
    failure_threshold: Int = Field(3, ge=1, le=100)
    failure_cooldown_sec: Float = Field(30.0, gt=0, le=86400)
    stable_after_sec: Float = Field(60.0, gt=0, le=86400)
    aging_dispatches: Int = Field(8, ge=1, le=1000)
    probe_interval_sec: Float = Field(10.0, gt=0)
    probe_timeout_sec: Float = Field(2.0, gt=0)
    probe_failures_to_replace: Int = Field(3, ge=1)
    stop_grace_sec: Float = Field(5.0, ge=0, le=120)
    drain_timeout_sec: Float = Field(30.0, ge=0)
    max_loads_per_device: Int = Field(1, ge=1, le=16)
    swap_batch_limit: Int = Field(16, ge=1, le=1000)
    heartbeat_sec: Float = Field(15.0, gt=0)
    log_ring_lines: Int = Field(2000, ge=100, le=100000)
    memory_budget_mib: Int | None = Field(None, gt=0)
    simulated_gpus: list[SimulatedGpu] | None = Field(None, min_length=1)
    max_embedding_inputs: Int = Field(2048, ge=1, le=100_000)
    stream_pacing_ms: Float = Field(4.0, ge=0, le=25)  # per stream in flight; 0 = no pacing
    max_messages: Int = Field(4096, ge=1, le=100_000)
    spare_launcher: bool = True  # keep one embedded launcher started ahead of the next load

    @field_validator("llama_server_path", "base_models_path", "state_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # The seed wrote "" for "not set"; the env vars do the same. (A state_dir of "" was
        # the config folder, whose keys/ the router empties at start.)
        return None if value == "" else value

    @field_validator("llama_server_path")
    @classmethod
    def _executable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _absolute(value, _context(info).base_dir)
        if not path.exists():
            raise ValueError(f"no such file: {path}")
        if not path.is_file():
            raise ValueError(f"not a file: {path}")
        if not os.access(path, os.X_OK):
            raise ValueError(f"not executable: {path}")
        return path

    @field_validator("base_models_path")
    @classmethod
    def _directory(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _absolute(value, _context(info).base_dir)
        if not path.is_dir():
            raise ValueError(f"not an existing directory: {path}")
        return path

    @field_validator("state_dir")
    @classmethod
    def _anchor(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _absolute(value, _context(info).base_dir)

    @field_validator("preload_models")
    @classmethod
    def _star_alone(cls, value: list[str]) -> list[str]:
        if "*" in value and value != ["*"]:
            raise ValueError('"*" (every model) must be the only entry')
        return value

    @model_validator(mode="after")
    def _devices_exist(self) -> SystemConfig:
        if self.simulated_gpus is not None:
            count = len(self.simulated_gpus)
            _raise_problems(
                [
                    _Problem(
                        ("gpu_devices", i),
                        f"no such simulated GPU (simulated_gpus has {count})",
                        device,
                    )
                    for i, device in enumerate(self.gpu_devices)
                    if device >= count
                ]
            )
        return self

    def resolved_state_dir(self, grpc: GrpcConfig, env: Mapping[str, str] | None = None) -> Path:
        """Where this router instance records its children.

        ``state_dir`` when set; otherwise ``${XDG_STATE_HOME:-~/.local/state}/routermodel/
        <grpc host>_<grpc port>``, one folder per listening address so a restarted router only
        cleans up its own leftovers. With an ephemeral gRPC port (0) the address does not
        identify the instance, so the folder is per process (``<host>_0-<pid>``).
        """
        if self.state_dir is not None:
            return self.state_dir
        environ = os.environ if env is None else env
        # The XDG spec says a relative XDG_STATE_HOME is invalid and must be ignored.
        xdg = environ.get("XDG_STATE_HOME", "")
        root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
        instance = f"{grpc.host}_{grpc.port}"
        if grpc.port == 0:
            instance += f"-{os.getpid()}"
        return root / "routermodel" / instance


class ModelParams(_ConfigModel):
    """``models.<alias>.params``: llama-server flags (seed keys, the seed code's ranges) + ours."""

    n_gpu_layers: Int = Field(99, ge=-1)  # -1 = all layers, 0 = CPU only
    n_ctx: Int = Field(4096, ge=512, le=131072)
    n_batch: Int = Field(256, ge=128, le=512)
    rope_freq_base: Float | None = Field(None, ge=0)
    embedding: bool = False
    chat_template: str | None = None
    parallel_override: Int | None = Field(None, ge=1, le=32)
    batch_override: Int | None = Field(None, ge=128, le=4096)
    type_k: CacheType = "f16"
    type_v: CacheType = "f16"
    # --- ours ---
    threads: Int | None = Field(None, ge=1, le=64)
    ubatch_size: Int | None = Field(None, ge=1, le=8192)
    pooling: Pooling | None = None
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("type_k", "type_v", mode="before")
    @classmethod
    def _default_cache_type(cls, value: object) -> object:
        # The seed read null and "" as the default.
        return "f16" if value is None or value == "" else value

    @field_validator("extra_args")
    @classmethod
    def _no_router_flags(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = arg.split("=", 1)[0] if arg.startswith("-") else arg
            if flag in ROUTER_CONTROLLED_FLAGS:
                raise ValueError(f"{flag!r} is set by the router and cannot be overridden")
            if flag in CHILD_LINK_FLAGS:
                raise ValueError(
                    f"{flag!r} would change how the router reaches its llama-server "
                    "(plain HTTP on 127.0.0.1, no path prefix)"
                )
        return value


class ModelConfig(_ConfigModel):
    """``models.<alias>``: one servable model.

    ``resolved_path`` is ``model_path`` made absolute: joined to ``system.base_models_path`` when
    set, else to the config file's folder. The file need not exist at load time: a bad file
    fails that model alone when it is loaded, never the router.
    """

    # Each Settings binds resolved_path on its own copy, never on an instance shared with another.
    model_config = ConfigDict(revalidate_instances="always")

    model_path: str = Field(min_length=1)
    params: ModelParams = Field(default_factory=ModelParams)
    # --- ours ---
    ttl_sec: Float | None = Field(None, ge=0)
    pinned: bool = False
    devices: DeviceList | None = Field(None, min_length=1)
    max_tokens_cap: Int | None = Field(None, ge=1)
    memory_mib: Int | None = Field(None, gt=0)  # declared device memory; replaces the estimate
    env: dict[str, str] = Field(default_factory=dict)

    _resolved_path: Path = PrivateAttr(default_factory=Path)

    @field_validator("model_path")
    @classmethod
    def _gguf(cls, value: str) -> str:
        if not value.lower().endswith(".gguf"):
            raise ValueError("must be a .gguf file")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> ModelConfig:
        if self.pinned and self.ttl_sec:
            _raise_problems(
                [_Problem(("ttl_sec",), "a pinned model is never unloaded when idle", self.ttl_sec)]
            )
        self._bind(_context(info).base_dir)
        return self

    def _bind(self, base: Path) -> None:
        self._resolved_path = _absolute(Path(self.model_path), base)

    @property
    def resolved_path(self) -> Path:
        """The absolute, normalised model file path."""
        return self._resolved_path

    @property
    def is_embedding(self) -> bool:
        return self.params.embedding

    def slots(self, system: SystemConfig) -> int:
        """Concurrent requests (llama-server ``--parallel``) this model serves."""
        return self.params.parallel_override or system.parallel_requests

    def effective_ttl(self, system: SystemConfig) -> float | None:
        """Idle seconds before an unload; None = never unloaded for idleness.

        A pinned model never is; ``ttl_sec`` 0 means never; unset follows the seed's
        ``enable_idle_timeout``/``idle_timeout_sec``.
        """
        if self.pinned or self.ttl_sec == 0:
            return None
        if self.ttl_sec is not None:
            return self.ttl_sec
        return system.idle_timeout_sec if system.enable_idle_timeout else None


def _check_alias(alias: str) -> str:
    if not _ALIAS_RE.fullmatch(alias):
        raise PydanticCustomError(
            "alias",
            "must be 1-64 characters: a letter or digit, then letters, digits, "
            "'.', '_', ':' or '-'",
        )
    if alias in RESERVED_ALIASES:
        raise PydanticCustomError(
            "alias", "is reserved: it collides with a management route under /v1/models/"
        )
    return alias


Alias = Annotated[str, AfterValidator(_check_alias)]


def _default_scopes() -> list[Scope]:
    return ["inference"]


class ApiKey(_ConfigModel):
    """One client key. Its value never appears in errors or ``repr``.

    Exactly one of ``key`` (``${env.NAME}`` reads that variable) and ``key_file`` (relative to
    the config folder; surrounding whitespace stripped) is given; either way ``key`` holds the
    secret after loading.
    """

    key: str = Field(min_length=1, repr=False, exclude=True)  # never in repr or dumps
    key_file: Path | None = None
    scopes: list[Scope] = Field(default_factory=_default_scopes, min_length=1)
    models: list[str] | None = None  # None = every model
    allow_high_priority: bool = False
    name: str | None = None
    requests_per_minute: Int | None = Field(None, ge=1)  # token bucket; None = unlimited
    tokens_per_minute: Int | None = Field(None, ge=1)  # prompt + completion tokens

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        ctx = _context(info)
        key, key_file = data.get("key"), data.get("key_file")
        if (key is None) == (key_file is None):
            _raise_problems([_Problem((), "set exactly one of 'key' and 'key_file'")])
        if isinstance(key, str) and (ref := _ENV_REF_RE.fullmatch(key)):
            value = ctx.env.get(ref[1], "")
            if not value:
                _raise_problems([_Problem(("key",), f"environment variable {ref[1]} is not set")])
            return {**data, "key": value}
        if isinstance(key_file, (str, os.PathLike)):
            path = _absolute(Path(key_file), ctx.base_dir)
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                _raise_problems([_Problem(("key_file",), f"cannot read {path}: {reason}")])
            if not secret:
                _raise_problems([_Problem(("key_file",), f"{path} is empty")])
            return {**data, "key": secret, "key_file": path}
        return data


class AuthConfig(_ConfigModel):
    """Client API keys. With none, every caller is anonymous (loopback listeners only)."""

    api_keys: list[ApiKey] = Field(default_factory=list)


class TelemetryConfig(_ConfigModel):
    """Metrics, tracing and logs."""

    metrics_port: Int | None = Field(None, ge=0, le=65535)  # router /metrics on grpc.host
    metrics_open: bool = True  # False: /metrics needs a key with the "monitor" scope
    otlp_endpoint: str | None = Field(None, min_length=1)
    structured_logs: bool = False
    model_status_path: Path | None = None  # None = no model_status.json

    @field_validator("model_status_path")
    @classmethod
    def _anchor(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _absolute(value, _context(info).base_dir)


class Settings(_ConfigModel):
    """The whole configuration, validated.

    Usage::

        settings = load_settings(args.config)
        if settings.check_listen_safety(allow_insecure=args.insecure_listen):
            log.warning("listening on a non-loopback address with no API keys")
        for line in settings.warnings:
            log.warning(line)

    Besides the JSON sections it carries ``config_path`` (None for the built-in demo),
    ``base_dir`` (the config file's folder, else the cwd), ``debug`` (the ``DEBUG`` env var: log
    level only) and ``warnings`` (seed keys set in the file that have no effect here).
    """

    api: ApiConfig = Field(default_factory=ApiConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    models: dict[Alias, ModelConfig] = Field(min_length=1)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    _config_path: Path | None = PrivateAttr(default=None)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _debug: bool = PrivateAttr(default=False)
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Settings:
        ctx = _context(info)
        self._config_path, self._base_dir, self._debug = ctx.config_path, ctx.base_dir, ctx.debug
        model_base = self.system.base_models_path or ctx.base_dir
        for model in self.models.values():
            model._bind(model_base)
        _raise_problems(self._alias_problems() + self._key_problems() + self._port_problems())
        self._warnings = tuple(
            f"system.{key} is accepted for seed compatibility but has no effect: {reason}"
            for key, reason in _NO_EFFECT_SYSTEM_KEYS.items()
            if key in self.system.model_fields_set
        )
        return self

    def _alias_problems(self) -> list[_Problem]:
        """References to models and devices that are not configured."""
        aliases = list(self.models)
        problems: list[_Problem] = []
        if self.system.preload_models != ["*"]:
            problems += [
                _Problem(("system", "preload_models", i), _unknown_alias(alias, aliases))
                for i, alias in enumerate(self.system.preload_models)
                if alias not in self.models
            ]
        for i, api_key in enumerate(self.auth.api_keys):
            problems += [
                _Problem(("auth", "api_keys", i, "models", j), _unknown_alias(alias, aliases))
                for j, alias in enumerate(api_key.models or ())
                if alias not in self.models
            ]
        for alias, model in self.models.items():
            outside = sorted(set(model.devices or ()) - set(self.system.gpu_devices))
            if outside:
                rule = f"devices {outside} are not in system.gpu_devices"
                problems.append(_Problem(("models", alias, "devices"), rule, model.devices))
        return problems

    def _key_problems(self) -> list[_Problem]:
        """Two entries with one secret would make the key's scopes ambiguous."""
        first_use: dict[str, int] = {}
        problems: list[_Problem] = []
        for i, api_key in enumerate(self.auth.api_keys):
            first = first_use.setdefault(api_key.key, i)
            if first != i:
                rule = f"same key as auth.api_keys[{first}]"
                problems.append(_Problem(("auth", "api_keys", i), rule))
        return problems

    def _port_problems(self) -> list[_Problem]:
        """Listeners of one deployment must not share a port (0 = ephemeral never collides)."""
        owners: dict[int, str] = {}
        problems: list[_Problem] = []
        listeners: list[tuple[tuple[str, str], int | None]] = [
            (("grpc", "port"), self.grpc.port),
            (("api", "port"), self.api.port),
            (("telemetry", "metrics_port"), self.telemetry.metrics_port),
        ]
        for loc, port in listeners:
            if not port:
                continue
            if port in owners:
                problems.append(_Problem(loc, f"already used by {owners[port]}", port))
            else:
                owners[port] = _dotted(loc)
        return problems

    @property
    def config_path(self) -> Path | None:
        """The file these settings came from; None for the built-in demo."""
        return self._config_path

    @property
    def base_dir(self) -> Path:
        """The folder relative paths were resolved against."""
        return self._base_dir

    @property
    def debug(self) -> bool:
        """``DEBUG=true``: verbose logs only; clients never get more detail."""
        return self._debug

    @property
    def warnings(self) -> list[str]:
        """One line per seed key set in the file that has no effect here."""
        return list(self._warnings)

    def preload_aliases(self) -> list[str]:
        """``system.preload_models`` with ``"*"`` expanded, in configuration order, deduplicated."""
        if self.system.preload_models == ["*"]:
            return list(self.models)
        return list(dict.fromkeys(self.system.preload_models))

    def check_listen_safety(self, allow_insecure: bool) -> bool:
        """Refuse a non-loopback listener when no API key is configured, unless allowed.

        Returns True when such a listener goes ahead only because of ``allow_insecure``: the
        caller logs a warning then.
        """
        if self.auth.api_keys:
            return False
        exposed = [
            f"{name} {host!r} is not a loopback address and auth.api_keys is empty: anyone who "
            "can reach it could use and manage every model. Add a key under auth.api_keys "
            '(for example {"key": "${env.ROUTERMODEL_API_KEY}", "scopes": ["inference"]}) or '
            "pass --insecure-listen to accept unauthenticated access."
            for name, host in (("grpc.host", self.grpc.host), ("api.host", self.api.host))
            if not _is_loopback(host)
        ]
        if exposed and not allow_insecure:
            raise ConfigError(exposed, path=self._config_path)
        return bool(exposed)


def _unknown_alias(alias: str, aliases: Sequence[str]) -> str:
    return f"unknown model alias {alias!r}{_did_you_mean(alias, aliases)}"


# ---------------------------------------------------------------------------------------------
# Error reporting


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_REPR_MAX else text[: _VALUE_REPR_MAX - 3] + "..."


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class that validates the object at ``loc`` (for unknown-key suggestions)."""
    annotation: Any = Settings
    for part in loc:
        annotation = _strip_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field_info = annotation.model_fields.get(str(part))
            if field_info is None:
                return None
            annotation = field_info.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        else:
            return None
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = get_args(annotation)
    present = [a for a in args if a is not type(None)]
    return present[0] if type(None) in args and len(present) == 1 else annotation


_TYPE_RULES: Final[Mapping[str, str]] = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "path_type": "must be a path string",
    "missing": "is required",
}


_BOUNDS: Final[Mapping[str, tuple[str, str]]] = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _rule(error: Mapping[str, Any]) -> str:
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx", {})
    if kind in _BOUNDS:
        symbol, name = _BOUNDS[kind]
        bound = ctx[name]
        # Float fields report their bounds as floats; 1 reads better than 1.0.
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {symbol} {bound}"
    if kind in {"too_short", "string_too_short"}:
        minimum = ctx["min_length"]
        return "must not be empty" if minimum == 1 else f"must have at least {minimum} items"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "value_error":
        return str(ctx["error"])
    return _TYPE_RULES.get(kind, str(error["msg"]))


def _describe(loc: tuple[str | int, ...], rule: str, value: object, ctx: _LoadContext) -> str:
    path = _dotted(loc)
    if source := ctx.env_sources.get(tuple(str(p) for p in loc)):
        path += f" (from {source})"
    text = f"{path}: {rule}"
    # Values under auth may be keys; whole sections would only restate the file.
    if value is not _NO_VALUE and loc[:1] != ("auth",) and not isinstance(value, dict):
        text += f" (got {_short_repr(value)})"
    return text


def _problems_from(exc: ValidationError, ctx: _LoadContext) -> list[str]:
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "config_problems":
            problems += [
                _describe(loc + p.loc, p.rule, p.value, ctx) for p in error["ctx"]["problems"]
            ]
        elif kind == "extra_forbidden":
            key = str(loc[-1])
            model = _model_at(loc[:-1])
            hint = _did_you_mean(key, list(model.model_fields)) if model else ""
            problems.append(f"unknown key {_dotted(loc)!r}{hint}")
        elif loc[-1:] == ("[key]",):
            # A dict key failed: for ``models`` that is the alias itself.
            alias_loc = loc[:-2]
            problems.append(
                _describe(
                    alias_loc, f"invalid model alias {loc[-2]!r}: {error['msg']}", _NO_VALUE, ctx
                )
            )
        elif kind == "missing":
            problems.append(_describe(loc, _rule(error), _NO_VALUE, ctx))
        else:
            problems.append(_describe(loc, _rule(error), error["input"], ctx))
    return problems


# ---------------------------------------------------------------------------------------------
# Loading


def load_settings(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate the configuration.

    The file is ``path`` (``-c/--config``), else ``$CONFIG_PATH``, else ``./config.json`` when it
    exists; with none of them, the built-in demo (``demo_settings``). ``env`` stands in for
    ``os.environ`` (tests). Raises ``ConfigError`` listing every problem found.
    """
    environ = os.environ if env is None else env
    chosen = _choose_file(path, environ)
    if chosen is None:
        # Imported here: the demo module pulls in the GGUF writer, which a config file never needs.
        from router.embedded.demo import default_demo_dir

        return demo_settings(default_demo_dir(), env=environ)
    return _validate(_read_json(chosen), config_path=chosen, env=environ)


def demo_settings(models_dir: Path, *, env: Mapping[str, str] | None = None) -> Settings:
    """The built-in demo: the embedded server and two tiny models in ``models_dir``.

    ``tiny-embed`` sets ``batch_override`` to its ``ubatch_size`` because llama.cpp caps the
    physical batch at the logical one, and a batched embedding input must fit one ubatch.
    """
    raw: dict[str, Any] = {
        "models": {
            "tiny-chat": {
                "model_path": str(models_dir / "tiny-chat.gguf"),
                "params": {"n_ctx": 4096, "parallel_override": 4, "threads": 1},
            },
            "tiny-embed": {
                "model_path": str(models_dir / "tiny-embed.gguf"),
                "params": {
                    "embedding": True,
                    "n_ctx": 2048,
                    "parallel_override": 2,
                    "ubatch_size": 2048,
                    "batch_override": 2048,
                    "threads": 1,
                },
            },
        }
    }
    return _validate(raw, config_path=None, env=os.environ if env is None else env)


def _choose_file(path: Path | None, env: Mapping[str, str]) -> Path | None:
    cwd = Path.cwd()
    if path is not None:
        return _absolute(path, cwd)
    if from_env := env.get("CONFIG_PATH", ""):
        chosen = _absolute(Path(from_env), cwd)
        if not chosen.exists():
            raise ConfigError([f"config file not found: {chosen} (from CONFIG_PATH)"], path=chosen)
        return chosen
    local = cwd / "config.json"
    return local if local.exists() else None


class _DuplicateKeyError(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; that silently drops half of a typo'd edit.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"], path=path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror}"], path=path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason})"], path=path) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"],
            path=path,
        ) from None
    except _DuplicateKeyError as exc:
        raise ConfigError(
            [f"{path}: key {exc.args[0]!r} appears twice in the same object"], path=path
        ) from None
    except RecursionError:
        # json's C decoder recurses per array/object level and stops at the interpreter's limit
        # (about 1000 levels); a config needs a handful.
        raise ConfigError([f"{path}: invalid JSON: nested too deeply"], path=path) from None


def _nul_problems(raw: dict[str, Any]) -> list[str]:
    """One problem per string (value or key) of the file that contains a NUL byte.

    Such strings validate as strings, then fail far from the config: the OS refuses them in
    argv, environment variables and paths (``ValueError: embedded null byte``), so an ``env``
    value or ``extra_args`` item broke every spawn of that model and a ``state_dir`` crashed
    the router at start. Checked for every key, so a new string setting is covered too.
    Iterative, not recursive: the file may be nested deeply.
    """
    problems: list[str] = []
    stack: list[tuple[tuple[str | int, ...], object]] = [((), raw)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            if "\0" in value:  # the value itself is not shown: it may be an API key
                problems.append(f"{_dotted(loc)}: must not contain a NUL byte (\\u0000)")
            continue
        items: list[tuple[str | int, object]]
        if isinstance(value, dict):
            items = list(value.items())
            where = _dotted(loc) or "the top level"
            problems += [
                f"{where}: key {key!r} must not contain a NUL byte (\\u0000)"
                for key in value
                if "\0" in key  # JSON object keys are always strings
            ]
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            continue
        stack.extend((loc + (key,), item) for key, item in reversed(items))  # file order
    return problems


def _validate(raw: object, *, config_path: Path | None, env: Mapping[str, str]) -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError(["the configuration must be a JSON object"], path=config_path)
    # Before validation: validators that touch the filesystem would report a NUL path as a
    # missing file, which hides the real mistake.
    if problems := _nul_problems(raw):
        raise ConfigError(problems, path=config_path)
    raw, sources = _with_env_overrides(raw, env)
    ctx = _LoadContext(
        base_dir=config_path.parent if config_path else Path.cwd(),
        env=env,
        config_path=config_path,
        debug=_env_flag(env, "DEBUG") is True,
        env_sources=sources,
    )
    try:
        return Settings.model_validate(raw, context=ctx)
    except ValidationError as exc:
        # ``from None``: the pydantic error repeats raw inputs, API keys included.
        raise ConfigError(_problems_from(exc, ctx), path=config_path) from None


def _with_env_overrides(
    raw: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Apply the seed's env vars, which win over the file; an empty value counts as unset."""
    raw = dict(raw)
    sources: dict[tuple[str, ...], str] = {}

    def put(section: str, key: str, value: object, var: str) -> None:
        current = raw.get(section, {})
        if isinstance(current, dict):  # anything else is reported by validation
            raw[section] = {**current, key: value}
            sources[(section, key)] = var

    for var, key in (
        ("LLAMA_SERVER_PATH", "llama_server_path"),
        ("BASE_MODELS_PATH", "base_models_path"),
    ):
        if value := env.get(var, ""):
            # Relative to where the shell is, not to the config file.
            put("system", key, str(_absolute(Path(value), Path.cwd())), var)
    structured = _env_flag(env, "STRUCTURED_LOGS")
    if structured is not None:
        put("telemetry", "structured_logs", structured, "STRUCTURED_LOGS")
    return raw, sources


INSECURE_LISTEN_WARNING: Final = (
    "--insecure-listen: serving a non-loopback address with no API keys; anyone who can reach "
    "it can use and manage every model"
)


def settings_from_argv(
    prog: str, description: str | None, argv: Sequence[str] | None = None
) -> tuple[Settings, bool]:
    """The command line both processes take (``-c/--config``, ``--insecure-listen``), loaded.

    Exits with the configuration errors (never a traceback). Also returns whether a listener
    goes ahead only because of ``--insecure-listen``: log ``INSECURE_LISTEN_WARNING`` then.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument(
        "-c", "--config", type=Path, help="config.json (else CONFIG_PATH, ./config.json, demo)"
    )
    parser.add_argument(
        "--insecure-listen",
        action="store_true",
        help="allow a non-loopback address with no API keys configured",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        return settings, settings.check_listen_safety(args.insecure_listen)
    except ConfigError as error:
        sys.exit(f"{prog}: configuration error:\n{error}")
