"""The demo models: tiny GGUF files written once into a cache directory and reused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from router.embedded.tiny_gguf import TinyGGUFOptions, read_recipe, recipe_for, write_tiny_gguf

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack


def default_demo_dir() -> Path:
    """`$ROUTERMODEL_CACHE_DIR/demo-models`, else `${XDG_CACHE_HOME:-~/.cache}/routermodel/...`."""
    root = os.environ.get("ROUTERMODEL_CACHE_DIR")
    if root:
        return Path(root) / "demo-models"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "routermodel" / "demo-models"


def ensure_model(directory: Path, name: str, **writer_kwargs: Unpack[TinyGGUFOptions]) -> Path:
    """`directory/name.gguf`, written by `write_tiny_gguf(**writer_kwargs)` unless already there.

    A cached file is rewritten when it was made by an older recipe or with other arguments, so a
    name should stand for one set of arguments. Concurrent callers are safe: each writes its own
    temporary file and atomically renames it over the same, byte-identical result.
    """
    path = Path(directory) / f"{name}.gguf"
    if read_recipe(path) != recipe_for(**writer_kwargs):
        write_tiny_gguf(path, **writer_kwargs)
    return path


def ensure_demo_models(directory: Path | None = None) -> dict[str, Path]:
    """The chat and embedding demo models, keyed by the model names the demo config uses."""
    target = default_demo_dir() if directory is None else Path(directory)
    return {
        "tiny-chat": ensure_model(target, "tiny-chat", variant="chat"),
        "tiny-embed": ensure_model(target, "tiny-embed", variant="embed"),
    }
