from __future__ import annotations

from pathlib import Path

import pytest

from router.embedded.demo import ensure_demo_models, ensure_model
from tests.helpers import CACHE


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The tiny demo models, written once and cached across runs."""
    directory = CACHE / "models"
    ensure_demo_models(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat(models_dir: Path) -> Path:
    return models_dir / "tiny-chat.gguf"


@pytest.fixture(scope="session")
def tiny_embed(models_dir: Path) -> Path:
    return models_dir / "tiny-embed.gguf"


@pytest.fixture(scope="session")
def slow_chat(models_dir: Path) -> Path:
    """A bigger chat model (a few hundred tokens/s) for tests that need time to act mid-stream."""
    return ensure_model(
        models_dir, "slow-chat", n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=2048
    )
