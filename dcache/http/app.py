"""The HTTP shim's routes: HTTP requests mapped onto ``dcache.Client`` calls.

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
The shim is CPU-bound, so per-request work is kept to what the request
needs (measured in ``docs/BENCHMARKS.md``, reasons in ``docs/DECISIONS.md``):

* HTTP is ``_wire.HttpProtocol`` (httptools' C parser, answers from
  prepared bytes), not a framework: ``Shim.dispatch`` gets each parsed
  request, matches its path with a few string tests and answers, counting
  it in the metrics under a fixed route label;
* ``GET /data/{key}`` is answered by the batched read itself, which
  delivers the value to a ``_Read`` (``GetBatcher.get_into``), and the
  writes (``POST /data``, ``PUT /data/{key}``, ``POST /api/post``) by the
  batched write, which delivers to a ``_Write`` (``SetBatcher.set_into``):
  no future and no task per request; the other routes run as one task each;
* answers are JSON text built from C-escaped strings
  (``json.encoder.encode_basestring_ascii``, the escaping ``json.dumps``
  uses, so the bytes are the same), or for ``POST /data`` with a plain
  ASCII body from the key and value as they are (``_posted``: nothing in
  them needs escaping), and ``POST /data`` reads its body with the JSON
  decoder's C scanner alone (``_json_object``);
* the key reads of one loop iteration go to the cluster as one MGET
  (``dcache.client.GetBatcher``; ``--read-batch``), and its writes as one
  MSET per TTL (``dcache.client.SetBatcher``; ``--write-batch``).

``Shim.start`` opens the failover ``Client`` over all masters, a second one
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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from functools import partial
from json.encoder import encode_basestring_ascii
from pathlib import Path
from ssl import SSLContext
from time import perf_counter
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote_to_bytes

import httptools

from ..client import MAX_TTL_S, Client, ClientConfig, GetBatcher, SetBatcher, Sink
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
from ._metrics import HttpMetrics
from ._wire import JSON_CONTENT_TYPE, Request, Response

__all__ = ["Shim", "client_configs", "OPENAPI_PATH", "OPEN_ROUTES", "UNMATCHED_ROUTE", "MAX_QUERY_VALUE_CHARS"]

log = logging.getLogger("dcache.http")

#: The OpenAPI document served at ``/openapi.yaml`` (a link to ``docs/openapi.yaml``).
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")

#: Longest value accepted in the query string of the legacy ``POST /api/post``.
MAX_QUERY_VALUE_CHARS = 4096

_JSON = "application/json"
_OCTETS = "application/octet-stream"
_BODY_FIELDS = frozenset({"key", "value", "ttl"})
#: Metrics route label of requests that match no route (or no method of one), and of those the protocol refused.
UNMATCHED_ROUTE = "unmatched"
_DATA_KEY_ROUTE = "/data/{key}"
_LEGACY_GET_ROUTE = "/api/get/{key}"
#: Routes served without ``--http-token`` (probes and scrapers; see docs/SECURITY.md).
OPEN_ROUTES = frozenset({"/health", "/metrics"})
#: Methods allowed on each fixed path (the ``Allow`` header of a 405).
_FIXED_ROUTES = {"/data": "POST", "/api/post": "POST", "/health": "GET", "/metrics": "GET", "/openapi.yaml": "GET"}

_decoder = json.JSONDecoder()
#: ``json.loads``'s decoder (its default options) for text already decoded.
_json_decode: Callable[[str], Any] = _decoder.decode
#: Its C scanner: one JSON value from an index, ``(value, end)`` (``decode`` without its whitespace regexes; see ``_json_object``).
_json_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]  # set in __init__, not in the stubs
#: ``json.dumps``'s own string escaping (C): ASCII out, non-ASCII as ``\uXXXX``.
_enc: Callable[[str], str] = encode_basestring_ascii


class HttpError(Exception):
    """An error answered as ``{"error": message, **extra}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = (), **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


def _fail(status: int, message: str, **extra: Any) -> NoReturn:
    raise HttpError(status, message, **extra)


def _json_response(obj: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """``obj`` as JSON and a newline: every JSON answer ends with one, so ``curl``'s output ends its line."""
    return Response(status, (json.dumps(obj) + "\n").encode(), JSON_CONTENT_TYPE, headers)


def _error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = (), **extra: Any) -> Response:
    return _json_response({"error": message, **extra}, status, headers)


def _json_text(text: str, status: int = 200) -> Response:
    """A JSON answer from JSON text built with ``_enc`` (so ASCII), and the newline every JSON answer ends with."""
    return Response(status, (text + "\n").encode())


def _key_value(key: str, value: str, status: int = 200) -> Response:
    """``{"key": key, "value": value}``, the same bytes as ``json.dumps`` of that dict."""
    return _json_text('{"key": ' + _enc(key) + ', "value": ' + _enc(value) + "}", status)


def _posted(body: bytes, key: str, value: str, key_bytes: bytes, value_bytes: bytes) -> Response:
    """``POST /data``'s answer: ``_key_value(key, value, 201)`` for the ``key`` and ``value`` read from ``body`` (``_json_object``).

    A body read as UTF-8 that is ASCII without a backslash or DEL holds
    strings that are their literals' characters, which strict JSON keeps
    to " " .. "~" less the quote: nothing ``_enc`` escapes, so the answer
    is their UTF-8 (``key_bytes``, ``value_bytes``) between quotes, with no
    scan of each character (a test compares the bytes with ``json.dumps``'s).
    """
    # ``body`` holds a JSON object, so two bytes at least; ints: ``bytes.__contains__`` finds one with memchr, a bytes needle costs more.
    if body[0] == 0x7B and body[1] and body.isascii() and 0x5C not in body and 0x7F not in body:  # "{", not NUL; no "\\" nor DEL
        return Response(201, b'{"key": "%b", "value": "%b"}\n' % (key_bytes, value_bytes))
    return _key_value(key, value, 201)


def _not_found(key: str) -> Response:
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


def _error_for(request: Request, exc: BaseException) -> Response:
    """The JSON answer to an exception a handler raised."""
    if isinstance(exc, HttpError):
        return _error_response(exc.status, exc.message, exc.headers, **exc.extra)
    mapped = _from_cluster_error(exc)
    if mapped is None:
        log.error("unexpected error answering %s %r", request.method, request.target, exc_info=exc)
        return _error_response(500, "internal error in the HTTP shim (logged)")
    return _error_response(*mapped)


# -- request parsing ------------------------------------------------------------------


def _split_target(target: bytes) -> tuple[str, str]:
    """The decoded path and the raw query of a request target (origin, absolute or asterisk form); 400 if undecodable."""
    if target[:1] == b"/":  # the usual path alone, plain UTF-8: parse_url would return it whole
        try:
            text = target.decode()
        except UnicodeDecodeError:
            text = "?"  # the general way below answers it
        if "?" not in text and "#" not in text and "%" not in text:  # ``in`` on str: on bytes it costs an exception
            return text, ""
    if target == b"*":
        return "*", ""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        _fail(400, "the request target is not a valid URL")
    raw = url.path or b"/"
    try:
        path = (unquote_to_bytes(raw) if b"%" in raw else raw).decode()
    except UnicodeDecodeError:
        _fail(400, "the path is not valid percent-encoded UTF-8")
    query = url.query
    return path, "" if query is None else query.decode("latin-1")


def _query(query: str) -> dict[str, str]:
    """The query's parameters (``+`` is a space); the first of a repeated name wins."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, value)
    return params


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


def _query_ttl(params: dict[str, str]) -> float | None:
    text = params.get("ttl")
    if text is None:
        return None
    try:
        ttl = float(text)
    except ValueError:
        _fail(400, f"ttl must be a number of seconds, got {text!r}")
    if not math.isfinite(ttl):
        _fail(400, "ttl must be a finite number of seconds")
    return _check_ttl(ttl)


def _json_object(body: bytes) -> dict[str, Any]:
    utf8 = body[:1] == b"{" and body[1:2] != b"\x00"  # what json.loads's encoding detection calls UTF-8
    if not utf8 and not body.strip():
        _fail(400, "the request body must be a JSON object")
    try:
        if utf8:  # json.loads's steps, less its encoding detection
            text = body.decode("utf-8", "surrogatepass")
            # The text starts with "{", so ``decode`` would scan from 0 too; anything but one whole value (an
            # error, trailing whitespace or data) goes through ``decode`` itself, for its exact answer.
            try:
                doc, end = _json_scan(text, 0)
            except Exception:
                end = -1
            if end != len(text):
                doc = _json_decode(text)
        else:
            doc = json.loads(body)
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


def _wants_octets(request: Request) -> bool:
    """Whether Accept prefers ``application/octet-stream`` over JSON (ties go to JSON)."""
    accept = request.header(b"accept")
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


def _not_text(key: str) -> HttpError:
    """The 406 for a value that is not UTF-8, asked for as JSON."""
    return HttpError(
        406,
        "the value is not valid UTF-8 text, so it cannot be sent as JSON; request it with 'Accept: application/octet-stream'",
        key=key,
    )


async def _ping(client: Client) -> bool:
    try:
        await client.ping()
    except (ClientError, ServerError, OSError, TimeoutError):
        return False
    return True


class _Pending:
    """A request waiting for its batched read or write: the batcher delivers the result here (a ``Sink``), and this answers it.

    Never raises (the batch delivers its other results after it): an error
    in building the answer is answered as JSON, a 500 if it is a bug.
    """

    __slots__ = ("observe", "request", "route", "delivered")

    def __init__(self, observe: Callable[[str, str, int, float], None], request: Request, route: str) -> None:
        self.observe = observe
        self.request = request
        self.route = route
        self.delivered = False

    def done(self) -> bool:
        return self.delivered

    def set_exception(self, exc: BaseException) -> None:
        self.delivered = True
        self._answer(_error_for(self.request, exc))

    def _answer(self, response: Response) -> None:
        request = self.request
        try:
            self.observe(request.method, self.route, response.status, perf_counter() - request.start)
            request.conn.answer(request, response)
        except Exception:  # a bug: the batch's other requests must still be answered
            log.exception("answering %s %r failed", request.method, request.target)


class _Read(_Pending):
    """A GET waiting for its value (``GetBatcher.get_into``); ``octets``: raw bytes if Accept prefers them."""

    __slots__ = ("key", "octets")

    def __init__(self, observe: Callable[[str, str, int, float], None], request: Request, route: str, key: str, octets: bool) -> None:
        self.observe = observe  # _Pending's fields set here: a ``super().__init__`` call less per request
        self.request = request
        self.route = route
        self.delivered = False
        self.key = key
        self.octets = octets

    def set_result(self, value: bytes | None) -> None:
        self.delivered = True
        request = self.request
        try:
            if value is None:
                response = _not_found(self.key)
            elif self.octets and b"accept" in request.headers and _wants_octets(request):
                response = Response(200, value, _OCTETS)
            else:  # _key_value's bytes, two calls less
                response = Response(200, ('{"key": ' + _enc(self.key) + ', "value": ' + _enc(value.decode()) + "}\n").encode())
        except UnicodeDecodeError:
            response = _error_for(request, _not_text(self.key))
        except Exception as exc:
            response = _error_for(request, exc)
        try:  # ``_answer``, inlined (the read's hot path)
            self.observe(request.method, self.route, response.status, perf_counter() - request.start)
            request.conn.answer(request, response)
        except Exception:  # a bug: the batch's other requests must still be answered
            log.exception("answering %s %r failed", request.method, request.target)


class _Write(_Pending):
    """A write waiting to be stored (``SetBatcher.set_into``); ``stored`` is its answer then (built with the request)."""

    __slots__ = ("stored",)

    def __init__(self, observe: Callable[[str, str, int, float], None], request: Request, route: str, stored: Response) -> None:
        self.observe = observe  # as in _Read
        self.request = request
        self.route = route
        self.delivered = False
        self.stored = stored

    def set_result(self, result: object) -> None:
        self.delivered = True
        request = self.request
        response = self.stored
        try:  # ``_answer``, inlined (the write's hot path)
            self.observe(request.method, self.route, response.status, perf_counter() - request.start)
            request.conn.answer(request, response)
        except Exception:  # a bug: the batch's other requests must still be answered
            log.exception("answering %s %r failed", request.method, request.target)


def _deliver(sink: Sink[Any], call: asyncio.Future[Any]) -> None:
    """Hand a done ``Client.get`` or ``Client.set`` to ``sink`` (``--read-batch 1``, ``--write-batch 1``)."""
    try:
        result = call.result()
    except Exception as exc:
        sink.set_exception(exc)
        return
    sink.set_result(result)


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


# -- the routes -----------------------------------------------------------------------

Handler = Callable[[Request, str, dict[str, str]], Coroutine[Any, Any, Response]]


class Shim:
    """The shim's routes, bound to what they need once (``_wire.App``: ``dispatch``, ``max_body``, ``observe``).

    Args:
        config: the shim's settings (``client_max_size`` is ``max_body``).
        metrics: the counters requests are added to.
        metrics_text: the body of ``/metrics`` (Prometheus text), built at scrape time.
        ssl: the context of the connections to the masters (``None``: plain TCP).
    """

    __slots__ = (
        "config",
        "ssl",
        "max_body",
        "max_key_bytes",
        "metrics",
        "observe",
        "metrics_text",
        "openapi",
        "expected_auth",
        "client",
        "health_clients",
        "read_client",
        "reads",
        "read",
        "writes",
        "write",
        "_tasks",
    )

    config: HttpConfig
    ssl: SSLContext | None
    max_body: int
    max_key_bytes: int
    metrics: HttpMetrics
    observe: Callable[[str, str, int, float], None]
    metrics_text: Callable[[], bytes]
    openapi: bytes | None
    #: ``Bearer <--http-token>`` as bytes, or None (no token needed).
    expected_auth: bytes | None
    #: Set by ``start``; requests are served only after that.
    client: Client
    health_clients: dict[str, Client]
    #: The client the batched reads go over, and the batcher.
    read_client: Client
    reads: GetBatcher
    #: How a GET reads a key into its ``_Read``: ``reads.get_into``, or ``client.get`` (as a task) with ``--read-batch 1``.
    read: Callable[[bytes, Sink[bytes | None]], None]
    #: The batcher of writes, and how a write stores a key for its ``_Write``: ``writes.set_into``, or ``client.set`` (as a task)
    #: with ``--write-batch 1``.
    writes: SetBatcher
    write: Callable[[bytes, bytes, float | None, Sink[None]], None]
    _tasks: set[asyncio.Task[Response]]

    def __init__(self, config: HttpConfig, metrics: HttpMetrics, metrics_text: Callable[[], bytes], ssl: SSLContext | None) -> None:
        self.config = config
        self.ssl = ssl
        self.max_body = config.client_max_size
        self.max_key_bytes = config.max_key_bytes
        self.metrics = metrics
        self.observe = metrics.observe
        self.metrics_text = metrics_text
        self.expected_auth = None if config.http_token is None else f"Bearer {config.http_token}".encode()
        self._tasks = set()
        try:
            self.openapi = OPENAPI_PATH.read_bytes()
        except OSError:
            self.openapi = None

    async def start(self) -> None:
        """Open the dcache clients (they connect in the background)."""
        config = self.config
        main, health = client_configs(config, self.ssl)
        self.client = Client(config=main)
        self.read_client = Client(config=main)
        self.reads = GetBatcher(self.read_client, fallback=self.client, max_keys=config.read_batch, stats=self.metrics.reads)
        if config.read_batch > 1:
            self.read = self.reads.get_into
        else:
            get = self.client.get

            def read(key: bytes, sink: Sink[bytes | None]) -> None:
                asyncio.ensure_future(get(key)).add_done_callback(partial(_deliver, sink))

            self.read = read
        self.writes = SetBatcher(self.client, max_keys=config.write_batch, stats=self.metrics.writes)
        if config.write_batch > 1:
            self.write = self.writes.set_into
        else:
            put = self.client.set

            def write(key: bytes, value: bytes, ttl: float | None, sink: Sink[None]) -> None:
                asyncio.ensure_future(put(key, value, ttl=ttl)).add_done_callback(partial(_deliver, sink))

            self.write = write
        self.health_clients = {endpoint: Client(config=replace(health, endpoints=endpoint)) for endpoint in health.endpoints}

    async def close(self) -> None:
        """Close the dcache clients, then wait for the requests still running (they fail fast then)."""
        await self.read_client.close()
        await self.client.close()
        await self.reads.close()
        await self.writes.close()
        for client in self.health_clients.values():
            await client.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- dispatch --------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response | asyncio.Future[Response] | None:
        """The answer to ``request``, a future of it, or ``None`` (its ``_Read`` or ``_Write`` answers it); never raises (errors are answered as JSON)."""
        method = request.method
        try:
            path, query = _split_target(request.target)
        except HttpError as exc:
            return self._answer(request, UNMATCHED_ROUTE, _error_for(request, exc))
        if path.startswith("/data/") or path.startswith("/api/get/"):
            legacy = path[1] == "a"
            key = path[9:] if legacy else path[6:]
            if not key or "\n" in key:  # what aiohttp's {key:.+} did not match
                return self._answer(request, UNMATCHED_ROUTE, _error_response(404, f"no route for {method} {path}"))
            route = _LEGACY_GET_ROUTE if legacy else _DATA_KEY_ROUTE
            if self.expected_auth is not None and not self._authorized(request):
                return self._answer(request, route, _unauthorized())
            if method == "GET" or method == "HEAD":  # HEAD: the same answer without its body (_wire)
                return self.get_key(request, key, route, not legacy)
            if not legacy and method == "PUT":
                return self.put_data(request, key, query)
            if not legacy and method == "DELETE":
                return self._run(request, route, self.delete_data, key, query)
            allow = "GET,HEAD" if legacy else "DELETE,GET,HEAD,PUT"
            return self._answer(request, UNMATCHED_ROUTE, _not_allowed(method, path, allow))
        allowed = _FIXED_ROUTES.get(path)
        if allowed is None:
            return self._answer(request, UNMATCHED_ROUTE, _error_response(404, f"no route for {method} {path}"))
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            return self._answer(request, UNMATCHED_ROUTE, _not_allowed(method, path, "GET,HEAD" if allowed == "GET" else allowed))
        if self.expected_auth is not None and path not in OPEN_ROUTES and not self._authorized(request):
            return self._answer(request, path, _unauthorized())
        if path == "/data":
            return self.post_data(request, query)
        if path == "/api/post":
            return self.legacy_post(request, query)
        if path == "/health":
            return self._run(request, path, self.health, "", query)
        if path == "/metrics":
            return self._answer(request, path, self._guard(request, lambda: Response(200, self.metrics_text(), _METRICS_CONTENT_TYPE)))
        return self._answer(request, path, self._guard(request, self.openapi_yaml))

    def _authorized(self, request: Request) -> bool:
        got = request.headers.get(b"authorization", b"")
        assert self.expected_auth is not None
        return hmac.compare_digest(got, self.expected_auth)

    def _answer(self, request: Request, route: str, response: Response) -> Response:
        self.observe(request.method, route, response.status, perf_counter() - request.start)
        return response

    @staticmethod
    def _guard(request: Request, make: Callable[[], Response]) -> Response:
        try:
            return make()
        except Exception as exc:
            return _error_for(request, exc)

    def _run(self, request: Request, route: str, handler: Handler, key: str, query: str) -> asyncio.Future[Response]:
        """Run an async handler as a task whose result is the answer (errors answered as JSON, counted under ``route``)."""
        task = asyncio.get_running_loop().create_task(self._serve(request, route, handler(request, key, _query(query) if query else {})))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self, request: Request, route: str, work: Awaitable[Response]) -> Response:
        try:
            response = await work
        except Exception as exc:
            response = _error_for(request, exc)
        self.observe(request.method, route, response.status, perf_counter() - request.start)
        return response

    # -- handlers --------------------------------------------------------------------

    def get_key(self, request: Request, key: str, route: str, octets: bool) -> Response | None:
        """``GET /data/{key}`` (``octets``: raw bytes if Accept prefers them) and ``GET /api/get/{key}``: the hot path."""
        if key.isascii() and len(key) <= self.max_key_bytes:  # dispatch sends no empty key: ``_key_bytes``'s checks, one call less
            raw = key.encode()
        else:
            try:
                raw = _key_bytes(key, self.max_key_bytes, in_url=True)
            except HttpError as exc:
                return self._answer(request, route, _error_for(request, exc))
        self.read(raw, _Read(self.observe, request, route, key, octets))
        return None

    def _store(self, request: Request, route: str, key: bytes, value: bytes, ttl: float | None, stored: Response) -> None:
        """Write ``value`` under ``key`` with the other writes of this loop iteration; ``stored`` is the answer once it is stored."""
        self.write(key, value, ttl, _Write(self.observe, request, route, stored))

    def _refuse(self, request: Request, route: str, exc: Exception) -> Response:
        return self._answer(request, route, _error_for(request, exc))

    def post_data(self, request: Request, query: str) -> Response | None:
        """``POST /data``: JSON ``{"key", "value", "ttl"?}``; 201 with the key and value once stored."""
        try:
            doc = _json_object(request.body)
            # The usual document has the two fields: a superset test without ``issuperset``'s set of the keys.
            if not (len(doc) == 2 and "key" in doc and "value" in doc) and not _BODY_FIELDS.issuperset(doc):
                unknown = sorted(set(doc) - _BODY_FIELDS)
                _fail(400, f"unknown field(s): {', '.join(map(repr, unknown))}; expected key, value and optionally ttl")
            key = doc.get("key")
            if not isinstance(key, str):
                _fail(
                    400,
                    "field 'key' is required and must be a string" if key is None else f"'key' must be a string, not {type(key).__name__}",
                )
            # ASCII text encodes without fail, a byte a character: ``_key_bytes``'s checks as two tests.
            key_bytes = (
                key.encode() if key.isascii() and 0 < len(key) <= self.max_key_bytes else _key_bytes(key, self.max_key_bytes, in_url=False)
            )
            value = doc.get("value")
            if not isinstance(value, str):
                _fail(
                    400,
                    "field 'value' is required and must be a string"
                    if value is None
                    else f"'value' must be a string, not {type(value).__name__}",
                )
            value_bytes = value.encode() if value.isascii() else _text_bytes(value, "value")
            ttl = _check_ttl(doc["ttl"]) if "ttl" in doc else None
        except Exception as exc:
            return self._refuse(request, "/data", exc)
        stored = _posted(request.body, key, value, key_bytes, value_bytes)
        self.write(key_bytes, value_bytes, ttl, _Write(self.observe, request, "/data", stored))  # ``_store``, inlined
        return None

    def put_data(self, request: Request, key: str, query: str) -> Response | None:
        """``PUT /data/{key}``: the body is the value (raw bytes), ``?ttl=`` seconds; 201 with the key and size once stored."""
        try:
            key_bytes = _key_bytes(key, self.max_key_bytes, in_url=True)
            ttl = _query_ttl(_query(query)) if query else None
        except Exception as exc:
            return self._refuse(request, _DATA_KEY_ROUTE, exc)
        value = request.body
        done = _json_text('{"key": ' + _enc(key) + ', "size": ' + str(len(value)) + "}", 201)
        self._store(request, _DATA_KEY_ROUTE, key_bytes, value, ttl, done)
        return None

    async def delete_data(self, request: Request, key: str, _query: dict[str, str]) -> Response:
        deleted = await self.client.delete(_key_bytes(key, self.max_key_bytes, in_url=True))
        return _json_text('{"key": ' + _enc(key) + ', "deleted": ' + ("true" if deleted else "false") + "}")

    def legacy_post(self, request: Request, query: str) -> Response | None:
        """``POST /api/post?key=&value=[&ttl=]``: 201 with the key and value once stored."""
        try:
            params = _query(query) if query else {}
            key = params.get("key")
            value = params.get("value")
            if key is None or value is None:
                _fail(400, "query parameters 'key' and 'value' are required")
            key_bytes = _key_bytes(key, self.max_key_bytes, in_url=True)
            if len(value) > MAX_QUERY_VALUE_CHARS:
                _fail(
                    400,
                    f"a value in the query string is limited to {MAX_QUERY_VALUE_CHARS} characters; use POST /data or PUT /data/{{key}}",
                )
            value_bytes = _text_bytes(value, "value")
            ttl = _query_ttl(params)
        except Exception as exc:
            return self._refuse(request, "/api/post", exc)
        self._store(request, "/api/post", key_bytes, value_bytes, ttl, _key_value(key, value, 201))
        return None

    async def health(self, request: Request, _key: str, _query: dict[str, str]) -> Response:
        clients = self.health_clients
        answers = await asyncio.gather(*(_ping(c) for c in clients.values()))
        masters = dict(zip(clients, answers, strict=True))
        if any(answers):
            return _json_response({"status": "ok", "masters": masters})
        return _json_response({"status": "unavailable", "error": "no dcache master answers PING", "masters": masters}, 503)

    def openapi_yaml(self) -> Response:
        if self.openapi is None:
            _fail(404, "openapi.yaml is not installed with this copy of dcache")
        return Response(200, self.openapi, "application/yaml")


#: prometheus_client's text format, version 0.0.4.
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _not_allowed(method: str, path: str, allow: str) -> Response:
    return _error_response(405, f"method {method} is not allowed on {path} (allowed: {allow})", (("Allow", allow),))


def _unauthorized() -> Response:
    return _error_response(401, "send 'Authorization: Bearer <token>' (the shim's --http-token)", (("WWW-Authenticate", "Bearer"),))
