"""Deterministic tiny llama-architecture GGUF models, written offline with numpy and gguf.

The chat variant is shaped so that llama.cpp only ever emits plain ASCII words: hidden dimension 0
is a constant that no layer can change, and column 0 of the output matrix turns it into a fixed
per-token logit offset that favours whole words and all but forbids byte, control and end tokens.
So a reply always runs to `max_tokens` (`finish_reason == "length"`). On top of that, every whole
word's output row points at the embedding of its predecessor in one seeded cycle over all words,
so greedy decoding walks that cycle instead of repeating one word.

The embed variant is plain random weights with mean pooling, for `--embedding` servers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict

import gguf
import numpy as np
import numpy.typing as npt

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

Variant = Literal["chat", "embed"]
DType = Literal["f32", "f16"]

# Stored in every file so a cache can tell whether a file on disk is what the current code would
# write. Bump the version whenever the bytes produced for the same arguments change.
RECIPE_KEY = "routermodel.tiny_gguf.recipe"
RECIPE_VERSION = 1

CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(CONTROL_TOKENS))
SPACE = "\u2581"

WORDS = (
    "the a and of to in is it on for with as at be by we you he she they this that not or but "
    "all can do go get has have new no yes ok one two three four five six seven eight nine ten "
    "red blue green cat dog fish bird tree sun moon star day night time hello world router model "
    "server token stream fast slow big small good bad hot cold up down left right open close run "
    "stop start test data cache pool load ready done"
).split()

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Chat-variant logit offsets (before the final RMS norm rescales them by a factor near 1).
WORD_BIAS = 1.5
PREFIX_BIAS = 0.9
CHAR_BIAS = 0.3
BANNED_BIAS = -30.0
# Extra logit for the cycle successor of the current word; larger than any word-vs-word bias gap.
SUCCESSOR_GAIN = 4.0
CONSTANT = 8.0
DIRECTION_NORM = 4.0
# Layers only add small noise to the residual stream, so the last hidden state stays close to the
# current token's embedding and the successor cycle survives deeper stacks.
LAYER_GAIN = 0.1


class TinyGGUFOptions(TypedDict, total=False):
    """Keyword arguments of `write_tiny_gguf`, for callers that forward them."""

    variant: Variant
    seed: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    ctx: int
    dtype: DType


@dataclass(frozen=True)
class _Spec:
    variant: Variant
    seed: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    ctx: int
    dtype: DType

    def validate(self) -> None:
        if self.variant not in ("chat", "embed"):
            raise ValueError(f"variant must be 'chat' or 'embed', not {self.variant!r}")
        if self.dtype not in ("f32", "f16"):
            raise ValueError(f"dtype must be 'f32' or 'f16', not {self.dtype!r}")
        if min(self.n_embd, self.n_layer, self.n_head, self.n_head_kv, self.n_ff, self.ctx) < 1:
            raise ValueError("sizes must be positive")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd must split into n_head heads of even size (RoPE)")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.seed < 0:
            raise ValueError("seed must not be negative")

    def recipe(self) -> str:
        return json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bias: npt.NDArray[np.float32]
    word_ids: list[int]


def _build_vocab() -> _Vocab:
    tokens = list(CONTROL_TOKENS)
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(CONTROL_TOKENS) - 1)
    scores = [0.0] * len(CONTROL_TOKENS)
    bias = [BANNED_BIAS] * len(CONTROL_TOKENS)

    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    scores += [0.0] * 256
    bias += [BANNED_BIAS] * 256

    chars = [SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    tokens += chars
    types += [gguf.TokenType.NORMAL] * len(chars)
    scores += [-1000.0] * len(chars)
    bias += [CHAR_BIAS] * len(chars)

    # SentencePiece merges only pairs whose concatenation is in the vocabulary, so every prefix of
    # a word must be a token for the whole word to come out as one token.
    whole_words = {SPACE + w for w in WORDS}
    chains: dict[str, None] = {}
    for word in WORDS:
        for end in range(2, len(word) + 2):
            chains.setdefault((SPACE + word)[:end])
    word_ids = []
    for piece in chains:
        if piece in whole_words:
            word_ids.append(len(tokens))
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-100.0 + len(piece))
        bias.append(WORD_BIAS if piece in whole_words else PREFIX_BIAS)

    return _Vocab(tokens, scores, [int(t) for t in types], np.array(bias, np.float32), word_ids)


def _unit_rows(rng: np.random.Generator, rows: int, cols: int) -> npt.NDArray[np.float32]:
    m = rng.standard_normal((rows, cols))
    norms: npt.NDArray[np.float64] = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / norms).astype(np.float32)


def _layer_weights(
    rng: np.random.Generator, spec: _Spec, gain: float
) -> list[tuple[str, npt.NDArray[np.float32]]]:
    head_dim = spec.n_embd // spec.n_head
    n_kv = spec.n_head_kv * head_dim
    d, f = spec.n_embd, spec.n_ff

    def dense(out_dim: int, in_dim: int) -> npt.NDArray[np.float32]:
        scale = gain / math.sqrt(in_dim)
        return (rng.standard_normal((out_dim, in_dim)) * scale).astype(np.float32)

    out: list[tuple[str, npt.NDArray[np.float32]]] = []
    for i in range(spec.n_layer):
        attn_output = dense(d, d)
        ffn_down = dense(d, f)
        if spec.variant == "chat":
            attn_output[0] = 0.0
            ffn_down[0] = 0.0
        out += [
            (f"blk.{i}.attn_norm.weight", np.ones(d, np.float32)),
            (f"blk.{i}.attn_q.weight", dense(d, d)),
            (f"blk.{i}.attn_k.weight", dense(n_kv, d)),
            (f"blk.{i}.attn_v.weight", dense(n_kv, d)),
            (f"blk.{i}.attn_output.weight", attn_output),
            (f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32)),
            (f"blk.{i}.ffn_gate.weight", dense(f, d)),
            (f"blk.{i}.ffn_up.weight", dense(f, d)),
            (f"blk.{i}.ffn_down.weight", ffn_down),
        ]
    return out


def _tensors(spec: _Spec, vocab: _Vocab) -> list[tuple[str, npt.NDArray[np.float32]]]:
    rng = np.random.default_rng(spec.seed)
    n_vocab, d = len(vocab.tokens), spec.n_embd

    if spec.variant == "embed":
        embd = rng.standard_normal((n_vocab, d)).astype(np.float32)
        layers = _layer_weights(rng, spec, gain=1.0)
        output = (rng.standard_normal((n_vocab, d)) / np.sqrt(d)).astype(np.float32)
    else:
        directions = _unit_rows(rng, n_vocab, d - 1)
        embd = np.empty((n_vocab, d), np.float32)
        embd[:, 0] = CONSTANT
        embd[:, 1:] = DIRECTION_NORM * directions
        layers = _layer_weights(rng, spec, gain=LAYER_GAIN)
        # After the final RMS norm, dimension 0 reads CONSTANT / rms and a direction has norm
        # DIRECTION_NORM / rms; scaling by the expected rms keeps the logit offsets as specified.
        rms = np.sqrt((CONSTANT**2 + DIRECTION_NORM**2) / d)
        output = np.zeros((n_vocab, d), np.float32)
        output[:, 0] = vocab.bias * rms / CONSTANT
        cycle = [vocab.word_ids[i] for i in rng.permutation(len(vocab.word_ids))]
        for current, successor in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            output[successor, 1:] = directions[current] * SUCCESSOR_GAIN * rms / DIRECTION_NORM

    return [
        ("token_embd.weight", embd),
        *layers,
        ("output_norm.weight", np.ones(d, np.float32)),
        ("output.weight", output),
    ]


def _add_metadata(w: gguf.GGUFWriter, spec: _Spec, vocab: _Vocab) -> None:
    w.add_name(f"routermodel-tiny-{spec.variant}")
    w.add_string(RECIPE_KEY, spec.recipe())
    w.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if spec.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(spec.n_embd // spec.n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab.tokens))
    if spec.variant == "embed":
        w.add_pooling_type(gguf.PoolingType.MEAN)

    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_eot_token_id(IM_END_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML_TEMPLATE)


def _write(path: Path, spec: _Spec) -> None:
    vocab = _build_vocab()
    tensors = _tensors(spec, vocab)

    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer lets racing processes each finish their own copy; the writer's own
    # open() keeps the usual umask-based permissions, unlike mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            _add_metadata(writer, spec, vocab)
            for name, array in tensors:
                if spec.dtype == "f16" and array.ndim == 2:
                    writer.add_tensor(name, array.astype(np.float16))
                else:
                    writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tiny_gguf(
    path: Path,
    *,
    variant: Variant = "chat",
    seed: int = 1234,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    ctx: int = 2048,
    dtype: DType = "f32",
) -> None:
    """Write a tiny model to `path` atomically; the same arguments always give the same bytes."""
    spec = _Spec(variant, seed, n_embd, n_layer, n_head, n_head_kv, n_ff, ctx, dtype)
    spec.validate()
    _write(Path(path), spec)


def recipe_for(**options: Unpack[TinyGGUFOptions]) -> str:
    """The recipe string that `write_tiny_gguf(path, **options)` stores in its file."""
    bound = inspect.signature(write_tiny_gguf).bind(Path(), **options)
    bound.apply_defaults()
    del bound.arguments["path"]
    return _Spec(**bound.arguments).recipe()


def read_recipe(path: Path) -> str | None:
    """The recipe stored in a file written by this module, or None for any other file."""
    try:
        field = gguf.GGUFReader(path).fields.get(RECIPE_KEY)
    except Exception:  # a truncated or foreign file fails in many ways; none of them is ours
        return None
    return None if field is None else str(field.contents())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m router.embedded.tiny_gguf", description="Write a tiny deterministic GGUF."
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", choices=("chat", "embed"), default="chat")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-head-kv", type=int, default=2)
    parser.add_argument("--n-ff", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    args = parser.parse_args(argv)
    try:
        write_tiny_gguf(
            args.out,
            variant=args.variant,
            seed=args.seed,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_head_kv=args.n_head_kv,
            n_ff=args.n_ff,
            ctx=args.ctx,
            dtype=args.dtype,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(args.out)


if __name__ == "__main__":
    main()
