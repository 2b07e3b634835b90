"""The committed stubs match the protos, and the protos pass `buf lint` (STANDARD + COMMENTS).

`make check-protos` and `make lint` run the same checks; here they are part of the suite too, so a
proto edited without `make protos`, or a field without its comment, fails `pytest` as well.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from router.codegen import ROOT, STUB_DIR, stale_files

BUF = str(ROOT / ".venv" / "bin" / "buf")


def test_committed_stubs_are_current() -> None:
    assert stale_files() == [], "router/v1 is stale: run `make protos` and commit the result"


def test_a_stale_missing_or_extra_stub_is_reported(tmp_path: Path) -> None:
    committed = tmp_path / "v1"
    shutil.copytree(ROOT / STUB_DIR, committed, ignore=shutil.ignore_patterns("__pycache__"))
    assert stale_files(committed) == []  # the copy itself is current

    with (committed / "model_pb2.pyi").open("a") as stub:
        stub.write("# edited by hand\n")
    (committed / "errors_pb2_grpc.py").unlink()
    (committed / "old_service_pb2.py").write_text("")

    assert stale_files(committed) == ["errors_pb2_grpc.py", "model_pb2.pyi", "old_service_pb2.py"]


def _lint(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUF, "lint"], cwd=directory, capture_output=True, text=True, timeout=120)


def test_protos_pass_buf_lint() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_requires_comments(tmp_path: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "router" / "v1" / "model.proto"
    # Well named (STANDARD passes) but undocumented.
    proto.write_text(proto.read_text() + "\nmessage Undocumented {\n  string name = 1;\n}\n")

    result = _lint(tmp_path)

    assert result.returncode != 0
    assert 'Message "Undocumented" should have a non-empty comment' in result.stdout
    assert 'Field "name" should have a non-empty comment' in result.stdout
