"""``python -m facade``: the OpenAI REST/SSE and admin REST process in front of the router."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys

from aiohttp import web

from facade.app import create_app
from facade.tls import server_ssl_context
from router.config import INSECURE_LISTEN_WARNING, Settings, settings_from_argv
from router.logs import setup_logging
from router.telemetry.tracing import setup_tracing

_LOGGER = logging.getLogger("facade")
# Streams are ended on shutdown, so what is left to wait for is short requests.
_SHUTDOWN_TIMEOUT_SEC = 5.0
# Spans still buffered at exit get this long to reach an unreachable collector.
_TRACE_FLUSH_TIMEOUT_MS = 5000


class _ListenError(Exception):
    """The facade could not bind its address; the message is one line for the operator."""


async def serve(settings: Settings, ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (over HTTPS with `ssl_context`).

    This is `web.run_app` minus its signal handling: run_app raises on every signal, so a
    second one (Ctrl-C, then `make run` sending TERM) would cut the graceful stop short.
    """
    tracer_provider = setup_tracing("routermodel-facade", settings.telemetry.otlp_endpoint)
    runner = web.AppRunner(
        create_app(settings, tracer_provider=tracer_provider),
        handler_cancellation=True,  # a client that disconnects cancels its router call
        shutdown_timeout=_SHUTDOWN_TIMEOUT_SEC,
        # One line per request is noise at thousands of requests a second; DEBUG turns it on.
        access_log=logging.getLogger("aiohttp.access") if settings.debug else None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.api.host, settings.api.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as error:  # e.g. the port is taken: one line, as the router says it
            where = f"{settings.api.host}:{settings.api.port}"
            raise _ListenError(f"cannot listen on {where}: {error.strerror or error}") from None
        scheme = "http" if ssl_context is None else "https"
        _LOGGER.info("facade serving on %s://%s:%d", scheme, settings.api.host, settings.api.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _LOGGER.info("facade stopping")
    finally:
        await runner.cleanup()
        if tracer_provider is not None:
            await asyncio.to_thread(tracer_provider.force_flush, _TRACE_FLUSH_TIMEOUT_MS)
            await asyncio.to_thread(tracer_provider.shutdown)


def main(argv: list[str] | None = None) -> None:
    settings, exposed = settings_from_argv("facade", __doc__, argv)
    setup_logging(debug=settings.debug, structured=settings.telemetry.structured_logs)
    if settings.debug:  # setup_logging quiets the access log, which DEBUG turns on here
        logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    if settings.grpc.port == 0:
        sys.exit(
            "facade: grpc.port is 0, which lets the router take any free port, one the facade "
            "cannot know: set the port the router listens on"
        )
    if exposed:
        _LOGGER.warning("%s", INSECURE_LISTEN_WARNING)
    ssl_context = None
    if settings.api.tls is not None:
        try:
            ssl_context = server_ssl_context(settings.api.tls)
        except (ssl.SSLError, OSError) as error:
            sys.exit(f"facade: cannot use api.tls: {error}")
    try:
        asyncio.run(serve(settings, ssl_context))
    except _ListenError as error:
        sys.exit(f"facade: {error}")


if __name__ == "__main__":
    main()
