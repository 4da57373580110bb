"""The HTTP shim (``dcache http``): JSON and raw bytes over HTTP, through ``dcache.Client``.

``Shim`` holds the routes, served by a lean HTTP/1.1 protocol on httptools
(``_wire``); ``HttpDaemon`` runs them through ``dcache.daemon.serve`` like
every role (``run_http``, ``serve_http``); ``--workers N`` runs N of them on
one port (``workers``). Routes and errors: ``docs/HTTP.md``; schema:
``docs/openapi.yaml``.
"""

from collections.abc import Callable

from ..config import HttpConfig
from .app import Shim
from .server import HttpDaemon, run_one, serve_http

__all__ = ["Shim", "HttpDaemon", "run_http", "serve_http"]


def run_http(config: HttpConfig, setup_logging: Callable[[], None] | None = None) -> int:
    """Blocking entry point used by the CLI: one process, or a parent and ``config.workers`` workers.

    ``setup_logging`` is run first in each worker (a picklable callable: the CLI's logging set-up).
    """
    if config.workers > 1:
        from .workers import run_workers

        return run_workers(config, setup_logging)
    return run_one(config)
