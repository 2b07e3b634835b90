"""The tiny GGUF writer: deterministic bytes, a header llama.cpp can read, and the demo cache."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import pytest

from router.embedded import demo
from router.embedded.tiny_gguf import (
    CONTROL_TOKENS,
    EOS_ID,
    RECIPE_KEY,
    WORDS,
    read_recipe,
    recipe_for,
    write_tiny_gguf,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "a.gguf")
    write_tiny_gguf(tmp_path / "b.gguf")
    assert sha256(tmp_path / "a.gguf") == sha256(tmp_path / "b.gguf")


def test_another_seed_gives_other_weights(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "a.gguf", seed=1)
    write_tiny_gguf(tmp_path / "b.gguf", seed=2)
    assert sha256(tmp_path / "a.gguf") != sha256(tmp_path / "b.gguf")


def test_chat_model_header_describes_a_small_llama(tmp_path: Path) -> None:
    path = tmp_path / "chat.gguf"
    write_tiny_gguf(path, n_embd=32, n_layer=3, n_head=4, n_head_kv=1, n_ff=48, ctx=512)
    reader = gguf.GGUFReader(path)

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 3
    assert field(reader, "llama.embedding_length") == 32
    assert field(reader, "llama.feed_forward_length") == 48
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 1
    assert field(reader, "llama.context_length") == 512
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert "llama.pooling_type" not in reader.fields
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def test_vocabulary_has_controls_bytes_chars_and_word_chains(tmp_path: Path) -> None:
    path = tmp_path / "chat.gguf"
    write_tiny_gguf(path)
    reader = gguf.GGUFReader(path)
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")

    assert tokens[: len(CONTROL_TOKENS)] == list(CONTROL_TOKENS)
    assert field(reader, "tokenizer.ggml.eos_token_id") == EOS_ID
    assert sum(t.startswith("<0x") for t in tokens) == 256
    assert all("\u2581" + word in tokens for word in WORDS)
    assert "\u2581hel" in tokens  # every prefix, or SentencePiece cannot merge up to the word
    assert len(tokens) == field(reader, "llama.vocab_size")
    assert len(field(reader, "tokenizer.ggml.scores")) == len(tokens)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embedding.shape) == [64, len(tokens)]  # ggml order: (in, out)


def test_embed_variant_declares_mean_pooling(tmp_path: Path) -> None:
    path = tmp_path / "embed.gguf"
    write_tiny_gguf(path, variant="embed")
    reader = gguf.GGUFReader(path)
    assert field(reader, "llama.pooling_type") == gguf.PoolingType.MEAN


def test_f16_weights_halve_the_file_and_keep_norms_f32(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "f32.gguf")
    write_tiny_gguf(tmp_path / "f16.gguf", dtype="f16")
    f32_size = (tmp_path / "f32.gguf").stat().st_size
    assert (tmp_path / "f16.gguf").stat().st_size < 0.6 * f32_size

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "f16.gguf").tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_file_appears_atomically_without_leftover_temporaries(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "nested" / "m.gguf")
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["m.gguf"]


@pytest.mark.parametrize(
    "bad",
    [{"n_embd": 30, "n_head": 4}, {"n_head": 4, "n_head_kv": 3}, {"n_layer": 0}],
    ids=["heads-do-not-split-embd", "kv-heads-do-not-divide", "no-layers"],
)
def test_impossible_shapes_are_refused(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        write_tiny_gguf(tmp_path / "x.gguf", **bad)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_recipe_records_every_argument_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, n_layer=3)
    assert read_recipe(path) == recipe_for(n_layer=3)
    assert read_recipe(path) != recipe_for()
    assert RECIPE_KEY in gguf.GGUFReader(path).fields


def test_read_recipe_of_missing_foreign_or_truncated_file_is_none(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "whole.gguf")
    whole = (tmp_path / "whole.gguf").read_bytes()
    assert read_recipe(tmp_path / "missing.gguf") is None
    for index, data in enumerate([b"not a gguf at all", whole[:4], whole[:24], whole[:1000]]):
        (tmp_path / f"bad{index}.gguf").write_bytes(data)
        assert read_recipe(tmp_path / f"bad{index}.gguf") is None


def test_cli_writes_the_same_file_as_the_function(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "router.embedded.tiny_gguf", "--out", str(tmp_path / "cli.gguf")]
        + ["--variant", "embed", "--n-layer", "1", "--dtype", "f16"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    write_tiny_gguf(tmp_path / "api.gguf", variant="embed", n_layer=1, dtype="f16")
    assert sha256(tmp_path / "cli.gguf") == sha256(tmp_path / "api.gguf")


def test_demo_models_are_written_once_then_reused(tmp_path: Path) -> None:
    models = demo.ensure_demo_models(tmp_path)
    assert set(models) == {"tiny-chat", "tiny-embed"}
    assert models["tiny-chat"] == tmp_path / "tiny-chat.gguf"
    first = {name: path.stat().st_mtime_ns for name, path in models.items()}

    assert demo.ensure_demo_models(tmp_path) == models
    assert {name: path.stat().st_mtime_ns for name, path in models.items()} == first


def test_cached_model_made_with_other_arguments_is_rewritten(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", n_layer=1)
    path = demo.ensure_model(tmp_path, "m", n_layer=2)
    assert gguf.GGUFReader(path).fields["llama.block_count"].contents() == 2


def test_demo_dir_follows_routermodel_cache_dir_then_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ROUTERMODEL_CACHE_DIR", str(tmp_path / "rm"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_demo_dir() == tmp_path / "rm" / "demo-models"

    monkeypatch.delenv("ROUTERMODEL_CACHE_DIR")
    assert demo.default_demo_dir() == tmp_path / "xdg" / "routermodel" / "demo-models"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_demo_dir() == tmp_path / "home" / ".cache" / "routermodel" / "demo-models"


def test_racing_writers_leave_one_complete_file(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: demo.ensure_model(tmp_path, "m", n_layer=1), range(4)))
    write_tiny_gguf(tmp_path / "reference.gguf", n_layer=1)
    assert set(paths) == {tmp_path / "m.gguf"}
    assert sha256(tmp_path / "m.gguf") == sha256(tmp_path / "reference.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "reference.gguf"]
