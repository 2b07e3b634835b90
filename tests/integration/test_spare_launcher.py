"""The spare embedded launcher (router.pool.launcher): started ahead of need, adopted by the
next embedded child whose environment is its own, replaced once that load is over, stopped with
the pool; and the embedded server's `--flags-from-stdin` mode it runs in."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clients import End, RouterClient
from router.pool.command import EMBEDDED_SERVER, FLAGS_FROM_STDIN
from router.pool.launcher import Launcher
from router.pool.process import LogRing
from router.server import Router
from tests.helpers import REPO, chat_model, pid_alive, running_router, settings_for, wait_until
from tests.procfs import children, command_line, environment

PROMPT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
EVENTUALLY = 20  # seconds: a bound against hanging, not a latency claim


async def spare_of(router: Router) -> int:
    await wait_until(lambda: router.pool.launcher.spare_pid is not None, EVENTUALLY)
    pid = router.pool.launcher.spare_pid
    assert pid is not None
    return pid


async def serves(client: RouterClient, model: str) -> bool:
    events = [event async for event in client.generate(model, PROMPT)]
    end = events[-1]
    return isinstance(end, End) and end.usage.completion_tokens == 3


async def test_a_cold_load_starts_in_the_spare_and_a_new_spare_follows(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with running_router(settings) as (router, client):
        spare = await spare_of(router)
        assert command_line(spare)[-3:] == ["-m", "router.embedded", FLAGS_FROM_STDIN]

        model = await client.load("chat", wait=True)

        assert model.pid == spare
        assert await serves(client, "chat")
        await wait_until(lambda: router.pool.launcher.spare_pid not in (None, spare), EVENTUALLY)
        follower = router.pool.launcher.spare_pid
        assert follower is not None
        # Unloaded, then loaded again: the follower is the next child.
        await client.unload("chat")
        assert not pid_alive(spare)
        assert (await client.load("chat", wait=True)).pid == follower
        assert await serves(client, "chat")
        last = await spare_of(router)
    for pid in (follower, last):
        assert not pid_alive(pid), "a child or spare outlived the router"
    assert children(os.getpid()) == []


async def test_a_model_with_an_environment_of_its_own_starts_afresh(
    tmp_path: Path, tiny_chat: Path
) -> None:
    model = {**chat_model(tiny_chat), "env": {"ROUTERMODEL_TEST_MARK": "1"}}
    # The plain model is why a spare is kept; the one with an environment cannot use it.
    settings = settings_for(tmp_path, {"chat": model, "plain": chat_model(tiny_chat)})
    async with running_router(settings) as (router, client):
        spare = await spare_of(router)

        loaded = await client.load("chat", wait=True)

        assert loaded.pid != spare
        assert command_line(loaded.pid)[-1] != FLAGS_FROM_STDIN  # its flags are on its argv
        assert "ROUTERMODEL_TEST_MARK=1" in environment(loaded.pid)
        assert router.pool.launcher.spare_pid == spare and pid_alive(spare)
        assert await serves(client, "chat")


async def test_no_spare_when_no_model_could_use_one(tmp_path: Path, tiny_chat: Path) -> None:
    model = {**chat_model(tiny_chat), "env": {"ROUTERMODEL_TEST_MARK": "1"}}
    settings = settings_for(tmp_path, {"chat": model})
    async with running_router(settings) as (router, client):
        loaded = await client.load("chat", wait=True)
        assert router.pool.launcher.spare_pid is None
        assert children(os.getpid()) == [loaded.pid]


async def test_a_spare_that_died_is_not_used_and_not_replaced(
    tmp_path: Path, tiny_chat: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, {"chat": chat_model(tiny_chat)})
    async with running_router(settings) as (router, client):
        spare = await spare_of(router)
        os.kill(spare, signal.SIGKILL)
        await wait_until(lambda: router.pool.launcher.spare_pid is None, EVENTUALLY)

        loaded = await client.load("chat", wait=True)

        assert loaded.pid != spare
        assert await serves(client, "chat")
        await asyncio.sleep(0.5)  # time enough for a replacement to have started, if any
        assert router.pool.launcher.spare_pid is None
        assert children(os.getpid()) == [loaded.pid]
    assert "ended before use (status -9)" in caplog.text


async def test_no_spare_when_turned_off(tmp_path: Path, tiny_chat: Path) -> None:
    settings = settings_for(
        tmp_path, {"chat": chat_model(tiny_chat)}, system={"spare_launcher": False}
    )
    async with running_router(settings) as (router, client):
        loaded = await client.load("chat", wait=True)
        assert await serves(client, "chat")
        assert router.pool.launcher.spare_pid is None
        assert children(os.getpid()) == [loaded.pid]


def spare_process(line: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "router.embedded", FLAGS_FROM_STDIN],
        input=line,
        capture_output=True,
        cwd=REPO,
        timeout=EVENTUALLY,
        check=False,
    )


def test_a_spare_given_no_flags_exits_quietly() -> None:
    done = spare_process(b"")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


@pytest.mark.parametrize("line", [b"not json\n", b'{"m": 1}\n', b'["-m", 2]\n'])
def test_a_spare_given_malformed_flags_says_so(line: bytes) -> None:
    done = spare_process(line)
    assert done.returncode == 2
    assert b"expects one JSON array of strings" in done.stderr


def test_a_spare_given_bad_flags_fails_like_llama_server() -> None:
    done = spare_process(b'["-m", "x.gguf", "--no-such-flag"]\n')
    assert done.returncode == 2
    assert b"unrecognized arguments: --no-such-flag" in done.stderr


async def test_a_spare_that_cannot_take_its_flags_is_stopped_and_a_new_process_started(
    tmp_path: Path,
) -> None:
    launcher = Launcher(None, dict(os.environ))
    # A stand-in spare that is alive but reads nothing: writing its flags fails (EPIPE).
    spare = await asyncio.create_subprocess_exec(
        "sh", "-c", "exec 0<&-; exec sleep 30", stdin=asyncio.subprocess.PIPE
    )
    await wait_until(lambda: not Path(f"/proc/{spare.pid}/fd/0").exists(), EVENTUALLY)
    launcher._spare = spare
    try:
        child = await launcher.launch(
            [*EMBEDDED_SERVER, "--no-such-flag"],
            port=0,
            env=dict(os.environ),
            log=LogRing(10),
            name="t",
        )
        assert child.pid != spare.pid and launcher.spare_pid is None
        assert await asyncio.wait_for(child.exited, EVENTUALLY) == 2  # it did start: bad flags
        assert await asyncio.wait_for(spare.wait(), EVENTUALLY) != 0  # stopped, not left idle
    finally:
        if spare.returncode is None:
            spare.kill()
            await spare.wait()
        await launcher.close()
