"""Generate the committed gRPC stubs in router/v1 from protos/, or check they are current.

`python -m router.codegen` runs `buf generate` (buf.gen.yaml); `--check` generates into a
temporary directory and fails if anything differs from the committed files.

buf has no built-in `grpc_python` generator: it lives inside grpcio-tools' bundled protoc.
`python -m router.codegen grpc-plugin` is a protoc plugin (CodeGeneratorRequest on stdin,
CodeGeneratorResponse on stdout) that runs that protoc on the request's descriptors, so the
one buf template drives every generator with the pinned grpcio-tools.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB_DIR = Path("router") / "v1"


def _buf() -> str:
    return str(Path(sys.executable).parent / "buf")


def generate(out: Path | None = None) -> None:
    cmd = [_buf(), "generate"]
    if out is not None:
        cmd += ["--output", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def stale_files(committed: Path = ROOT / STUB_DIR) -> list[str]:
    """Return the stub files that differ from a fresh generation (empty when current).

    ``committed`` is the folder compared with it (tests pass a doctored copy of router/v1).
    """
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / STUB_DIR
        names = {p.name for p in fresh.iterdir()} | {
            p.name for p in committed.iterdir() if p.name != "__init__.py" and p.is_file()
        }
        names.discard("__pycache__")
        return sorted(
            name
            for name in names
            if not (fresh / name).is_file()
            or not (committed / name).is_file()
            or not filecmp.cmp(fresh / name, committed / name, shallow=False)
        )


def run_grpc_plugin() -> None:
    from google.protobuf import descriptor_pb2
    from google.protobuf.compiler import plugin_pb2
    from grpc_tools import protoc

    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse()
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "descriptors.bin"
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out = Path(tmp) / "out"
        out.mkdir()
        status = protoc.main(
            [
                "protoc",
                f"--descriptor_set_in={descriptors}",
                f"--grpc_python_out={out}",
                *request.file_to_generate,
            ]
        )
        if status != 0:
            response.error = f"grpc_tools.protoc exited with {status}"
        for path in sorted(out.rglob("*.py")):
            generated = response.file.add()
            generated.name = str(path.relative_to(out))
            generated.content = path.read_text()
    sys.stdout.buffer.write(response.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", nargs="?", choices=["grpc-plugin"])
    parser.add_argument("--check", action="store_true", help="fail if router/v1 is stale")
    args = parser.parse_args()
    if args.mode == "grpc-plugin":
        run_grpc_plugin()
    elif args.check:
        stale = stale_files()
        if stale:
            sys.exit(f"router/v1 is stale, run `make protos`: {', '.join(stale)}")
        print("router/v1 stubs are up to date")
    else:
        generate()


if __name__ == "__main__":
    main()
