"""``python -m router``: the gRPC router process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from router.config import ConfigError, Settings, load_settings
from router.logs import setup_logging
from router.pool.registry import StateDirInUse
from router.server import ListenError, serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument(
        "-c", "--config", type=Path, help="config.json (else CONFIG_PATH, ./config.json, demo)"
    )
    parser.add_argument(
        "--insecure-listen",
        action="store_true",
        help="allow a non-loopback address with no API keys configured",
    )
    return parser.parse_args(argv)


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        exposed = settings.check_listen_safety(args.insecure_listen)
    except ConfigError as error:
        sys.exit(f"router: configuration error:\n{error}")
    setup_logging(debug=settings.debug, structured=settings.telemetry.structured_logs)
    if exposed:
        logging.getLogger("router").warning(
            "--insecure-listen: serving a non-loopback address with no API keys; anyone who "
            "can reach it can use and manage every model"
        )
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
