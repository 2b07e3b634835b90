"""Starting and stopping on an unusual machine or config: one clear line, never a traceback.

Found by review; each failed before its fix (a traceback, or the wrong reason).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc

from tests.helpers import REPO, chat_model, free_port, write_config


def run(module: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_facade_on_a_taken_port_says_so(tmp_path: Path, tiny_chat: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = write_config(
            tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=free_port(), api={"port": port}
        )
        result = run("facade", config)
    assert result.returncode == 1
    assert f"facade: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_facade_refuses_an_ephemeral_router_port(tmp_path: Path, tiny_chat: Path) -> None:
    # Before: it started, and every request failed on a channel to port 0.
    config = write_config(
        tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=0, api={"port": free_port()}
    )
    result = run("facade", config)
    assert result.returncode == 1
    assert "facade: grpc.port is 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_tls_files_that_are_not_pem_are_named(tmp_path: Path, tiny_chat: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = write_config(
        tmp_path,
        {"chat": chat_model(tiny_chat)},
        grpc_port=free_port(),
        grpc_tls={"cert_file": str(junk), "key_file": str(junk)},
    )
    result = run("router", config)
    assert result.returncode == 1
    assert "grpc.tls:" in result.stderr and "junk.pem" in result.stderr
    assert "in use" not in result.stderr
    assert "Traceback" not in result.stderr


def start_router(config: Path, target: str) -> subprocess.Popen[str]:
    """``python -m router`` once it answers on ``target``; its stderr is read at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "router", "-c", str(config)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            process.kill()
            _, stderr = process.communicate()
            raise AssertionError(f"the router did not answer on {target}:\n{stderr}") from None
    return process


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


def test_the_router_listens_on_an_ipv6_loopback(tmp_path: Path, tiny_chat: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=port)
    data = json.loads(config.read_text())
    data["grpc"]["host"] = "::1"
    config.write_text(json.dumps(data))
    process = start_router(config, f"[::1]:{port}")
    returncode, stderr = stop(process)
    assert returncode == 0, stderr


def test_an_unwritable_status_file_does_not_break_the_shutdown(
    tmp_path: Path, tiny_chat: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    port = free_port()
    config = write_config(
        tmp_path,
        {"chat": chat_model(tiny_chat)},
        grpc_port=port,
        telemetry={"model_status_path": str(tmp_path / "a-file" / "model_status.json")},
    )
    process = start_router(config, f"127.0.0.1:{port}")
    returncode, stderr = stop(process)
    assert returncode == 0, stderr
    assert "cannot write" in stderr
    assert "router stopped" in stderr
    assert "Traceback" not in stderr
