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

Hot path
--------
The shim is CPU-bound in one process, so per-request work is kept to what
the request needs (measured in ``docs/BENCHMARKS.md``, reasons in
``docs/DECISIONS.md``):

* no aiohttp middleware (its chain cost about 7% of GET throughput): each
  route's handler is wrapped once, at start, in ``_Shim.endpoint`` (errors
  as JSON, metrics under a route label fixed at registration), and
  ``GET /data/{key}`` does the same inline; a catch-all route answers
  unmatched paths and methods (JSON 404/405, as aiohttp would, with ``Allow``);
* answers are JSON text built from C-escaped strings
  (``json.encoder.encode_basestring_ascii``, the escaping ``json.dumps``
  uses, so the bytes are the same) and sent as ``bytes`` with a prepared
  header set, not through ``web.json_response``;
* the key reads of one loop iteration go to the cluster as one MGET
  (``dcache.client.GetBatcher``; ``--read-batch``), which saves most of a
  client call per GET;
* the handlers are methods of one ``_Shim`` that holds the clients, the
  config and the metrics, so there is no ``request.app[...]`` lookup per
  request.

State also lives on the app under ``AppKey``s (for tools and tests).
``cleanup_ctx`` owns the failover ``Client`` over all masters, a second one
for the batched reads (so that an answer too large for one frame only
disturbs batched reads, which fall back key by key on the first), and one
single-endpoint client per master for ``/health``, which must say *which*
masters answer, something the failover client hides. All of them are built
from one ``ClientConfig`` derived from the ``HttpConfig`` (``client_configs``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from json.encoder import encode_basestring_ascii
from pathlib import Path
from ssl import SSLContext
from time import perf_counter
from typing import Any, NoReturn

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..client import MAX_TTL_S, Client, ClientConfig, GetBatcher
from ..config import HttpConfig
from ..errors import (
    AuthError,
    BadArgumentsError,
    ClientError,
    FrameTooLargeError,
    HandshakeError,
    InvalidArgumentError,
    KeyTooLargeError,
    NoAvailableNodeError,
    OutOfMemoryError,
    RemoteProtocolError,
    ServerError,
    UnavailableError,
    UpstreamTimeoutError,
    ValueTooLargeError,
)
from ..tls import TlsContexts
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
#: Headers of every JSON answer (``web.Response`` copies them).
_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}
#: Metrics route label of requests that match no route (or no method of one).
UNMATCHED_ROUTE = "unmatched"
_DATA_KEY_ROUTE = "/data/{key}"

#: ``json.dumps``'s own string escaping (C): ASCII out, non-ASCII as ``\uXXXX``.
_enc: Callable[[str], str] = encode_basestring_ascii

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


def _json_line(obj: Any) -> str:
    """``obj`` as JSON and a newline: every JSON answer ends with one, so ``curl``'s output ends its line."""
    return json.dumps(obj) + "\n"


def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(obj, status=status, headers=headers, dumps=_json_line)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return _json_response({"error": message, **extra}, status, headers)


def _json_text(text: str, status: int = 200) -> web.Response:
    """A JSON answer from JSON text built with ``_enc`` (so ASCII), and the newline every JSON answer ends with."""
    return web.Response(body=(text + "\n").encode(), status=status, headers=_JSON_HEADERS)


def _key_value(key: str, value: str, status: int = 200) -> web.Response:
    """``{"key": key, "value": value}``, the same bytes as ``json.dumps`` of that dict."""
    return _json_text('{"key": ' + _enc(key) + ', "value": ' + _enc(value) + "}", status)


def _not_found(key: str) -> web.Response:
    """``{"error": "not found", "key": key}`` with 404 (a miss is common: no exception for it)."""
    return _json_text('{"error": "not found", "key": ' + _enc(key) + "}", 404)


# -- errors as JSON ------------------------------------------------------------------


def _from_cluster_error(exc: BaseException) -> tuple[int, str] | None:
    """Status and message for an error raised by the client, or None if it is not one."""
    if isinstance(exc, (TimeoutError, UpstreamTimeoutError)):
        return 504, "the cluster did not answer in time"
    if isinstance(exc, (NoAvailableNodeError, UnavailableError)):
        return 503, f"no dcache master is reachable ({exc})" if isinstance(exc, NoAvailableNodeError) else f"cluster unavailable: {exc}"
    if isinstance(exc, (KeyTooLargeError, BadArgumentsError, InvalidArgumentError)):
        return 400, str(exc)
    if isinstance(exc, (ValueTooLargeError, FrameTooLargeError, OutOfMemoryError)):
        return 413, f"value too large: {exc}"
    if isinstance(exc, (AuthError, HandshakeError)):
        return 502, f"the cluster refused the shim: {exc}"
    if isinstance(exc, ServerError):
        return 502, f"cluster error: {exc}"
    if isinstance(exc, RemoteProtocolError):  # the cluster's answer could not be decoded
        return 502, f"bad answer from the cluster: {exc}"
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


def _error_for(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer to an exception a handler raised (a redirect is raised again)."""
    if isinstance(exc, HttpError):
        return _error_response(exc.status, exc.message, **exc.extra)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _from_http_exception(request, exc)
    mapped = _from_cluster_error(exc)
    if mapped is None:
        log.error("unexpected error answering %s %s", request.method, request.path, exc_info=exc)
        return _error_response(500, "internal error in the HTTP shim (logged)")
    return _error_response(*mapped)


# -- request parsing ------------------------------------------------------------------


def _key_bytes(key: str, limit: int, *, in_url: bool) -> bytes:
    """The key as UTF-8; 400 if empty or not encodable, 414 (URL) or 400 (body) if over ``limit`` bytes."""
    if not key:
        _fail(400, "key must not be empty")
    try:
        raw = key.encode()
    except UnicodeEncodeError:
        _fail(400, "key must be valid Unicode text (no lone surrogates)")
    if len(raw) > limit:
        _fail(414 if in_url else 400, f"key is {len(raw)} bytes of UTF-8; the limit is {limit}")
    return raw


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
    accept = request.headers.get("Accept")
    if accept is None or _OCTETS not in accept.lower():
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
    return _key_value(key, text)


async def _ping(client: Client) -> bool:
    try:
        await client.ping()
    except (ClientError, ServerError, OSError, TimeoutError):
        return False
    return True


# -- the shim's clients --------------------------------------------------------------


def client_configs(config: HttpConfig, ssl: SSLContext | None = None) -> tuple[ClientConfig, ClientConfig]:
    """The options of the shim's clients: the failover ones over every master, and the ``/health`` ones.

    ``ssl``: the context of the shim's connections to the masters
    (``TlsContexts.peer``; ``None``: plain TCP).

    Returns:
        ``(main, health)``: ``main`` serves requests (and batched reads);
        ``health`` is for one master each (``replace(health, endpoints=m)``):
        short timeouts, one connection at most, no retries.
    """
    main = ClientConfig(
        config.master,
        timeout=config.timeout,
        connect_timeout=min(config.timeout, 2.0),
        auth_token=config.auth_token,
        client_name="dcache-http",
        ssl=ssl,
    )
    health = replace(
        main,
        timeout=config.health_timeout,
        connect_timeout=config.health_timeout,
        min_connections=0,
        max_connections=1,
        retries=0,
    )
    return main, health


# -- handlers -------------------------------------------------------------------------


class _Shim:
    """The handlers, bound to what they need once, at start (``create_app``, ``clients``)."""

    __slots__ = (
        "config",
        "ssl",
        "max_key_bytes",
        "metrics",
        "observe",
        "registry",
        "openapi",
        "client",
        "health_clients",
        "router",
        "catch_all",
        "read_client",
        "reads",
        "read",
    )

    config: HttpConfig
    #: The context of the connections to the masters (``None``: plain TCP).
    ssl: SSLContext | None
    max_key_bytes: int
    metrics: HttpMetrics
    observe: Callable[[str, str, int, float], None]
    registry: CollectorRegistry
    openapi: bytes | None
    #: Set when the app starts (``clients``); requests are served only after that.
    client: Client
    health_clients: dict[str, Client]
    #: The client the batched reads go over, and the batcher.
    read_client: Client
    reads: GetBatcher
    #: How a handler reads a key: ``reads.get``, or ``client.get`` with ``--read-batch 1``.
    read: Callable[[bytes], Awaitable[bytes | None]]
    router: web.UrlDispatcher
    catch_all: web.AbstractResource | None

    def __init__(
        self, config: HttpConfig, metrics: HttpMetrics, registry: CollectorRegistry, router: web.UrlDispatcher, ssl: SSLContext | None
    ) -> None:
        self.config = config
        self.ssl = ssl
        self.max_key_bytes = config.max_key_bytes
        self.metrics = metrics
        self.observe = metrics.observe
        self.registry = registry
        self.router = router
        self.catch_all = None
        try:
            self.openapi = OPENAPI_PATH.read_bytes()
        except OSError:
            self.openapi = None

    async def clients(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``: open the dcache clients on start, close them on stop."""
        config = self.config
        main, health = client_configs(config, self.ssl)
        self.client = app[CLIENT_KEY] = Client(config=main)
        self.read_client = Client(config=main)
        self.reads = GetBatcher(self.read_client, fallback=self.client, max_keys=config.read_batch, stats=self.metrics.reads)
        self.read = self.reads.get if config.read_batch > 1 else self.client.get
        self.health_clients = app[HEALTH_CLIENTS_KEY] = {
            endpoint: Client(config=replace(health, endpoints=endpoint)) for endpoint in health.endpoints
        }
        try:
            yield
        finally:
            await self.read_client.close()
            await self.client.close()
            await self.reads.close()  # its batches failed fast on the closed clients
            for client in self.health_clients.values():
                await client.close()

    def endpoint(self, route: str, handler: Handler) -> Handler:
        """``handler`` answering errors as JSON and counted in the metrics under ``route``."""
        observe = self.observe

        async def endpoint(request: web.Request) -> web.StreamResponse:
            start = perf_counter()
            response: web.StreamResponse
            try:
                response = await handler(request)
            except Exception as exc:
                response = _error_for(request, exc)
            observe(request.method, route, response.status, perf_counter() - start)
            return response

        return endpoint

    async def get_data(self, request: web.Request) -> web.StreamResponse:
        """``GET /data/{key}``: the hot path, so ``endpoint``'s work is inlined here."""
        start = perf_counter()
        key: str = request.match_info["key"]
        response: web.Response
        try:
            value = await self.read(_key_bytes(key, self.max_key_bytes, in_url=True))
            if value is None:
                response = _not_found(key)
            elif _wants_octets(request):
                response = web.Response(body=value, content_type=_OCTETS)
            else:
                response = _json_value(key, value)
        except Exception as exc:
            response = _error_for(request, exc)
        self.observe("GET", _DATA_KEY_ROUTE, response.status, perf_counter() - start)
        return response

    async def post_data(self, request: web.Request) -> web.Response:
        doc = await _json_object(request)
        unknown = sorted(set(doc) - _BODY_FIELDS)
        if unknown:
            _fail(400, f"unknown field(s): {', '.join(map(repr, unknown))}; expected key, value and optionally ttl")
        key = doc.get("key")
        if not isinstance(key, str):
            _fail(
                400, "field 'key' is required and must be a string" if key is None else f"'key' must be a string, not {type(key).__name__}"
            )
        key_bytes = _key_bytes(key, self.max_key_bytes, in_url=False)
        value = doc.get("value")
        if not isinstance(value, str):
            _fail(
                400,
                "field 'value' is required and must be a string"
                if value is None
                else f"'value' must be a string, not {type(value).__name__}",
            )
        value_bytes = _text_bytes(value, "value")
        ttl = _check_ttl(doc["ttl"]) if "ttl" in doc else None
        await self.client.set(key_bytes, value_bytes, ttl=ttl)
        return _key_value(key, value, 201)

    async def put_data(self, request: web.Request) -> web.Response:
        key: str = request.match_info["key"]
        key_bytes = _key_bytes(key, self.max_key_bytes, in_url=True)
        ttl = _query_ttl(request)
        value = await request.read()  # 413 above client_max_size
        await self.client.set(key_bytes, value, ttl=ttl)
        return _json_text('{"key": ' + _enc(key) + ', "size": ' + str(len(value)) + "}", 201)

    async def delete_data(self, request: web.Request) -> web.Response:
        key: str = request.match_info["key"]
        deleted = await self.client.delete(_key_bytes(key, self.max_key_bytes, in_url=True))
        return _json_text('{"key": ' + _enc(key) + ', "deleted": ' + ("true" if deleted else "false") + "}")

    async def legacy_get(self, request: web.Request) -> web.Response:
        key: str = request.match_info["key"]
        value = await self.read(_key_bytes(key, self.max_key_bytes, in_url=True))
        if value is None:
            return _not_found(key)
        return _json_value(key, value)

    async def legacy_post(self, request: web.Request) -> web.Response:
        key = request.query.get("key")
        value = request.query.get("value")
        if key is None or value is None:
            _fail(400, "query parameters 'key' and 'value' are required")
        key_bytes = _key_bytes(key, self.max_key_bytes, in_url=True)
        if len(value) > MAX_QUERY_VALUE_CHARS:
            _fail(400, f"a value in the query string is limited to {MAX_QUERY_VALUE_CHARS} characters; use POST /data or PUT /data/{{key}}")
        value_bytes = _text_bytes(value, "value")
        ttl = _query_ttl(request)
        await self.client.set(key_bytes, value_bytes, ttl=ttl)
        return _key_value(key, value, 201)

    async def health(self, request: web.Request) -> web.Response:
        clients = self.health_clients
        answers = await asyncio.gather(*(_ping(c) for c in clients.values()))
        masters = dict(zip(clients, answers, strict=True))
        if any(answers):
            return _json_response({"status": "ok", "masters": masters})
        return _json_response({"status": "unavailable", "error": "no dcache master answers PING", "masters": masters}, 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi_yaml(self, request: web.Request) -> web.Response:
        if self.openapi is None:
            _fail(404, "openapi.yaml is not installed with this copy of dcache")
        return web.Response(body=self.openapi, content_type="application/yaml")

    async def unmatched(self, request: web.Request) -> web.Response:
        """The catch-all route: JSON 405 (with ``Allow``) if another route has the path, else JSON 404.

        aiohttp's router answers these itself, in plain text; the methods
        allowed are collected the way it does, by asking every resource.
        """
        allowed: set[str] = set()
        for resource in self.router.resources():
            if resource is not self.catch_all:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            allow = ",".join(sorted(allowed))
            message = f"method {request.method} is not allowed on {request.path} (allowed: {allow})"
            return _error_response(405, message, {"Allow": allow})
        return _error_response(404, f"no route for {request.method} {request.path}")


# -- the app --------------------------------------------------------------------------


class _AnyPath(web.PlainResource):
    """A resource matching every request target, even ``*`` and paths with a newline.

    Registered last, it is where requests no other route takes end up (the
    router tries ``/`` last), so that they too get a JSON error.
    """

    def __init__(self) -> None:
        super().__init__("/")

    def _match(self, path: str) -> dict[str, str] | None:
        return {}

    def raw_match(self, path: str) -> bool:
        return False  # never merged with a route added later for "/"


#: Routes served without ``--http-token`` (probes and scrapers; see docs/SECURITY.md).
OPEN_ROUTES = frozenset({"/health", "/metrics"})


def _bearer(token: str) -> Any:
    """Middleware: every request but ``OPEN_ROUTES`` must carry ``Authorization: Bearer <token>`` (else 401)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_ROUTES:
            got = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, expected):
                return _error_response(
                    401, "send 'Authorization: Bearer <token>' (the shim's --http-token)", {"WWW-Authenticate": "Bearer"}
                )
        return await handler(request)

    return bearer


def create_app(config: HttpConfig, *, tls: TlsContexts | None = None) -> web.Application:
    """Build the shim's aiohttp application.

    The dcache clients are created when the app starts (``cleanup_ctx``)
    and closed when it stops, so the app must run under an ``AppRunner``
    (or ``web.run_app``, or a test server) on the loop that serves it.

    Args:
        config: the shim's settings; ``client_max_size`` bounds request bodies.
        tls: the shim's TLS contexts (``HttpConfig.tls()``): the clients
            speak TLS to the masters with ``tls.peer``. Default: built from
            ``config``.

    Returns:
        The application, not yet started.

    Raises:
        ConfigError: a TLS file of ``config`` cannot be read or is not what it should be.
    """
    if tls is None:
        tls = config.tls()
    middlewares = [_bearer(config.http_token)] if config.http_token is not None else []
    app = web.Application(client_max_size=config.client_max_size, middlewares=middlewares)
    metrics = HttpMetrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    shim = _Shim(config, metrics, registry, app.router, tls.peer if tls is not None else None)
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics
    app[REGISTRY_KEY] = registry
    app[_OPENAPI_KEY] = shim.openapi
    app.cleanup_ctx.append(shim.clients)
    r = app.router
    ep = shim.endpoint
    # GET /data/{key} first: the router tries the resources under "/data" in order.
    r.add_get("/data/{key:.+}", shim.get_data, allow_head=False)
    r.add_put("/data/{key:.+}", ep(_DATA_KEY_ROUTE, shim.put_data))
    r.add_delete("/data/{key:.+}", ep(_DATA_KEY_ROUTE, shim.delete_data))
    r.add_post("/data", ep("/data", shim.post_data))
    r.add_get("/api/get/{key:.+}", ep("/api/get/{key}", shim.legacy_get), allow_head=False)
    r.add_post("/api/post", ep("/api/post", shim.legacy_post))
    r.add_get("/health", ep("/health", shim.health), allow_head=False)
    r.add_get("/metrics", ep("/metrics", shim.metrics_text), allow_head=False)
    r.add_get("/openapi.yaml", ep("/openapi.yaml", shim.openapi_yaml), allow_head=False)
    # Last: whatever no route above matches.
    catch_all = shim.catch_all = _AnyPath()
    r.register_resource(catch_all)
    catch_all.add_route("*", ep(UNMATCHED_ROUTE, shim.unmatched))
    return app
