"""``python -m router``: the gRPC router process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from router.config import INSECURE_LISTEN_WARNING, Settings, settings_from_argv
from router.logs import setup_logging
from router.pool.registry import StateDirInUse
from router.server import ListenError, Router


class _StartFailed(Exception):
    """The router could not start; the message is one line for the operator's console."""


def _reason(error: OSError) -> str:
    # str() reads "[Errno 20] Not a directory: '/x'": the errno number tells an operator nothing.
    if error.strerror is None:
        return str(error).replace("\n", " ")
    where = f": {os.fsdecode(error.filename)}" if error.filename is not None else ""
    return f"{error.strerror}{where}"


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    router = Router(settings)
    try:
        # Only start is guarded: an OSError while serving or stopping is a bug and keeps its
        # traceback. Starting meets the machine (state directory, ports, TLS and model files),
        # where a refusal is the operator's to fix and a traceback would bury the reason.
        try:
            await router.start()
        except (ListenError, StateDirInUse) as error:
            raise _StartFailed(str(error)) from None
        except OSError as error:
            raise _StartFailed(f"cannot start: {_reason(error)}") from None
        await stop.wait()
    finally:
        await router.stop()


def main(argv: list[str] | None = None) -> None:
    settings, exposed = settings_from_argv("router", __doc__, argv)
    setup_logging(debug=settings.debug, structured=settings.telemetry.structured_logs)
    if exposed:
        logging.getLogger("router").warning("%s", INSECURE_LISTEN_WARNING)
    for warning in settings.warnings:
        logging.getLogger("router.config").warning("%s", warning)
    if settings.config_path is None:
        from router.embedded.demo import ensure_demo_models

        try:
            ensure_demo_models()
        except OSError as error:
            sys.exit(f"router: cannot write the demo models: {_reason(error)}")
        logging.getLogger("router").info("no config file: serving the built-in demo models")
    try:
        asyncio.run(_run(settings))
    except _StartFailed as error:
        sys.exit(f"router: {error}")


if __name__ == "__main__":
    main()
