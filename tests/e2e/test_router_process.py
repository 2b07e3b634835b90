"""The router as a real process: grpcurl through reflection, signals, orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from router.pool.registry import ChildRegistry
from tests import procfs
from tests.e2e.stack import stop_process
from tests.helpers import (
    REPO,
    chat_model,
    free_port,
    pid_alive,
    router_process,
    wait_for_grpc,
    write_config,
)

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(port: int, *args: str, data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run grpcurl and return the JSON messages it printed."""
    command = [GRPCURL, "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run(
        [*command, f"127.0.0.1:{port}", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    decoder, text, messages = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


def grpcurl_lines(port: int, *args: str) -> list[str]:
    result = subprocess.run(
        [GRPCURL, "-plaintext", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def model_pid(port: int, alias: str) -> int:
    [response] = grpcurl(port, "router.v1.ModelControlService/GetModel", data={"model": alias})
    return int(response["model"].get("pid", 0))


def test_grpcurl_lists_services_and_streams_a_generation(tmp_path: Path, tiny_chat: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=port)
    with router_process(config, port):
        services = grpcurl_lines(port, "list")
        assert {
            "router.v1.InferenceService",
            "router.v1.ModelControlService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= set(services)
        body = {
            "messages": [{"role": "user", "content": "hello"}],
            # Enough tokens that several reads happen even when chunks coalesce under load.
            "max_tokens": 400,
            "stream": True,
        }
        events = grpcurl(
            port,
            "router.v1.InferenceService/Generate",
            data={"model": "chat", "kind": "GENERATE_KIND_CHAT", "body": json.dumps(body)},
        )
        end = events[-1]["end"]
        # The last chunks ride with the end.
        chunks = [e["chunk"] for e in events if "chunk" in e] + [end.get("chunk", {"data": []})]
        assert len(chunks) >= 2
        assert all(
            json.loads(d)["object"] == "chat.completion.chunk" for c in chunks for d in c["data"]
        )
        assert end["finishReason"] == "length"
        assert end["usage"]["completionTokens"] == 400
        assert sum(len(c["data"]) for c in chunks) >= 400
        [health] = grpcurl(port, "grpc.health.v1.Health/Check")
        assert health["status"] == "SERVING"


def test_sigterm_stops_gracefully_and_reaps_children(tmp_path: Path, tiny_chat: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=port, system={"preload_models": ["*"]}
    )
    with router_process(config, port) as process:
        deadline = time.monotonic() + 10
        while not (child := model_pid(port, "chat")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child and pid_alive(child)
        spare = _spare_of(process.pid, child)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not pid_alive(child)
        assert not pid_alive(spare)


def _start(
    config: Path, port: int, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """``python -m router``, in ``started`` (for the caller's cleanup) before it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "router", "-c", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started.append(process)
    wait_for_grpc(port, process, timeout=20)
    return process


def _loaded_child(port: int) -> int:
    grpcurl(port, "router.v1.ModelControlService/LoadModel", data={"model": "chat", "wait": True})
    pid = model_pid(port, "chat")
    assert pid and pid_alive(pid)
    return pid


def _spare_of(router: int, child: int) -> int:
    """The spare launcher the router starts once its child's load is over."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spares = [pid for pid in procfs.launchers_from_stdin(router) if pid != child]
        if spares:
            return spares[0]
        time.sleep(0.05)
    raise AssertionError("no spare launcher started")


def test_router_sigkill_leaves_no_child_and_instances_stay_apart(
    tmp_path: Path, tiny_chat: Path
) -> None:
    ports = free_port(), free_port()
    dirs = [tmp_path / "a", tmp_path / "b"]
    configs = []
    for directory, port in zip(dirs, ports, strict=True):
        directory.mkdir()
        configs.append(write_config(directory, {"chat": chat_model(tiny_chat)}, grpc_port=port))
    processes: list[subprocess.Popen[bytes]] = []  # every router started, for the finally
    orphans: list[int] = []  # what must die with the first router, killed if it did not
    try:
        for config, port in zip(configs, ports, strict=True):
            _start(config, port, processes)
        first = processes[0]
        children = [_loaded_child(port) for port in ports]
        spare = _spare_of(first.pid, children[0])
        orphans += [children[0], spare]
        first.kill()  # SIGKILL: no cleanup code runs in the router
        first.wait(5)
        deadline = time.monotonic() + 10
        while (pid_alive(children[0]) or pid_alive(spare)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(children[0]), "the child outlived its router"
        assert not pid_alive(spare), "the spare launcher outlived its router"
        assert pid_alive(children[1]), "the other instance's child was touched"
        _start(configs[0], ports[0], processes)
        assert pid_alive(children[1])
        assert model_pid(ports[1], "chat") == children[1]
        assert _loaded_child(ports[0]) != children[0]
    finally:
        for process in processes:
            stop_process(process)
        for pid in orphans:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_restart_reaps_recorded_leftovers_only(tmp_path: Path) -> None:
    """The state-directory fallback (for when the death signal could not be set)."""
    mine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    theirs = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        registry = ChildRegistry(tmp_path / "mine")
        registry.acquire()
        registry.record("chat", mine.pid)
        registry.release()
        other = ChildRegistry(tmp_path / "theirs")
        other.acquire()
        other.record("chat", theirs.pid)

        restarted = ChildRegistry(tmp_path / "mine")
        restarted.acquire()
        assert restarted.reap_leftovers() == [mine.pid]
        mine.wait(5)
        assert mine.returncode == -signal.SIGKILL
        assert theirs.poll() is None
        other.release()
        restarted.release()
    finally:
        for process in (mine, theirs):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_recycled_pid_is_not_killed(tmp_path: Path) -> None:
    registry = ChildRegistry(tmp_path)
    registry.acquire()
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = tmp_path / "children" / f"{bystander.pid}.json"
        record.write_text(json.dumps({"pid": bystander.pid, "start_ticks": 1, "alias": "x"}))
        assert registry.reap_leftovers() == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        registry.release()


def test_two_routers_cannot_share_a_state_dir(tmp_path: Path) -> None:
    first = ChildRegistry(tmp_path)
    first.acquire()
    from router.pool.registry import StateDirInUse

    with pytest.raises(StateDirInUse):
        ChildRegistry(tmp_path).acquire()
    first.release()


def test_bad_config_exits_with_the_reason(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"models": {"m": {"model_path": "m.gguf"}}, "system": {"idle_timout_sec": 5}})
    )
    result = subprocess.run(
        [sys.executable, "-m", "router", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CONFIG_PATH": ""},
    )
    assert result.returncode != 0
    assert "idle_timout_sec" in result.stderr and "did you mean 'idle_timeout_sec'" in result.stderr
    assert "Traceback" not in result.stderr


def test_taken_port_is_a_clear_error(tmp_path: Path, tiny_chat: Path) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = write_config(tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=port)
        result = subprocess.run(
            [sys.executable, "-m", "router", "-c", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
