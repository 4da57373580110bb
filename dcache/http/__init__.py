"""The HTTP shim (``dcache http``): JSON and raw bytes over HTTP, through ``dcache.Client``.

``Shim`` holds the routes, served by a lean HTTP/1.1 protocol on httptools
(``_wire``); ``HttpDaemon`` runs them through ``dcache.daemon.serve`` like
every role (``run_http``, ``serve_http``); ``--workers N`` runs N of them on
one port (``workers``). Routes and errors: ``docs/HTTP.md``; schema:
``docs/openapi.yaml``.
"""

from .app import Shim
from .server import HttpDaemon, run_http, serve_http

__all__ = ["Shim", "HttpDaemon", "run_http", "serve_http"]
