"""The HTTP shim (``dcache http``): JSON and raw bytes over HTTP, through ``dcache.Client``.

``create_app`` builds the aiohttp application; ``HttpDaemon`` runs it
through ``dcache.daemon.serve`` like every role (``run_http``, ``serve_http``).
Routes and errors: ``docs/HTTP.md``; schema: ``docs/openapi.yaml``.
"""

from .app import CLIENT_KEY, CONFIG_KEY, METRICS_KEY, REGISTRY_KEY, create_app
from .server import HttpDaemon, run_http, serve_http

__all__ = ["create_app", "HttpDaemon", "run_http", "serve_http", "CONFIG_KEY", "CLIENT_KEY", "METRICS_KEY", "REGISTRY_KEY"]
