"""``python -m facade``: the OpenAI REST/SSE and admin REST process in front of the router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from facade.app import create_app
from router.config import ConfigError, Settings, load_settings

_LOGGER = logging.getLogger("facade")
# Streams are ended on shutdown, so what is left to wait for is short requests.
_SHUTDOWN_TIMEOUT_SEC = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m facade", description=__doc__)
    parser.add_argument(
        "-c", "--config", type=Path, help="config.json (else CONFIG_PATH, ./config.json, demo)"
    )
    parser.add_argument(
        "--insecure-listen",
        action="store_true",
        help="allow a non-loopback address with no API keys configured",
    )
    return parser.parse_args(argv)


async def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully.

    This is `web.run_app` minus its signal handling: run_app raises on every signal, so a
    second one (Ctrl-C, then `make run` sending TERM) would cut the graceful stop short.
    """
    runner = web.AppRunner(
        create_app(settings),
        handler_cancellation=True,  # a client that disconnects cancels its router call
        shutdown_timeout=_SHUTDOWN_TIMEOUT_SEC,
        # One line per request is noise at thousands of requests a second; DEBUG turns it on.
        access_log=logging.getLogger("aiohttp.access") if settings.debug else None,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.api.host, settings.api.port).start()
        _LOGGER.info("facade serving on http://%s:%d", settings.api.host, settings.api.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _LOGGER.info("facade stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        settings.check_listen_safety(args.insecure_listen)
    except ConfigError as error:
        sys.exit(f"facade: configuration error:\n{error}")
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
