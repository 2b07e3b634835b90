"""``python -m router``: the gRPC router process."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from router.config import INSECURE_LISTEN_WARNING, Settings, settings_from_argv
from router.logs import setup_logging
from router.pool.registry import StateDirInUse
from router.server import ListenError, serve


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def main(argv: list[str] | None = None) -> None:
    settings, exposed = settings_from_argv("router", __doc__, argv)
    setup_logging(debug=settings.debug, structured=settings.telemetry.structured_logs)
    if exposed:
        logging.getLogger("router").warning("%s", INSECURE_LISTEN_WARNING)
    for warning in settings.warnings:
        logging.getLogger("router.config").warning("%s", warning)
    if settings.config_path is None:
        from router.embedded.demo import ensure_demo_models

        ensure_demo_models()
        logging.getLogger("router").info("no config file: serving the built-in demo models")
    try:
        asyncio.run(_run(settings))
    except (ListenError, StateDirInUse) as error:
        sys.exit(f"router: {error}")


if __name__ == "__main__":
    main()
