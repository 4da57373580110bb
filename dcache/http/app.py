"""The HTTP shim: an aiohttp app that maps HTTP requests onto ``dcache.Client`` calls.

Routes (``docs/HTTP.md`` and ``docs/openapi.yaml`` are the reference):

* ``POST /data`` (JSON ``{"key", "value", "ttl"?}``), ``GET``/``DELETE /data/{key}``,
  ``PUT /data/{key}`` (raw bytes, ``?ttl=``), ``GET /data/{key}`` with
  ``Accept: application/octet-stream`` (raw bytes);
* legacy ``GET /api/get/{key}`` and ``POST /api/post?key=&value=``;
* ``/health``, ``/metrics``, ``/openapi.yaml``.

Every error is JSON ``{"error": message}`` (plus ``"key"`` where one is
known) with a status that says whose fault it is: 4xx for the request,
502 for an error answered by the cluster, 503 when no master is reachable,
504 on timeout, 500 (logged) for a bug in the shim.

JSON carries values as text, so a stored value that is not valid UTF-8 is
refused to a JSON client with 406 (and a hint to ask for
``application/octet-stream``) rather than mangled or base64-encoded.

State lives on the app under ``AppKey``s; ``cleanup_ctx`` owns the one
failover ``Client`` over all masters (plus one single-endpoint client per
master for ``/health``, which must say *which* masters answer, something the
failover client hides).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..client import MAX_TTL_S, Client
from ..config import HttpConfig
from ..errors import (
    AuthError,
    BadArgumentsError,
    ClientError,
    FrameTooLargeError,
    HandshakeError,
    KeyTooLargeError,
    NoAvailableNodeError,
    OutOfMemoryError,
    ServerError,
    UnavailableError,
    UpstreamTimeoutError,
    ValueTooLargeError,
)
from ._metrics import HttpMetrics

__all__ = ["create_app", "CONFIG_KEY", "CLIENT_KEY", "HEALTH_CLIENTS_KEY", "METRICS_KEY", "REGISTRY_KEY", "OPENAPI_PATH"]

log = logging.getLogger("dcache.http")

CONFIG_KEY = web.AppKey("config", HttpConfig)
CLIENT_KEY = web.AppKey("client", Client)
HEALTH_CLIENTS_KEY: web.AppKey[dict[str, Client]] = web.AppKey("health_clients")
METRICS_KEY = web.AppKey("metrics", HttpMetrics)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
_OPENAPI_KEY: web.AppKey[bytes | None] = web.AppKey("openapi")

#: The OpenAPI document served at ``/openapi.yaml`` (a link to ``docs/openapi.yaml``).
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")

#: Longest value accepted in the query string of the legacy ``POST /api/post``.
MAX_QUERY_VALUE_CHARS = 4096

_JSON = "application/json"
_OCTETS = "application/octet-stream"
_BODY_FIELDS = frozenset({"key", "value", "ttl"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """An error answered as ``{"error": message, **extra}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def _fail(status: int, message: str, **extra: Any) -> NoReturn:
    raise HttpError(status, message, **extra)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


# -- middleware: errors as JSON, metrics ------------------------------------------


def _from_cluster_error(exc: BaseException) -> tuple[int, str] | None:
    """Status and message for an error raised by the client, or None if it is not one."""
    if isinstance(exc, (TimeoutError, UpstreamTimeoutError)):
        return 504, "the cluster did not answer in time"
    if isinstance(exc, (NoAvailableNodeError, UnavailableError)):
        return 503, f"no dcache master is reachable ({exc})" if isinstance(exc, NoAvailableNodeError) else f"cluster unavailable: {exc}"
    if isinstance(exc, (KeyTooLargeError, BadArgumentsError)):
        return 400, str(exc)
    if isinstance(exc, (ValueTooLargeError, FrameTooLargeError, OutOfMemoryError)):
        return 413, f"value too large: {exc}"
    if isinstance(exc, (AuthError, HandshakeError)):
        return 502, f"the cluster refused the shim: {exc}"
    if isinstance(exc, ServerError):
        return 502, f"cluster error: {exc}"
    if isinstance(exc, (ClientError, OSError)):  # PoolClosedError during shutdown, a reset connection
        return 503, f"cluster connection failed: {exc or exc.__class__.__name__}"
    return None


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    if exc.status == 404:
        message = f"no route for {request.method} {request.path}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed on {request.path} (allowed: {exc.headers.get('Allow', '')})"
    elif exc.text and not exc.text.startswith(f"{exc.status}:"):
        message = exc.text
    else:
        message = exc.reason
    return _error_response(exc.status, message, headers)


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except HttpError as exc:
        response = _error_response(exc.status, exc.message, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _from_http_exception(request, exc)
    except Exception as exc:
        mapped = _from_cluster_error(exc)
        if mapped is None:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            response = _error_response(500, "internal error in the HTTP shim (logged)")
        else:
            response = _error_response(*mapped)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS_KEY].observe(request.method, route, response.status, time.perf_counter() - start)
    return response


# -- request parsing ------------------------------------------------------------------


def _key_bytes(request: web.Request, key: str, *, in_url: bool) -> bytes:
    """The key as UTF-8; 400 if empty or not encodable, 414 (URL) or 400 (body) if too long."""
    if not key:
        _fail(400, "key must not be empty")
    try:
        raw = key.encode()
    except UnicodeEncodeError:
        _fail(400, "key must be valid Unicode text (no lone surrogates)")
    limit = request.app[CONFIG_KEY].max_key_bytes
    if len(raw) > limit:
        _fail(414 if in_url else 400, f"key is {len(raw)} bytes of UTF-8; the limit is {limit}")
    return raw


def _path_key(request: web.Request) -> tuple[str, bytes]:
    key = request.match_info["key"]
    return key, _key_bytes(request, key, in_url=True)


def _check_ttl(ttl: object) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        _fail(400, f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not 0 < ttl <= MAX_TTL_S:  # also refuses NaN and infinities
        _fail(400, f"ttl must be > 0 and at most {MAX_TTL_S} seconds")
    return float(ttl)


def _query_ttl(request: web.Request) -> float | None:
    text = request.query.get("ttl")
    if text is None:
        return None
    try:
        ttl = float(text)
    except ValueError:
        _fail(400, f"ttl must be a number of seconds, got {text!r}")
    if not math.isfinite(ttl):
        _fail(400, "ttl must be a finite number of seconds")
    return _check_ttl(ttl)


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # 413 (HTTPRequestEntityTooLarge) above client_max_size
    if not raw.strip():
        _fail(400, "the request body must be a JSON object")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _fail(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(doc, dict):
        _fail(400, f"the request body must be a JSON object, not {type(doc).__name__}")
    return doc


def _text_bytes(value: str, what: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        _fail(400, f"{what} must be valid Unicode text (no lone surrogates)")


def _wants_octets(request: web.Request) -> bool:
    """Whether Accept prefers ``application/octet-stream`` over JSON (ties go to JSON)."""
    accept = request.headers.get("Accept", "")
    if _OCTETS not in accept.lower():
        return False
    q_octets = q_json = 0.0
    for part in accept.split(","):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, val = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if media == _OCTETS:
            q_octets = max(q_octets, q)
        elif media == _JSON:
            q_json = max(q_json, q)
    return q_octets > 0 and q_octets > q_json


def _json_value(key: str, value: bytes) -> web.Response:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        _fail(
            406,
            "the value is not valid UTF-8 text, so it cannot be sent as JSON; request it with 'Accept: application/octet-stream'",
            key=key,
        )
    return web.json_response({"key": key, "value": text})


# -- handlers -------------------------------------------------------------------------


async def _post_data(request: web.Request) -> web.Response:
    doc = await _json_object(request)
    unknown = sorted(set(doc) - _BODY_FIELDS)
    if unknown:
        _fail(400, f"unknown field(s): {', '.join(map(repr, unknown))}; expected key, value and optionally ttl")
    key = doc.get("key")
    if not isinstance(key, str):
        _fail(400, "field 'key' is required and must be a string" if key is None else f"'key' must be a string, not {type(key).__name__}")
    key_bytes = _key_bytes(request, key, in_url=False)
    value = doc.get("value")
    if not isinstance(value, str):
        _fail(
            400,
            "field 'value' is required and must be a string" if value is None else f"'value' must be a string, not {type(value).__name__}",
        )
    value_bytes = _text_bytes(value, "value")
    ttl = _check_ttl(doc["ttl"]) if "ttl" in doc else None
    await request.app[CLIENT_KEY].set(key_bytes, value_bytes, ttl=ttl)
    return web.json_response({"key": key, "value": value}, status=201)


async def _get_data(request: web.Request) -> web.Response:
    key, key_bytes = _path_key(request)
    value = await request.app[CLIENT_KEY].get(key_bytes)
    if value is None:
        _fail(404, "not found", key=key)
    if _wants_octets(request):
        return web.Response(body=value, content_type=_OCTETS)
    return _json_value(key, value)


async def _put_data(request: web.Request) -> web.Response:
    key, key_bytes = _path_key(request)
    ttl = _query_ttl(request)
    value = await request.read()  # 413 above client_max_size
    await request.app[CLIENT_KEY].set(key_bytes, value, ttl=ttl)
    return web.json_response({"key": key, "size": len(value)}, status=201)


async def _delete_data(request: web.Request) -> web.Response:
    key, key_bytes = _path_key(request)
    deleted = await request.app[CLIENT_KEY].delete(key_bytes)
    return web.json_response({"key": key, "deleted": deleted})


async def _legacy_get(request: web.Request) -> web.Response:
    key, key_bytes = _path_key(request)
    value = await request.app[CLIENT_KEY].get(key_bytes)
    if value is None:
        _fail(404, "not found", key=key)
    return _json_value(key, value)


async def _legacy_post(request: web.Request) -> web.Response:
    key = request.query.get("key")
    value = request.query.get("value")
    if key is None or value is None:
        _fail(400, "query parameters 'key' and 'value' are required")
    key_bytes = _key_bytes(request, key, in_url=True)
    if len(value) > MAX_QUERY_VALUE_CHARS:
        _fail(400, f"a value in the query string is limited to {MAX_QUERY_VALUE_CHARS} characters; use POST /data or PUT /data/{{key}}")
    value_bytes = _text_bytes(value, "value")
    ttl = _query_ttl(request)
    await request.app[CLIENT_KEY].set(key_bytes, value_bytes, ttl=ttl)
    return web.json_response({"key": key, "value": value}, status=201)


async def _ping(client: Client) -> bool:
    try:
        await client.ping()
    except (ClientError, ServerError, OSError, TimeoutError):
        return False
    return True


async def _health(request: web.Request) -> web.Response:
    clients = request.app[HEALTH_CLIENTS_KEY]
    answers = await asyncio.gather(*(_ping(c) for c in clients.values()))
    masters = dict(zip(clients, answers, strict=True))
    if any(answers):
        return web.json_response({"status": "ok", "masters": masters})
    return web.json_response({"status": "unavailable", "error": "no dcache master answers PING", "masters": masters}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _openapi(request: web.Request) -> web.Response:
    spec = request.app[_OPENAPI_KEY]
    if spec is None:
        _fail(404, "openapi.yaml is not installed with this copy of dcache")
    return web.Response(body=spec, content_type="application/yaml")


# -- the app --------------------------------------------------------------------------


async def _clients(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    common: dict[str, Any] = {"auth_token": config.auth_token, "client_name": "dcache-http"}
    app[CLIENT_KEY] = Client(list(config.master), timeout=config.timeout, connect_timeout=min(config.timeout, 2.0), **common)
    app[HEALTH_CLIENTS_KEY] = {
        m: Client(
            m,
            timeout=config.health_timeout,
            connect_timeout=config.health_timeout,
            min_connections=0,
            max_connections=1,
            retries=0,
            **common,
        )
        for m in config.master
    }
    try:
        yield
    finally:
        await app[CLIENT_KEY].close()
        for client in app[HEALTH_CLIENTS_KEY].values():
            await client.close()


def create_app(config: HttpConfig) -> web.Application:
    """Build the shim's aiohttp application.

    The dcache clients are created when the app starts (``cleanup_ctx``)
    and closed when it stops, so the app must run under an ``AppRunner``
    (or ``web.run_app``, or a test server) on the loop that serves it.

    Args:
        config: the shim's settings; ``client_max_size`` bounds request bodies.

    Returns:
        The application, not yet started.
    """
    app = web.Application(client_max_size=config.client_max_size, middlewares=[_middleware])
    app[CONFIG_KEY] = config
    metrics = HttpMetrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    app[METRICS_KEY] = metrics
    app[REGISTRY_KEY] = registry
    try:
        app[_OPENAPI_KEY] = OPENAPI_PATH.read_bytes()
    except OSError:
        app[_OPENAPI_KEY] = None
    app.cleanup_ctx.append(_clients)
    r = app.router
    r.add_post("/data", _post_data)
    r.add_get("/data/{key:.+}", _get_data, allow_head=False)
    r.add_put("/data/{key:.+}", _put_data)
    r.add_delete("/data/{key:.+}", _delete_data)
    r.add_get("/api/get/{key:.+}", _legacy_get, allow_head=False)
    r.add_post("/api/post", _legacy_post)
    r.add_get("/health", _health, allow_head=False)
    r.add_get("/metrics", _metrics, allow_head=False)
    r.add_get("/openapi.yaml", _openapi, allow_head=False)
    return app
