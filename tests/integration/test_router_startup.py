"""``python -m router`` that cannot start: one line saying why, exit code 1, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO


def _start(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CONFIG_PATH": ""},
    )


def _config(directory: Path, system: dict[str, Any]) -> Path:
    config = directory / "config.json"
    config.write_text(
        json.dumps(
            {
                "grpc": {"host": "127.0.0.1", "port": 0},
                "system": system,
                "models": {"m": {"model_path": str(directory / "m.gguf")}},
            }
        )
    )
    return config


def test_a_state_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # a regular file where a folder is needed
    state_dir = tmp_path / "file" / "state"

    result = _start(_config(tmp_path, {"state_dir": str(state_dir)}))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("router: cannot start: Not a directory: ")
    assert str(state_dir) in last


def test_a_nul_byte_in_state_dir_is_a_configuration_error(tmp_path: Path) -> None:
    result = _start(_config(tmp_path, {"state_dir": str(tmp_path / "a\0b")}))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "system.state_dir: must not contain a NUL byte" in result.stderr


def test_json_nested_too_deeply_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"models": ' + "[" * 100_000 + "]" * 100_000 + "}")

    result = _start(config)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{config}: invalid JSON: nested too deeply" in result.stderr
