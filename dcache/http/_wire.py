"""HTTP/1.1 for the shim: an ``asyncio.Protocol`` over httptools' parser (llhttp, C), and its bounds.

Design note
-----------
The shim answers a handful of routes with small bodies, so it needs only a
small part of an HTTP server; aiohttp's request and response machinery was
most of its CPU per request (docs/BENCHMARKS.md, "HTTP shim (wrk)"). This
module is that small part, on the same shape as uvicorn's
``httptools_impl``: the C parser calls back with the URL, each header and
each body chunk, and the protocol builds one ``Request`` per message.

* **Pipelining.** Requests on one connection are answered in order, one at a
  time: a request parsed while another is being answered waits in a queue;
  above ``MAX_PIPELINED`` queued requests the connection stops reading, and
  while the transport's buffer is full (``pause_writing``) no new request is
  started.
* **Answers.** The app's ``dispatch(request)`` returns a ``Response`` (answered
  at once), a future of the ``Response`` (a task), or ``None``: the app
  answers later with ``request.conn.answer(request, response)`` (the GET and
  write paths: the batched read or write delivers to an object of the app's,
  no future per request). The head is one formatting of bytes prepared once
  per status and content type (status line, ``Content-Type``,
  ``Content-Length``), a ``Date`` formatted once a second, and
  ``Connection: close`` when the connection ends after the answer. ``HEAD``
  gets the head alone.
* **Bounds.** A request line over ``MAX_URL_BYTES`` (414), a header over
  ``MAX_HEADER_BYTES`` or more than ``MAX_HEADERS`` of them (431), a body over
  the app's ``max_body`` (413; announced by ``Content-Length`` and
  ``Expect: 100-continue``: answered before the body is sent; otherwise the
  body is read and dropped, then answered), bytes the parser refuses (400):
  each answered with a JSON error, and the connection closes after it.
* **Time.** A sweeper (``HttpServer.sweep``, once a second) closes
  connections idle between requests for ``IDLE_TIMEOUT_S``, answers 408 to a
  request not received in full within ``REQUEST_TIMEOUT_S`` of its first byte,
  and closes a connection whose answers the client has not read for
  ``IDLE_TIMEOUT_S``. No timer is armed per request.
* **Stopping.** ``HttpServer.close`` closes idle connections at once; a
  connection answering a request closes after that answer.

Bad bytes never raise out of ``data_received``: a parser error is a 400, a
bug in a handler a logged 500 (``dispatch`` catches it; this module has a
last guard for bugs in itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from json.encoder import encode_basestring_ascii
from time import perf_counter, time
from typing import Protocol, cast

import httptools

__all__ = [
    "HttpServer",
    "HttpProtocol",
    "Request",
    "Response",
    "App",
    "IDLE_TIMEOUT_S",
    "REQUEST_TIMEOUT_S",
    "MAX_URL_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_HEADERS",
    "MAX_PIPELINED",
    "JSON_CONTENT_TYPE",
]

log = logging.getLogger("dcache.http")
access_log = logging.getLogger("dcache.http.access")

#: Seconds a keep-alive connection may stay idle between requests (aiohttp's default too).
IDLE_TIMEOUT_S = 75.0
#: Seconds from a request's first byte until it is received in full (then 408 and close).
REQUEST_TIMEOUT_S = 60.0
#: Longest request target: a 1024-character key percent-encodes to up to 12 KiB,
#: a 4096-character legacy query value to 48 KiB (their own limits answer 414/400).
MAX_URL_BYTES = 128 * 1024
#: Longest header name or value (aiohttp's default field size).
MAX_HEADER_BYTES = 8190
#: Most header fields in one request.
MAX_HEADERS = 128
#: Requests parsed ahead on one connection before it stops reading.
MAX_PIPELINED = 32
#: Body chunks larger than this are written separately from the head (no copy).
_COPY_BELOW_BYTES = 64 * 1024

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
#: The usual methods as the parser gives them -> as ``Request.method`` has them (decoded once).
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class Request:
    """One parsed HTTP request.

    Attributes:
        method: as sent (``GET``, ``POST``...).
        target: the request target as sent (path and query, percent-encoded).
        headers: lower-cased names to values (repeated fields joined with ``", "``).
        body: the body, whole.
        keep_alive: whether the connection stays open after the answer.
        keep_alive_10: an HTTP/1.0 request that keeps its connection open
            (its answer says ``Connection: keep-alive``).
        start: ``perf_counter()`` when the request was complete.
        conn: the connection it came on (``conn.answer`` when ``dispatch``
            returned ``None``).
    """

    __slots__ = ("method", "target", "headers", "body", "keep_alive", "keep_alive_10", "start", "conn")

    method: str
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool
    keep_alive_10: bool
    start: float
    conn: HttpProtocol

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: dict[bytes, bytes],
        body: bytes,
        keep_alive: bool,
        keep_alive_10: bool,
        conn: HttpProtocol,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.keep_alive_10 = keep_alive_10
        self.start = perf_counter()
        self.conn = conn

    def header(self, name: bytes) -> str | None:
        """The value of header ``name`` (lower case), decoded as Latin-1, or ``None``."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


class Response:
    """An answer: status, body, content type and extra headers (``(name, value)`` pairs)."""

    __slots__ = ("status", "body", "content_type", "headers")

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]

    def __init__(self, status: int, body: bytes, content_type: str = JSON_CONTENT_TYPE, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def json_error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """``{"error": message}`` (the bytes ``json.dumps`` gives, and a newline) with ``status``."""
    return Response(status, b'{"error": ' + encode_basestring_ascii(message).encode() + b"}\n", JSON_CONTENT_TYPE, headers)


class App(Protocol):
    """What the protocol serves: the shim's routes (``dcache.http.app.Shim``)."""

    max_body: int

    def dispatch(self, request: Request) -> Response | asyncio.Future[Response] | None:
        """The answer to ``request``, a future of it, or ``None``: answered later (see the module note); never raises."""
        ...

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count a request answered by the protocol itself (bounds, parse errors)."""
        ...


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())


_STATUS_LINES: dict[int, bytes] = {s.value: _status_line(s.value) for s in HTTPStatus}
#: ``(status, content type)`` -> the status line, the ``Content-Type`` line and ``Content-Length: `` (built once each).
_PREFIXES: dict[tuple[int, str], bytes] = {}


def _prefix(status: int, content_type: str) -> bytes:
    prefix = _PREFIXES[status, content_type] = (
        (_STATUS_LINES.get(status) or _status_line(status)) + b"Content-Type: " + content_type.encode("latin-1") + b"\r\nContent-Length: "
    )
    return prefix


class _Clock:
    """The ``Date`` header line, formatted at most once a second."""

    __slots__ = ("second", "line")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def date(self) -> bytes:
        now = time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


_clock = _Clock()


def encode_answer(response: Response, close: bool, keep_alive_10: bool, body: bytes = b"") -> bytes:
    """The status line and headers of ``response``, then ``body`` (``close``: the connection ends after it).

    ``body`` is ``response.body`` when it goes out in the same write, else
    empty (``HEAD``, or a large body written on its own). The usual answer
    (no extra header, a keep-alive HTTP/1.1 connection) is one formatting
    of prepared bytes.
    """
    prefix = _PREFIXES.get((response.status, response.content_type)) or _prefix(response.status, response.content_type)
    if not response.headers and not close and not keep_alive_10:
        return b"%b%d\r\n%b\r\n%b" % (prefix, len(response.body), _clock.date(), body)
    head = prefix + b"%d\r\n" % len(response.body) + _clock.date()
    for name, value in response.headers:
        head += name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n"
    if close:
        head += b"Connection: close\r\n"
    elif keep_alive_10:
        head += b"Connection: keep-alive\r\n"
    return head + b"\r\n" + body


class HttpServer:
    """The shim's connections: their protocol factory, the sweeper of slow ones, and a graceful stop.

    Args:
        app: the routes (``dispatch``), the body limit and the metrics.
        idle_timeout: ``IDLE_TIMEOUT_S``; request_timeout: ``REQUEST_TIMEOUT_S``.
        access_log: log each answered request (method, target, status) at DEBUG.
    """

    __slots__ = ("app", "connections", "closing", "idle_timeout", "request_timeout", "access_log", "_sweeper", "_drained")

    app: App
    connections: set[HttpProtocol]
    closing: bool
    idle_timeout: float
    request_timeout: float
    #: Log each answered request at DEBUG (``dcache.http.access``).
    access_log: bool
    _sweeper: asyncio.Task[None] | None
    _drained: asyncio.Event | None

    def __init__(
        self, app: App, *, idle_timeout: float = IDLE_TIMEOUT_S, request_timeout: float = REQUEST_TIMEOUT_S, access_log: bool = False
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.connections = set()
        self.closing = False
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._sweeper = None
        self._drained = None

    def protocol(self) -> HttpProtocol:
        """A protocol for a new connection (the ``protocol_factory`` of ``loop.create_server``)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self.sweep())
        return HttpProtocol(self)

    async def sweep(self, every_s: float = 1.0) -> None:
        """Close idle and stalled connections, answer 408 to requests that take too long to arrive (see the module note)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            now = loop.time()
            for conn in list(self.connections):
                try:
                    conn.check_time(now)
                except Exception:  # a bug here must not stop the sweeper
                    log.exception("checking an HTTP connection's timeouts failed")

    def gone(self, conn: HttpProtocol) -> None:
        """``conn`` closed."""
        self.connections.discard(conn)
        if self._drained is not None and not self.connections:
            self._drained.set()

    async def close(self, grace_s: float) -> None:
        """Close idle connections now, let the others finish their request (up to ``grace_s``), then abort them."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), grace_s)
            except TimeoutError:
                pass
        for conn in list(self.connections):
            conn.abort()


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection (see the module note)."""

    __slots__ = (
        "server",
        "app",
        "transport",
        "parser",
        "loop",
        "queue",
        "busy",
        "closing",
        "reading_paused",
        "writing_paused",
        "last_active",
        "request_began",
        "_url",
        "_headers",
        "_header_count",
        "_body",
        "_body_bytes",
        "_refuse",
        "_max_body",
    )

    server: HttpServer
    app: App
    transport: asyncio.Transport | None
    parser: httptools.HttpRequestParser
    loop: asyncio.AbstractEventLoop
    #: Requests parsed while another is answered; a ``Response`` last: a refusal, then close.
    queue: deque[Request | Response]
    #: A request is being answered.
    busy: bool
    #: The connection closes once the answer being written is out (or at once when idle).
    closing: bool
    reading_paused: bool
    writing_paused: bool
    #: ``loop.time()`` of the last bytes received or answer written.
    last_active: float
    #: ``loop.time()`` of the first bytes of the request being received (0: none).
    request_began: float
    _url: bytes
    _headers: dict[bytes, bytes]
    _header_count: int
    _body: list[bytes]
    _body_bytes: int
    #: The error the request being received will be answered with (a bound it broke), or None.
    _refuse: Response | None
    _max_body: int

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.loop = asyncio.get_running_loop()
        self.queue = deque()
        self.busy = False
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.last_active = self.loop.time()
        self._max_body = server.app.max_body
        self.on_message_begin()  # the per-request state, empty
        self.request_began = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.server.connections.add(self)
        if self.server.closing:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()
        self.server.gone(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # an error was answered, or the server is stopping: nothing more is read
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # the request was answered (or queued) as plain HTTP; no protocol switch
        except httptools.HttpParserError as exc:
            self._refuse_now(json_error(400, f"malformed HTTP request: {exc}"))
        except Exception:  # a bug in this module: answer it, never let it reach the loop
            log.exception("reading an HTTP request failed")
            self._refuse_now(json_error(500, "internal error in the HTTP shim (logged)"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.last_active = self.loop.time()
        self._next()

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request_began = self.last_active
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._body = []
        self._body_bytes = 0
        self._refuse = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES and self._refuse is None:
            self._refuse = json_error(414, f"the request target is over {MAX_URL_BYTES} bytes")
            self._url = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        count = self._header_count = self._header_count + 1
        if count > MAX_HEADERS or len(name) > MAX_HEADER_BYTES or len(value) > MAX_HEADER_BYTES or self._refuse is not None:
            self._bad_header(name, value, count)
            return
        name = name.lower()
        headers = self._headers
        if name in headers:
            headers[name] += b", " + value
        else:
            headers[name] = value

    def _bad_header(self, name: bytes, value: bytes, count: int) -> None:
        """A header over a bound, or one after the request was refused: the first bound broken is the answer."""
        if self._refuse is not None:
            return
        if len(name) > MAX_HEADER_BYTES or len(value) > MAX_HEADER_BYTES:
            self._refuse = json_error(431, f"a header field is over {MAX_HEADER_BYTES} bytes")
        elif count > MAX_HEADERS:
            self._refuse = json_error(431, f"more than {MAX_HEADERS} header fields")

    def on_headers_complete(self) -> None:
        if self._refuse is not None:
            return
        headers = self._headers
        length = headers.get(b"content-length")
        expect = headers.get(b"expect")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self._refuse = self._too_large()
            if expect is not None and expect.lower() == b"100-continue":
                self._refuse_now(self._refuse)  # the client waits: it will not send the body
        elif expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._refuse is not None:
            return  # read and dropped
        if self._body_bytes > self._max_body:
            self._refuse = self._too_large()
            self._body = []
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.request_began = 0.0
        if self.closing:
            return
        if self._refuse is not None:
            self._refuse_now(self._refuse)
            return
        parser = self.parser
        body = self._body
        headers = self._headers
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        request = Request(
            _METHODS.get(method) or method.decode("ascii", "replace"),
            self._url,
            headers,
            body[0] if len(body) == 1 else b"".join(body),
            keep_alive,
            # HTTP/1.0 keeps a connection only when asked in one of these headers (llhttp): the version
            # (httptools formats it with str.format: about 1,800 instructions) is read only then.
            keep_alive and (b"connection" in headers or b"proxy-connection" in headers) and parser.get_http_version() == "1.0",
            self,
        )
        if self.busy or self.queue:
            self.queue.append(request)
            if len(self.queue) >= MAX_PIPELINED and not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self.busy = True  # ``_run``, inlined (a call less per request)
        answer = self.app.dispatch(request)
        if answer is None:
            return  # the app calls ``answer``
        if isinstance(answer, Response):
            self.answer(request, answer)
        else:
            answer.add_done_callback(partial(self._answered, request))

    def _too_large(self) -> Response:
        return json_error(413, f"the request body is over the limit of {self._max_body} bytes (--client-max-size)")

    # -- answering -------------------------------------------------------------------

    def _run(self, request: Request) -> None:
        self.busy = True
        answer = self.app.dispatch(request)
        if answer is None:
            return  # the app calls ``answer``
        if isinstance(answer, Response):
            self.answer(request, answer)
        else:
            answer.add_done_callback(partial(self._answered, request))

    def _answered(self, request: Request, fut: asyncio.Future[Response]) -> None:
        try:
            answer = fut.result()
        except Exception:  # dispatch's futures carry answers, not errors: this is a bug
            log.exception("answering %s %r failed", request.method, request.target)
            answer = json_error(500, "internal error in the HTTP shim (logged)")
        self.answer(request, answer)

    def answer(self, request: Request, response: Response) -> None:
        """Answer ``request``, the one being answered on this connection (for an app whose ``dispatch`` returned ``None``)."""
        self.busy = False
        transport = self.transport
        if transport is None:
            return
        server = self.server
        close = not request.keep_alive or ((self.closing or server.closing) and not self.queue)
        if server.access_log:
            access_log.debug("%s %r %d", request.method, request.target, response.status)
        body = response.body
        if close or request.keep_alive_10 or response.headers or request.method == "HEAD" or len(body) >= _COPY_BELOW_BYTES:
            self._write(response, close, request.keep_alive_10 and not close, request.method == "HEAD")
        else:  # the usual answer: ``_write`` and ``encode_answer``'s first case, inlined (two calls less)
            prefix = _PREFIXES.get((response.status, response.content_type)) or _prefix(response.status, response.content_type)
            transport.write(b"%b%d\r\n%b\r\n%b" % (prefix, len(body), _clock.date(), body))
            self.last_active = self.loop.time()
        if not close and (self.queue or self.reading_paused):
            self._next()

    def _write(self, response: Response, close: bool, keep_alive_10: bool, head_only: bool) -> None:
        transport = self.transport
        assert transport is not None
        body = response.body
        if head_only:
            transport.write(encode_answer(response, close, keep_alive_10))
        elif len(body) < _COPY_BELOW_BYTES:
            transport.write(encode_answer(response, close, keep_alive_10, body))
        else:
            transport.write(encode_answer(response, close, keep_alive_10))
            transport.write(body)
        self.last_active = self.loop.time()
        if close:
            self.closing = True
            self.queue.clear()
            transport.close()

    def _next(self) -> None:
        """Start the next queued request if the previous one is answered and the client reads its answers."""
        queue = self.queue
        while queue and not self.busy and not self.writing_paused and self.transport is not None:
            item = queue.popleft()
            if isinstance(item, Response):  # a refusal (``_refuse_now``): the last answer on this connection
                self._write(item, True, False, False)
                return
            self._run(item)
        if self.reading_paused and len(queue) < MAX_PIPELINED // 2 and self.transport is not None and not self.closing:
            self.reading_paused = False
            self.transport.resume_reading()

    def _refuse_now(self, response: Response) -> None:
        """Answer ``response`` after the requests before it, then close (a bound was broken or the bytes are not HTTP)."""
        self.app.observe("OTHER", "unmatched", response.status, 0.0)
        self.closing = True
        if self.transport is None:
            return
        if self.busy or self.queue:
            self.queue.append(response)
        else:
            self._write(response, True, False, False)

    # -- time and stopping -------------------------------------------------------------

    def check_time(self, now: float) -> None:
        """Called by the sweeper: enforce ``REQUEST_TIMEOUT_S`` and ``IDLE_TIMEOUT_S``."""
        server = self.server
        if self.request_began and now - self.request_began > server.request_timeout and not self.busy:
            self._refuse_now(json_error(408, f"the request was not received within {server.request_timeout:g} s"))
        elif now - self.last_active > server.idle_timeout and (self.writing_paused or not (self.busy or self.queue)):
            self.abort()

    def close_when_idle(self) -> None:
        """Server stopping: close now if no request is being answered, else after its answer."""
        self.closing = True
        if not self.busy and not self.queue and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is unsent."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
