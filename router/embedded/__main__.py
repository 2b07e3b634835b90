"""`python -m router.embedded`: a llama-server stand-in over `xllamacpp.Server` (CPU build).

It takes llama-server's own flag names, so the router can start it exactly like a real
`llama-server` binary. The HTTP routes are llama.cpp's own server code running inside this process.

With the one argument `--flags-from-stdin` it is a spare (see `router.pool.launcher`): it starts,
imports the wheel, and only then reads its flags, one JSON array of strings on a line of stdin.
End of input before that line means the router no longer needs it: it exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import xllamacpp as xlc

from router.pool.command import FLAGS_FROM_STDIN

POOLING = {
    "none": xlc.llama_pooling_type.LLAMA_POOLING_TYPE_NONE,
    "mean": xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN,
    "cls": xlc.llama_pooling_type.LLAMA_POOLING_TYPE_CLS,
    "last": xlc.llama_pooling_type.LLAMA_POOLING_TYPE_LAST,
    "rank": xlc.llama_pooling_type.LLAMA_POOLING_TYPE_RANK,
}
# The KV cache types llama-server accepts for -ctk/-ctv.
CACHE_TYPES = {
    name: getattr(xlc.ggml_type, f"GGML_TYPE_{name.upper()}")
    for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
}
FLASH_ATTN = {
    "on": xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "auto": xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_AUTO,
}
CPU_DEVICES = {"none", "cpu"}


@dataclass(frozen=True)
class LaunchPlan:
    """CommonParams ready for `xllamacpp.Server`, plus what the build could not honour."""

    params: Any
    warnings: tuple[str, ...]


def _gpu_layers(value: str) -> int:
    # llama-server's spelling: a count, or "auto" (-1) / "all" (-2).
    special = {"auto": -1, "all": -2}
    if value in special:
        return special[value]
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, 'auto' or 'all', got {value!r}"
        ) from None


def _split_commas(values: list[str] | None) -> list[str]:
    return [item for value in values or [] for item in value.split(",") if item]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router.embedded",
        description="llama-server-compatible launcher over xllamacpp (CPU).",
        allow_abbrev=False,
    )
    add = p.add_argument
    add("-m", "--model", required=True, help="path of the GGUF model")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8080, help="0 picks a free port")
    add("-c", "--ctx-size", type=int, help="total KV size over all slots; 0 = model's")
    add("-np", "--parallel", type=int)
    add("-t", "--threads", type=int)
    add("-tb", "--threads-batch", type=int, help="defaults to --threads")
    add("-n", "--n-predict", type=int)
    add("-b", "--batch-size", type=int)
    add("-ub", "--ubatch-size", type=int)
    add("--embedding", "--embeddings", action="store_true")
    add("--pooling", choices=sorted(POOLING))
    add("--metrics", action="store_true")
    add("--props", action="store_true")
    add("--no-slots", action="store_true")
    add("-a", "--alias", action="append", help="repeatable, or comma-separated")
    add("--api-key", action="append", help="repeatable, or comma-separated")
    add("--api-key-file", action="append", help="one key per line; repeatable")
    add("--chat-template")
    add("-s", "--seed", type=int)
    add("-lv", "--verbosity", "--log-verbosity", type=int)
    add("-ngl", "--n-gpu-layers", "--gpu-layers", type=_gpu_layers)
    add("-kvu", "--kv-unified", action="store_true")
    add("-ctk", "--cache-type-k", choices=sorted(CACHE_TYPES))
    add("-ctv", "--cache-type-v", choices=sorted(CACHE_TYPES))
    add("-fa", "--flash-attn", choices=sorted(FLASH_ATTN), nargs="?", const="on")
    add("--no-mmap", action="store_true")
    add("--mlock", action="store_true")
    add("--rope-freq-base", type=float)
    add("--jinja", action="store_true")
    add("--no-warmup", action="store_true")
    add("-dev", "--device", help="comma-separated devices; this CPU build only honours none/CPU")
    return p


def build_params(argv: Sequence[str]) -> LaunchPlan:
    """Parse llama-server flags into `xllamacpp.CommonParams` without starting anything.

    Bad or unknown flags exit with status 2, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    params = xlc.CommonParams()
    warnings: list[str] = []

    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    # Left on, llama.cpp may silently shrink n_ctx to fit memory; the router sized it already.
    params.fit_params = False

    api_keys = _split_commas(args.api_key)
    for key_file in args.api_key_file or []:
        try:
            with open(key_file, encoding="utf-8") as handle:
                api_keys += [line for line in handle.read().splitlines() if line]
        except OSError as exc:
            parser.error(f"--api-key-file: {exc}")
    # llama.cpp folded its use_mmap/use_mlock booleans into one load mode.
    modes = xlc.llama_load_mode
    load_mode = None
    if args.no_mmap:
        load_mode = modes.LLAMA_LOAD_MODE_MLOCK if args.mlock else modes.LLAMA_LOAD_MODE_NONE
    elif args.mlock:
        load_mode = modes.LLAMA_LOAD_MODE_MMAP_MLOCK

    def when(given: bool, value: object) -> object:
        return value if given else None

    # (object, attribute, value or None when the flag was not given, flag for messages)
    settings: list[tuple[Any, str, object, str]] = [
        (params, "n_ctx", args.ctx_size, "--ctx-size"),
        (params, "n_parallel", args.parallel, "--parallel"),
        (params.cpuparams, "n_threads", args.threads, "--threads"),
        (
            params.cpuparams_batch,
            "n_threads",
            args.threads if args.threads_batch is None else args.threads_batch,
            "--threads-batch",
        ),
        (params, "n_predict", args.n_predict, "--n-predict"),
        (params, "n_batch", args.batch_size, "--batch-size"),
        (params, "n_ubatch", args.ubatch_size, "--ubatch-size"),
        (params, "embedding", when(args.embedding, True), "--embedding"),
        (params, "pooling_type", args.pooling and POOLING[args.pooling], "--pooling"),
        (params, "endpoint_metrics", when(args.metrics, True), "--metrics"),
        (params, "endpoint_props", when(args.props, True), "--props"),
        (params, "endpoint_slots", when(args.no_slots, False), "--no-slots"),
        (params, "model_alias", when(bool(args.alias), set(_split_commas(args.alias))), "--alias"),
        (params, "api_keys", when(bool(api_keys), api_keys), "--api-key"),
        (params, "chat_template", args.chat_template, "--chat-template"),
        (params.sampling, "seed", args.seed, "--seed"),
        (params, "verbosity", args.verbosity, "--verbosity"),
        (params, "n_gpu_layers", args.n_gpu_layers, "--n-gpu-layers"),
        (params, "kv_unified", when(args.kv_unified, True), "--kv-unified"),
        (params, "cache_type_k", args.cache_type_k and CACHE_TYPES[args.cache_type_k], "-ctk"),
        (params, "cache_type_v", args.cache_type_v and CACHE_TYPES[args.cache_type_v], "-ctv"),
        (params, "flash_attn_type", args.flash_attn and FLASH_ATTN[args.flash_attn], "-fa"),
        (params, "load_mode", load_mode, "--no-mmap/--mlock"),
        (params, "rope_freq_base", args.rope_freq_base, "--rope-freq-base"),
        (params, "use_jinja", when(args.jinja, True), "--jinja"),
        (params, "warmup", when(args.no_warmup, False), "--no-warmup"),
    ]
    for target, attr, value, flag in settings:
        if value is None:
            continue
        # The wheel is pinned, but a flag whose setting is missing from another build must not
        # stop the server from starting.
        if hasattr(target, attr):
            setattr(target, attr, value)
        else:
            warnings.append(f"{flag} ignored: this xllamacpp build has no {attr} setting")

    if args.device is not None:
        others = [d for d in _split_commas([args.device]) if d.lower() not in CPU_DEVICES]
        if others:
            warnings.append(f"--device {','.join(others)} ignored: this build runs on the CPU")

    return LaunchPlan(params, tuple(warnings))


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _say(line: str) -> None:
    # One write(2) per line: llama.cpp's threads log to the same stderr, and print() may split a
    # line into several writes that their output can land between.
    os.write(sys.stderr.fileno(), f"{line}\n".encode())


def serve(plan: LaunchPlan) -> NoReturn:
    """Run the server until SIGTERM/SIGINT, then leave without running any destructor."""
    # Blocked before the constructor starts llama.cpp's threads, which inherit the mask: a signal
    # then stays pending for sigwait below instead of landing on an HTTP or OpenMP thread, where a
    # Python handler would only run once the main thread next executes bytecode (never, while it
    # sleeps). A signal that arrives during the model load is served right after it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    for warning in plan.warnings:
        _say(f"warning: {warning}")
    model = plan.params.model.path
    if not os.path.isfile(model):
        _say(f"error: model file not found: {model}")
        os._exit(1)
    try:
        server = xlc.Server(plan.params)
    except Exception as exc:  # the wheel raises a bare RuntimeError; its log above says why
        _say(f"error: server did not start: {exc}")
        os._exit(1)
    _say(f"listening on {server.listening_address}")

    signal.sigwait(STOP_SIGNALS)
    # Never let ~Server() run: in xllamacpp 2026.10.11549 it can deadlock in thread::join when
    # the task loop had not started yet, so the process ends without tearing the server down.
    os._exit(0)


def flags_from_stdin() -> list[str]:
    """A spare's flags: one JSON array of strings on the first line of stdin."""
    line = sys.stdin.readline()
    if not line:
        os._exit(0)  # the router went away, or stopped its spare, before giving it a model
    try:
        flags = json.loads(line)
    except ValueError:
        flags = None
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        _say(f"error: {FLAGS_FROM_STDIN} expects one JSON array of strings on a line")
        os._exit(2)
    return flags


def main(argv: Sequence[str] | None = None) -> NoReturn:
    flags = list(sys.argv[1:] if argv is None else argv)
    if flags == [FLAGS_FROM_STDIN]:
        flags = flags_from_stdin()
    serve(build_params(flags))


if __name__ == "__main__":
    main()
