"""Build the llama-server argv for one model: a pure function, no shell.

The same argv serves the real ``llama-server`` binary and the embedded launcher
(``python -m router.embedded``), which accepts llama-server's flag names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_SERVER: tuple[str, ...] = (sys.executable, "-m", "router.embedded")
# The embedded server's one argument for a spare: its flags come later, on stdin.
FLAGS_FROM_STDIN = "--flags-from-stdin"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything about a child's command line that comes from configuration."""

    alias: str
    model_path: Path
    server: tuple[str, ...] = EMBEDDED_SERVER
    n_ctx: int = 4096
    slots: int = 4
    n_gpu_layers: int = 99
    n_batch: int = 256
    ubatch_size: int | None = None
    threads: int = 8
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attention: str = "on"
    use_mmap: bool = True
    embedding: bool = False
    pooling: str | None = None
    rope_freq_base: float | None = None
    chat_template: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def multimodal(self) -> bool:
        """Whether the child takes image and audio input: ``extra_args`` give it a projector."""
        flags = {arg.split("=", 1)[0] for arg in self.extra_args}
        return bool(flags & _PROJECTOR_FLAGS) and "--no-mmproj" not in flags

    @property
    def micro_batch(self) -> int:
        """Tokens llama-server computes at once (its default 512, capped by the batch): the
        longest input an embedding model takes."""
        return min(self.ubatch_size or 512, self.n_batch)


# llama-server's flags for a multimodal projector (file or URL); without one it refuses image and
# audio input.
_PROJECTOR_FLAGS = frozenset({"--mmproj", "-mm", "--mmproj-url", "-mmu"})


def build_command(spec: LaunchSpec, *, port: int, api_key_file: Path) -> list[str]:
    """Return the argv that starts ``spec`` on 127.0.0.1:``port``.

    The router owns port, host, slots, alias and key: ``extra_args`` come last but
    config validation has already refused any that would override those. The key
    goes through a 0600 file, never argv, which every local user can read.
    """
    argv: list[str] = [
        *spec.server,
        "--model", str(spec.model_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--alias", spec.alias,
        "--api-key-file", str(api_key_file),
        "--ctx-size", str(spec.n_ctx),
        "--parallel", str(spec.slots),
        # One request may use the whole context, as a single-slot server would.
        "--kv-unified",
        "--n-gpu-layers", str(spec.n_gpu_layers),
        "--batch-size", str(spec.n_batch),
        "--threads", str(spec.threads),
        "--cache-type-k", spec.type_k,
        "--cache-type-v", spec.type_v,
        "--flash-attn", spec.flash_attention,
    ]  # fmt: skip
    if spec.ubatch_size is not None:
        argv += ["--ubatch-size", str(spec.ubatch_size)]
    if not spec.use_mmap:
        argv.append("--no-mmap")
    if spec.embedding:
        argv.append("--embedding")
    if spec.pooling is not None:
        argv += ["--pooling", spec.pooling]
    if spec.rope_freq_base is not None:
        argv += ["--rope-freq-base", _number(spec.rope_freq_base)]
    if spec.chat_template is not None:
        argv += ["--chat-template", spec.chat_template]
    argv += spec.extra_args
    return argv


def with_death_signal(argv: Sequence[str], setpriv: str | None) -> list[str]:
    """Wrap argv so the child is SIGKILLed when the router dies (PR_SET_PDEATHSIG).

    ``setpriv`` sets the flag in the child itself and then execs, which is safe in
    a threaded parent where ``preexec_fn`` is not.
    """
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
