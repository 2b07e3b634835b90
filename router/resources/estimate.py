"""Estimate a model's device memory from its GGUF header and launch settings.

weights  = bytes of the tensors that live on the device: every ``blk.N.*``
           tensor with N < offloaded layers, plus the output head when all
           layers are offloaded (llama.cpp keeps the input embeddings on the host).
           A model with tied embeddings (no ``output.weight``) uses ``token_embd``
           as its output head: offloaded, llama.cpp puts a second copy of it on the
           device. In CPU mode every tensor counts, once.
kv cache = cells × layers × (n_embd_k_gqa × size(type_k) + n_embd_v_gqa × size(type_v));
           with --kv-unified the context is shared by all slots, not multiplied. Layers
           with sliding-window attention (gemma2/3, cohere2) only keep
           window × slots + ubatch cells, as llama.cpp allocates them.
overhead = output logits and compute buffers, plus a fixed runtime share.

Reading the header is blocking I/O (the tensor data is not read): call
``read_gguf`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MIB = 1024 * 1024

# Bytes per element of the KV cache types llama-server accepts.
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}

_BLOCK = re.compile(r"^blk\.(\d+)\.")
# Every n-th layer attends globally, the others through the sliding window
# (llama.cpp hard-codes these per architecture; the GGUF only has the window).
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4}
_KV_PAD = 256
# What a GPU runtime (CUDA context, cuBLAS workspace) takes before any model.
GPU_RUNTIME_MIB = 256
HOST_RUNTIME_MIB = 16


@dataclass(frozen=True, slots=True)
class GgufFacts:
    architecture: str
    block_count: int
    head_count: int
    head_count_kv: int
    embedding_length: int
    feed_forward_length: int
    context_length: int
    vocab_size: int
    key_length: int
    value_length: int
    sliding_window: int  # 0 when every layer attends to the whole context
    block_tensor_bytes: tuple[int, ...]  # per layer
    output_bytes: int  # output head (output.weight, output_norm)
    other_bytes: int  # token embeddings and anything else outside the blocks
    tensor_types: tuple[str, ...]
    tied_output_bytes: int = 0  # token_embd when it doubles as the output head, else 0


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    weights_mib: int
    kv_cache_mib: int
    overhead_mib: int
    total_mib: int


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf(path: Path) -> GgufFacts:
    """Read the facts the estimate needs from ``path``'s header (blocking)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    arch = str(_field(reader, "general.architecture") or "llama")

    def number(name: str, default: int = 0) -> int:
        value = _field(reader, f"{arch}.{name}")
        if isinstance(value, list):  # per-layer arrays (some architectures): take the max
            value = max(value) if value else default
        return int(value) if value is not None else default

    blocks = number("block_count")
    heads = number("attention.head_count", 1)
    embd = number("embedding_length")
    per_block = [0] * blocks
    output = other = token_embd = 0
    has_output_weight = False
    types: set[str] = set()
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        types.add(tensor.tensor_type.name)
        if tensor.name == "token_embd.weight":
            token_embd = size
        has_output_weight = has_output_weight or tensor.name == "output.weight"
        match = _BLOCK.match(tensor.name)
        if match and int(match.group(1)) < blocks:
            per_block[int(match.group(1))] += size
        elif tensor.name.startswith("output"):
            output += size
        else:
            other += size
    tokens = _field(reader, "tokenizer.ggml.tokens")
    head_dim = embd // heads if heads else 0
    return GgufFacts(
        architecture=arch,
        block_count=blocks,
        head_count=heads,
        head_count_kv=number("attention.head_count_kv", heads),
        embedding_length=embd,
        feed_forward_length=number("feed_forward_length"),
        context_length=number("context_length"),
        vocab_size=number("vocab_size") or (len(tokens) if isinstance(tokens, list) else 0),
        key_length=number("attention.key_length", head_dim),
        value_length=number("attention.value_length", head_dim),
        sliding_window=number("attention.sliding_window") if arch in SWA_PATTERNS else 0,
        block_tensor_bytes=tuple(per_block),
        output_bytes=output,
        other_bytes=other,
        tensor_types=tuple(sorted(types)),
        tied_output_bytes=0 if has_output_weight else token_embd,
    )


def estimate_memory(
    facts: GgufFacts,
    *,
    n_ctx: int,
    n_gpu_layers: int,
    type_k: str,
    type_v: str,
    ubatch: int,
    slots: int,
    on_gpu: bool,
) -> MemoryEstimate:
    """The estimate for one launch (pure). ``n_gpu_layers`` −1 means all layers."""
    blocks = facts.block_count
    layers = blocks if not on_gpu or n_gpu_layers < 0 else min(n_gpu_layers, blocks)
    weights = sum(facts.block_tensor_bytes[:layers])
    if not on_gpu:
        weights += facts.output_bytes + facts.other_bytes
    elif n_gpu_layers < 0 or n_gpu_layers > blocks:
        weights += facts.output_bytes + facts.tied_output_bytes
    per_cell_layer = (
        facts.head_count_kv * facts.key_length * CACHE_TYPE_BYTES[type_k]
        + facts.head_count_kv * facts.value_length * CACHE_TYPE_BYTES[type_v]
    )
    pattern = SWA_PATTERNS.get(facts.architecture, 0)
    swa_cells = n_ctx
    if facts.sliding_window and pattern:
        swa_cells = min(n_ctx, _pad(facts.sliding_window * slots + ubatch, _KV_PAD))
    cells = sum(
        swa_cells if facts.sliding_window and pattern and i % pattern < pattern - 1 else n_ctx
        for i in range(layers)
    )
    kv = cells * per_cell_layer
    # Logits are kept for one token per sequence; the compute graph holds the
    # activations of one micro-batch through the widest layer (about twice, for
    # inputs and outputs). Measured on gemma3-270m: 2 MiB output + 28 MiB compute.
    output = facts.vocab_size * slots * 4
    compute = 2 * ubatch * 4 * (facts.feed_forward_length + 4 * facts.embedding_length)
    runtime = GPU_RUNTIME_MIB if on_gpu else HOST_RUNTIME_MIB
    weights_mib = _ceil_mib(weights)
    kv_mib = _ceil_mib(kv)
    overhead_mib = _ceil_mib(output + compute) + runtime
    return MemoryEstimate(weights_mib, kv_mib, overhead_mib, weights_mib + kv_mib + overhead_mib)


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _ceil_mib(size: float) -> int:
    return int(-(-size // _MIB))
