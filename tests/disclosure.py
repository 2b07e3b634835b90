"""The one check that a client-facing message discloses nothing internal.

Client-facing means what a caller receives: HTTP error bodies, SSE error frames, gRPC status
messages and details. None of them may contain a filesystem path, a llama-server log line or a
Python traceback (DESIGN §3); the fuzz, fault and soak runs pass every error they collect here.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from clients.errors import RouterError
from tests.helpers import CACHE, REPO

__all__ = ["assert_error_discloses_nothing", "assert_no_disclosure", "disclosures"]

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # An absolute path of two or more segments, but not one of the API's own routes (messages
    # point callers to those); URL paths a caller sent come back in 404s, `echo` excuses them.
    ("path", re.compile(r"(?<![\w.:/])/(?!v1/|vram/)(?:[\w.@+-]+/)+[\w.@+-]*")),
    ("path", re.compile(r"[\w.-]+\.(?:gguf|py|so)\b")),
    ("path", re.compile(r"site-packages|\bdist-packages\b")),
    ("traceback", re.compile(r"Traceback \(most recent call last\)")),
    ("traceback", re.compile(r'File "[^"]*", line \d+')),
    ("traceback", re.compile(r"\bline \d+, in \w+")),
    ("traceback", re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")),
    ("traceback", re.compile(r"\b[A-Z]\w*(?:Error|Exception)\(")),
    # llama.cpp's log lines: timestamped records, and the function-name prefixes they carry.
    ("llama-server log", re.compile(r"\b\d+\.\d{2}\.\d{3}\.\d{3} [IWED] ")),
    (
        "llama-server log",
        re.compile(
            r"\b(?:llama_\w+|llm_load\w*|ggml_\w+|gguf_\w+|print_info|load_tensors|"
            r"common_init\w*|build_info|load_model|srv\s+\w+|slot\s+\w+):"
        ),
    ),
    ("llama-server log", re.compile(r"fake llama-server|couldn't bind HTTP server socket")),
    # gRPC and OS internals (a transport failure's debug text).
    ("internals", re.compile(r"debug_error_string|grpc_status|StatusCode\.|\bipv[46]:")),
    ("internals", re.compile(r"\[Errno \d+\]")),
)
# Folders of this checkout and machine that must never appear, whatever their shape.
_SECRETS: tuple[str, ...] = (str(REPO), str(CACHE), sys.prefix)


def disclosures(text: str, *, echo: str = "", secrets: Iterable[str] = ()) -> list[str]:
    """What in `text` discloses internals, as "kind: match" lines; [] when nothing does.

    `echo` is what the caller itself sent (URL, body): a match found there is the caller's own
    input reflected back, not a disclosure. `secrets` are extra strings that must not appear
    (e.g. a test's config folder or an API key).
    """
    found = [
        f"{kind}: {match.group(0)!r}"
        for kind, pattern in _PATTERNS
        for match in pattern.finditer(text)
        if match.group(0) not in echo
    ]
    found += [
        f"secret: {secret!r}" for secret in (*_SECRETS, *secrets) if secret and secret in text
    ]
    return found


def assert_no_disclosure(
    text: str, *, echo: str = "", secrets: Iterable[str] = (), where: str = ""
) -> None:
    """Fail with the offending parts when `text`, a client-facing message, discloses internals."""
    found = disclosures(text, echo=echo, secrets=secrets)
    assert not found, f"{where or 'a client-facing message'} discloses {found}:\n{text[:2000]}"


def assert_error_discloses_nothing(
    error: RouterError, *, secrets: Iterable[str] = (), where: str = ""
) -> None:
    """`assert_no_disclosure` over what a gRPC caller receives: the status message and the
    ErrorInfo metadata (keys and values)."""
    metadata = " ".join(f"{key}={value}" for key, value in error.metadata.items())
    text = f"{error.message}\n{metadata}"
    assert_no_disclosure(text, secrets=secrets, where=where or f"{error.code.name} {error.reason}")
