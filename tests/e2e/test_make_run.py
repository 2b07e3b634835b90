"""`make run`: router and facade together; Ctrl-C stops both and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.e2e.stack import get_json, post_json, wait_for_http
from tests.helpers import REPO, chat_model, free_port, pid_alive, write_config


def session_members(session: int) -> list[int]:
    """PIDs of live processes in `session` (make, its shell, router and facade)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_ctrl_c_stops_router_facade_and_models(tmp_path: Path, tiny_chat: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path, {"chat": chat_model(tiny_chat)}, grpc_port=grpc_port, api={"port": http_port}
    )
    log = (tmp_path / "make.log").open("wb")
    # -o: never rebuild the venv stamp here; a new session stands in for the terminal.
    make = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "run", f"CONFIG={config}"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    child = 0
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/health", make, timeout=20)
        status, loaded = post_json(
            f"http://127.0.0.1:{http_port}/v1/models/chat/load", {"wait": True}
        )
        assert status == 200, loaded
        child = loaded["model"]["pid"]
        assert get_json(f"http://127.0.0.1:{http_port}/v1/models")[0] == 200
        assert len(session_members(make.pid)) >= 3  # make, router, facade (and a shell)

        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group

        make.wait(timeout=15)
        deadline = time.monotonic() + 5
        while (session_members(make.pid) or pid_alive(child)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session_members(make.pid) == []
        assert not pid_alive(child)
    finally:
        if make.poll() is None or session_members(make.pid):
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)
        log.close()
