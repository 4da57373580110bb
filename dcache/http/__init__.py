"""The HTTP shim (``dcache http``): JSON and raw bytes over HTTP, through ``dcache.Client``.

``create_app`` builds the aiohttp application; ``run_http`` serves it.
Routes and errors: ``docs/HTTP.md``; schema: ``docs/openapi.yaml``.
"""

from .app import CLIENT_KEY, CONFIG_KEY, METRICS_KEY, REGISTRY_KEY, create_app
from .server import run_http, serve_http

__all__ = ["create_app", "run_http", "serve_http", "CONFIG_KEY", "CLIENT_KEY", "METRICS_KEY", "REGISTRY_KEY"]
