"""Run the HTTP shim: listen, print ``READY host:port``, stop gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from ..address import format_address
from ..config import HttpConfig
from .app import create_app

__all__ = ["serve_http", "run_http"]

log = logging.getLogger("dcache.http")

#: Longest request line read. aiohttp's default (8190) would refuse a long key or
#: legacy query value with a plain-text 400 from the parser, before the app can
#: answer its JSON 414/400: a 1024-character key percent-encodes to up to 12 KiB,
#: a 4096-character legacy value to 48 KiB.
MAX_REQUEST_LINE_BYTES = 128 * 1024


async def serve_http(config: HttpConfig, *, ready: bool = True) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, let requests finish
    (up to ``shutdown_grace`` seconds) and close the dcache clients."""
    app = create_app(config)
    # Access lines only at debug level: `dcache cluster` shares its terminal with the shim.
    access_log = logging.getLogger("aiohttp.access") if config.log_level.lower() == "debug" else None
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=access_log,
        shutdown_timeout=config.shutdown_grace,
        max_line_size=MAX_REQUEST_LINE_BYTES,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host, port = runner.addresses[0][:2]
        where = format_address(host, port)
        log.info("http shim listening on %s, masters %s", where, ",".join(config.master))
        if ready:
            print(f"READY {where}", flush=True)
        await stop.wait()
        log.info("http shim shutting down")
    finally:
        await runner.cleanup()


def run_http(config: HttpConfig) -> int:
    """Blocking entry point used by the CLI."""
    import uvloop

    uvloop.run(serve_http(config))
    return 0
