"""Classify why a child failed, from its exit status and last log lines (pure).

The summary is what clients may see: a fixed sentence per class, never a log
line or a path. Patterns match whole llama.cpp messages, not prefixes such as
``llama_model_load`` that also appear in routine loader output (seed defect W6).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass


class FailureKind(enum.Enum):
    PERMANENT = "permanent"  # retrying cannot help: bad file, bad flag
    RETRYABLE = "retryable"  # may pass next time: OOM, crash, timeout
    PORT_CONFLICT = "port_conflict"  # lost the race for a free port: retry at once, not a failure


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    summary: str


_PORT = ("couldn't bind", "address already in use")
_BAD_ARGS = (
    "unknown argument",
    "invalid argument",
    "error while handling argument",
    "unrecognized arguments",
    "unsupported cache type",
)
_BAD_MODEL = (
    "failed to load model",
    "error loading model",
    "gguf_init_from_file",
    "invalid magic",
    "no such file or directory",
)
_OOM = (
    "out of memory",
    "cudamalloc failed",
    "failed to allocate",
    "unable to allocate",
    "cannot allocate memory",
    "bad_alloc",
)

MODEL_FILE_MISSING = Failure(FailureKind.PERMANENT, "the model file does not exist")
MODEL_UNREADABLE = Failure(FailureKind.PERMANENT, "the model file is not a readable GGUF file")
LOAD_TIMED_OUT = Failure(FailureKind.RETRYABLE, "the model did not become ready in time")


def classify_exit(returncode: int, log_tail: Sequence[str]) -> Failure:
    text = "\n".join(log_tail).lower()
    if any(pattern in text for pattern in _PORT):
        return Failure(FailureKind.PORT_CONFLICT, "the child could not bind its port")
    if any(pattern in text for pattern in _BAD_ARGS):
        return Failure(FailureKind.PERMANENT, "llama-server rejected its arguments")
    if any(pattern in text for pattern in _OOM):
        return Failure(FailureKind.RETRYABLE, "the model ran out of memory")
    if any(pattern in text for pattern in _BAD_MODEL):
        return Failure(FailureKind.PERMANENT, "the model file could not be loaded")
    if returncode == -signal.SIGKILL:
        return Failure(
            FailureKind.RETRYABLE, "the model process was killed (possibly out of memory)"
        )
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Failure(FailureKind.RETRYABLE, f"the model process crashed ({name})")
    return Failure(FailureKind.RETRYABLE, f"the model process exited with status {returncode}")
