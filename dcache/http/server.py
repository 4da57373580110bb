"""The HTTP shim as a daemon: ``HttpDaemon``, run by ``dcache.daemon.serve`` like every role.

``serve`` gives it the same lifecycle as the aux nodes and masters: the
``READY host:port`` line, SIGTERM/SIGINT handled at the edge, and a graceful
stop (``close``: stop accepting, let requests in flight finish within
``shutdown_grace``, then close the dcache clients). The shim serves its own
``/metrics``, so it needs no separate metrics port.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client.registry import Collector

from ..address import format_address
from ..client import Client
from ..config import HttpConfig
from ..daemon import run, serve
from ..net import protected_mode
from .app import HEALTH_CLIENTS_KEY, METRICS_KEY, create_app

__all__ = ["HttpDaemon", "serve_http", "run_http"]

log = logging.getLogger("dcache.http")

#: Longest request line read. aiohttp's default (8190) would refuse a long key or
#: legacy query value with a plain-text 400 from the parser, before the app can
#: answer its JSON 414/400: a 1024-character key percent-encodes to up to 12 KiB,
#: a 4096-character legacy value to 48 KiB.
MAX_REQUEST_LINE_BYTES = 128 * 1024


class HttpDaemon:
    """The shim's app and its listener, for ``dcache.daemon.serve``.

    Args:
        config: the shim's settings.
    """

    __slots__ = ("config", "tls", "app", "_runner")

    role = "http"
    node_id = "shim"

    def __init__(self, config: HttpConfig) -> None:
        """Raises ``ConfigError`` if a TLS file of ``config`` cannot be read or is not what it should be."""
        self.config = config
        #: HTTPS on the listener (``tls.server``), TLS to the masters (``tls.peer``); SIGHUP reloads them.
        self.tls = config.tls()
        self.app = create_app(config, tls=self.tls)
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Start the app (its dcache clients too) and listen; return ``host:port``.

        Raises:
            ConfigError: ``--host`` reaches beyond this machine without
                ``--http-token`` (protected mode), unless ``--insecure``.
        """
        config = self.config
        protected_mode(config.host, config.http_token is not None, config.insecure, "HTTP shim", "--http-token")
        # Access lines only at debug level: `dcache cluster` shares its terminal with the shim.
        access_log = logging.getLogger("aiohttp.access") if config.log_level.lower() == "debug" else None
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=access_log,
            shutdown_timeout=config.shutdown_grace,
            max_line_size=MAX_REQUEST_LINE_BYTES,
        )
        await runner.setup()
        https = self.tls.server if self.tls is not None else None
        try:
            await web.TCPSite(runner, config.host, config.port, ssl_context=https).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        log.info("http shim in front of masters %s", ",".join(config.master))
        if self.tls is not None:
            log.info(
                "TLS: %s%s; %s",
                "HTTPS on the listener" if https is not None else "plain HTTP on the listener",
                ", TLS to the masters" if self.tls.peer is not None else ", plain TCP to the masters",
                self.tls.describe(),
            )
        await self._check_masters()
        return format_address(host, port)

    async def _check_masters(self) -> None:
        """Warn about each master that does not answer a PING now (``--health-timeout`` each, in parallel).

        The shim starts all the same: its client keeps trying, and requests
        are answered 503 until a master answers (``/health`` says which do).
        """
        clients = self.app[HEALTH_CLIENTS_KEY]

        async def ping(client: Client) -> str | None:
            try:
                await client.ping()
            except Exception as exc:
                root: BaseException = exc
                while root.__cause__ is not None:
                    root = root.__cause__
                return f"{root.__class__.__name__}: {root}" if str(root) else root.__class__.__name__
            return None

        failures = await asyncio.gather(*(ping(c) for c in clients.values()))
        down = {m: why for m, why in zip(clients, failures, strict=True) if why is not None}
        for master, why in down.items():
            log.warning("master %s does not answer (%s)", master, why)
        if len(down) == len(clients):
            log.warning("no master answers: the shim answers 503 until one does, and keeps trying (check --master %s)", ",".join(clients))

    def collector(self) -> Collector:
        """The shim's metrics (also served at its own ``/metrics``)."""
        return self.app[METRICS_KEY]

    async def before_close(self, sig: int, again: asyncio.Event) -> None:
        """Nothing to do before stopping: requests in flight finish in ``close``."""

    async def close(self) -> None:
        """Stop accepting, let requests finish (up to ``shutdown_grace`` seconds), close the dcache clients (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def serve_http(config: HttpConfig, *, ready: bool = True) -> None:
    """Serve the shim until SIGTERM or SIGINT, then stop gracefully (``dcache.daemon.serve``)."""
    await serve(HttpDaemon(config), host=config.host, metrics_port=None, ready=ready)


def run_http(config: HttpConfig) -> int:
    """Blocking entry point used by the CLI."""
    return run(lambda: HttpDaemon(config), host=config.host, metrics_port=None)
