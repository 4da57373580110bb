"""The TCP shell shared by every dcache daemon that speaks the native protocol.

``FrameProtocol`` is an ``asyncio.Protocol`` that owns a ``FrameDecoder``:
``data_received`` feeds it and dispatches every complete request to the
service's handler table. Synchronous handlers (the aux node's) answer in the
same call; all answers produced by one ``data_received`` leave in a single
``transport.write``. Handlers that must wait (a master forwarding to an aux
node) return an awaitable; their answers are queued and flushed together at
the end of the loop iteration.

Flow control: when the transport's write buffer passes its high-water mark
(``pause_writing``) the protocol stops reading from that client until the
buffer drains, so a client that pipelines without reading cannot grow the
server's memory.

``ServerState`` tracks connections and background tasks for graceful
shutdown: stop accepting, let buffered answers drain up to a grace period,
then close what is left.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, cast

from .errors import (
    AuthError,
    BadArgumentsError,
    HandshakeError,
    RemoteProtocolError,
    ServerError,
    Status,
    UnknownOpError,
)
from .protocol import CONNECTION_REQUEST_ID, HEADER, PROTOCOL_VERSION, Limits, Op, pack
from .protocol.framing import FrameDecoder, queue_frame

__all__ = [
    "LATER",
    "LATENCY_BUCKETS",
    "UNKNOWN_OP",
    "Handler",
    "Histogram",
    "ServerState",
    "FrameProtocol",
    "Service",
    "deferred",
    "ready_line",
]

log = logging.getLogger("dcache.server")

#: A request handler: takes the decoded request array, returns the result
#: (or an awaitable of it, for services that forward), raises ``ServerError``.
Handler = Callable[[list[Any]], Any]

_header = HEADER.pack
_OK = Status.OK.value

#: The op slot of ``Service.op_requests``/``op_errors`` for requests no handler
#: took (unknown op, not an array, not authenticated yet).
UNKNOWN_OP = 0

#: Upper bounds (seconds) of the latency histograms' buckets.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

#: A service times 1 in this many requests (``Service.op_latency``).
SAMPLE_EVERY = 64


class Histogram:
    """A latency histogram as plain numbers; ``dcache.metrics`` exports it.

    ``counts[i]`` counts observations in ``(bounds[i-1], bounds[i]]``, the
    last slot those above every bound (not cumulative).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class ServerState:
    """Connections and background tasks of one server, for shutdown."""

    __slots__ = ("connections", "tasks", "total_connections")

    def __init__(self) -> None:
        self.connections: set[FrameProtocol] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.total_connections = 0

    def spawn(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked background task."""
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class Service:
    """What a ``FrameProtocol`` serves: identity, limits, auth and handlers.

    Subclasses fill ``handlers`` (op -> ``Handler``) once at start-up; the
    table is shared by every connection.
    """

    role = "service"

    def __init__(self, node_id: str, limits: Limits, auth_token: str | None) -> None:
        self.node_id = node_id
        self.limits = limits
        self.auth_token = auth_token
        self.state = ServerState()
        self.handlers: dict[int, Handler] = {}
        #: The connection whose requests are being dispatched right now; a
        #: handler that answers later (``LATER``) keeps it to ``reply`` to.
        self.current: FrameProtocol | None = None
        self.requests_total = 0
        self.errors_total = 0
        self.protocol_errors_total = 0
        # Metrics (plain numbers, exported at scrape time by dcache.metrics):
        # requests and errors by op, one increment per request; the latency of
        # 1 in ``sample_every`` requests by op; the time of every
        # ``data_received`` batch (no clock call per request).
        ops = [UNKNOWN_OP, *map(int, Op)]
        self.op_requests: dict[int, int] = dict.fromkeys(ops, 0)
        self.op_errors: dict[int, int] = dict.fromkeys(ops, 0)
        self.op_latency: dict[int, Histogram] = {op: Histogram() for op in ops}
        self.batch_latency = Histogram()
        self.sample_every = SAMPLE_EVERY
        self.sample_countdown = SAMPLE_EVERY
        # Connections with answers queued (``FrameProtocol.reply``/``send``):
        # one flush for all of them per loop iteration, not a callback each.
        self._unflushed: list[FrameProtocol] = []
        self._flush_all_scheduled = False

    def hello_result(self) -> dict[str, Any]:
        """What HELLO answers."""
        return {
            "version": PROTOCOL_VERSION,
            "node_id": self.node_id,
            "role": self.role,
            "max_frame_bytes": self.limits.max_frame_bytes,
            "max_key_bytes": self.limits.max_key_bytes,
            "max_value_bytes": self.limits.max_value_bytes,
        }

    def check_token(self, token: Any) -> bool:
        """Constant-time comparison of a HELLO token with the configured one."""
        if self.auth_token is None:
            return True
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode(), self.auth_token.encode())

    def queue_flush(self, conn: FrameProtocol) -> None:
        """Have ``conn``'s queued answers written by the next ``flush_all``.

        ``flush_all`` runs at the end of this loop iteration at the latest;
        a master also calls it as soon as an aux node's answers are handled.
        """
        self._unflushed.append(conn)
        if not self._flush_all_scheduled:
            self._flush_all_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_all)

    def flush_all(self) -> None:
        """Write the queued answers of every connection (one write each)."""
        self._flush_all_scheduled = False
        conns = self._unflushed
        if conns:
            self._unflushed = []
            for conn in conns:
                conn._flush()

    def protocol_factory(self) -> FrameProtocol:
        """A new connection protocol (pass to ``loop.create_server``)."""
        return FrameProtocol(self)


class FrameProtocol(asyncio.Protocol):
    """One client connection: frames in, handler answers out."""

    __slots__ = (
        "_service",
        "_decoder",
        "_max_answer",
        "_handlers",
        "_transport",
        "_pending_out",
        "_flush_scheduled",
        "_closed",
        "_paused",
        "_loop",
        "_samples",
        "peer",
        "client_name",
    )

    def __init__(self, service: Service) -> None:
        self._service = service
        self._decoder = FrameDecoder(service.limits.max_frame_bytes)
        #: Answers longer than this become FRAME_TOO_LARGE errors: the peer would refuse the frame.
        self._max_answer = service.limits.max_frame_bytes
        self._handlers: dict[int, Handler]
        if service.auth_token is None:
            self._handlers = dict(service.handlers)
        else:
            self._handlers = {}
        self._handlers[Op.HELLO] = self._hello
        self._transport: asyncio.Transport | None = None
        self._pending_out: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Sampled requests answered later: request id -> (op, start time).
        self._samples: dict[int, tuple[int, float]] = {}
        self.peer: Any = None
        self.client_name: str | None = None

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform dependent
                pass
        state = self._service.state
        state.connections.add(self)
        state.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._service.state.connections.discard(self)

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        t0 = perf_counter()
        try:
            msgs = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        service = self._service
        n = len(msgs)
        service.requests_total += n
        service.current = self
        handlers = self._handlers
        out: list[bytes] = []
        append = out.append
        service.sample_countdown -= n
        if service.sample_countdown <= 0 and n:
            service.sample_countdown += service.sample_every
            self._dispatch_sampled(msgs[0], handlers, append)
            msgs = msgs[1:]
        op_requests = service.op_requests
        for msg in msgs:
            try:
                op = msg[0]
                handler = handlers[op]
                op_requests[op] += 1
                rid = msg[1]
                result = handler(msg)
            except ServerError as exc:
                self._count_failed(msg, handlers)
                body = self._error_body(msg, exc.code, exc.message)
            except Exception as exc:
                self._count_failed(msg, handlers)
                body = self._bad_request(msg, exc)
            else:
                if result is LATER:
                    continue
                if result.__class__ is _Deferred:
                    self._defer(rid, result, op)
                    continue
                try:
                    body = pack([rid, _OK, result])
                except Exception as exc:  # rid not encodable: it was not an int
                    self._count_failed(msg, handlers)
                    body = self._bad_request(msg, exc)
                else:
                    if len(body) > self._max_answer:
                        body = self._too_large(rid, len(body), op)
            append(_header(len(body)))
            append(body)
        if out:
            if self._pending_out:
                self._pending_out.extend(out)
            else:
                assert self._transport is not None
                self._transport.write(b"".join(out))
        if self._decoder.error is not None:
            self._protocol_error(self._decoder.error)
        service.batch_latency.observe(perf_counter() - t0)

    # -- helpers -------------------------------------------------------------

    def _dispatch_sampled(self, msg: Any, handlers: dict[int, Handler], append: Callable[[bytes], None]) -> None:
        """``data_received``'s loop body for one request whose latency is recorded.

        An answer made now is timed now; one made later (``LATER``, deferred)
        when ``reply``/``_deferred_done`` sends it (``self._samples``).
        """
        service = self._service
        t0 = perf_counter()
        try:
            op = msg[0]
            handler = handlers[op]
            service.op_requests[op] += 1
            rid = msg[1]
            result = handler(msg)
        except ServerError as exc:
            self._count_failed(msg, handlers)
            body = self._error_body(msg, exc.code, exc.message)
        except Exception as exc:
            self._count_failed(msg, handlers)
            body = self._bad_request(msg, exc)
        else:
            if result is LATER or result.__class__ is _Deferred:
                if rid.__class__ is int:
                    if len(self._samples) >= 1024:  # answers that never came (connection lost upstream...)
                        self._samples.clear()
                    self._samples[rid] = (op, t0)
                if result is not LATER:
                    self._defer(rid, result, op)
                return
            try:
                body = pack([rid, _OK, result])
            except Exception as exc:  # rid not encodable: it was not an int
                self._count_failed(msg, handlers)
                body = self._bad_request(msg, exc)
            else:
                if len(body) > self._max_answer:
                    body = self._too_large(rid, len(body), op)
                service.op_latency[op].observe(perf_counter() - t0)
        append(_header(len(body)))
        append(body)

    def _count_failed(self, msg: Any, handlers: dict[int, Handler]) -> None:
        """Count a request answered with an error, under its op.

        A request that reached no handler was not counted yet: it is counted
        (request and error) under ``UNKNOWN_OP``, so requests by op add up to
        ``requests_total``.
        """
        service = self._service
        service.errors_total += 1
        try:
            op = msg[0]
            known = op in handlers
        except Exception:
            known = False
        if known:
            service.op_errors[op] += 1
        else:
            service.op_requests[UNKNOWN_OP] += 1
            service.op_errors[UNKNOWN_OP] += 1

    def _sampled_done(self, rid: int) -> None:
        sample = self._samples.pop(rid, None)
        if sample is not None:
            self._service.op_latency[sample[0]].observe(perf_counter() - sample[1])

    def _bad_request(self, msg: Any, exc: Exception) -> bytes:
        """Classify a failure that was not a ``ServerError``."""
        if msg.__class__ is not list or len(msg) < 2:
            return self._error_body(msg, Status.BAD_ARGUMENTS, "a request is an array [op, request_id, *args]")
        op = msg[0]
        if op.__class__ is not int or msg[1].__class__ is not int:
            return self._error_body(msg, Status.BAD_ARGUMENTS, "a request is an array [op: int, request_id: int, *args]")
        if isinstance(exc, KeyError) and exc.args and exc.args[0] is op:
            if self._service.auth_token is not None and Op.GET not in self._handlers and op in self._service.handlers:
                err: ServerError = AuthError("authentication required: send HELLO with the auth token first")
            else:
                err = UnknownOpError(f"unknown op {op!r}")
            return self._error_body(msg, err.code, err.message)
        if isinstance(exc, (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError)):
            return self._error_body(msg, Status.BAD_ARGUMENTS, f"bad arguments for op {op!r}: {exc}")
        log.exception("internal error handling op %r from %s", op, self.peer)
        return self._error_body(msg, Status.INTERNAL, f"internal error: {exc.__class__.__name__}")

    def _too_large(self, rid: int, size: int, op: int) -> bytes:
        """The error that replaces an answer the peer would refuse (the connection stays open); counted under ``op``."""
        service = self._service
        service.errors_total += 1
        service.op_errors[op] += 1
        return pack(
            [
                rid,
                int(Status.FRAME_TOO_LARGE),
                f"answer of {size} bytes exceeds the {self._max_answer}-byte frame limit: ask for fewer keys at once",
            ]
        )

    @staticmethod
    def _error_body(msg: Any, code: int, message: str) -> bytes:
        rid = CONNECTION_REQUEST_ID
        if msg.__class__ is list and len(msg) >= 2 and msg[1].__class__ is int and 0 <= msg[1] < 2**64:
            rid = msg[1]
        return pack([rid, int(code), message])

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        """Send one connection-level error frame, then close."""
        self._service.protocol_errors_total += 1
        log.info("closing connection from %s: %s", self.peer, exc)
        body = pack([CONNECTION_REQUEST_ID, int(exc.status), str(exc)])
        self.send([_header(len(body)), body])
        self.close()

    def send(self, chunks: list[bytes]) -> None:
        """Queue frames; they leave with the service's next ``flush_all``."""
        if self._closed or self._transport is None:
            return
        self._pending_out.extend(chunks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._service.queue_flush(self)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._pending_out
        if out and not self._closed and self._transport is not None:
            if len(out) == 1:
                self._transport.write(out[0])
            else:
                self._transport.writelines(out)  # uvloop: one writev, no join copy
        out.clear()

    def reply(self, rid: int, status: int, result: Any, op: int = UNKNOWN_OP) -> None:
        """Answer request ``rid`` later (for handlers that returned ``LATER``).

        ``op`` is the request's op, for the error counts by op.
        """
        if self._samples:
            self._sampled_done(rid)
        if status:
            service = self._service
            service.errors_total += 1
            service.op_errors[op] += 1
            body = pack([rid, status, result])
        else:
            try:
                body = pack([rid, status, result])
            except Exception as exc:  # an unencodable result is our bug: answer, keep serving
                log.error("cannot encode the answer to request %s: %s", rid, exc)
                body = pack([rid, int(Status.INTERNAL), "internal error: unencodable result"])
            else:
                if len(body) > self._max_answer:
                    body = self._too_large(rid, len(body), op)
        if self._closed or self._transport is None:
            return
        queue_frame(self._pending_out, body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._service.queue_flush(self)

    def _defer(self, rid: int, deferred: _Deferred, op: int) -> None:
        task = asyncio.ensure_future(deferred.awaitable)
        task.add_done_callback(lambda t: self._deferred_done(rid, t, op))

    def _deferred_done(self, rid: int, task: asyncio.Future[Any], op: int) -> None:
        if self._samples:
            self._sampled_done(rid)
        if task.cancelled():
            body = pack([rid, int(Status.INTERNAL), "request cancelled"])
        else:
            exc = task.exception()
            if exc is None:
                body = pack([rid, _OK, task.result()])
                if len(body) > self._max_answer:
                    body = self._too_large(rid, len(body), op)
            elif isinstance(exc, ServerError):
                self._service.errors_total += 1
                self._service.op_errors[op] += 1
                body = pack([rid, exc.code, exc.message])
            else:
                self._service.errors_total += 1
                self._service.op_errors[op] += 1
                log.error("internal error for request %s from %s", rid, self.peer, exc_info=exc)
                body = pack([rid, int(Status.INTERNAL), f"internal error: {exc.__class__.__name__}"])
        self.send([_header(len(body)), body])

    def _hello(self, msg: list[Any]) -> Any:
        try:
            _, _, version, *rest = msg
        except ValueError:
            raise HandshakeError("HELLO takes [protocol_version, auth_token?, client_name?]") from None
        if len(rest) > 2:
            raise HandshakeError("HELLO takes [protocol_version, auth_token?, client_name?]")
        if version.__class__ is not int or version != PROTOCOL_VERSION:
            raise HandshakeError(f"protocol version {version!r} is not supported (this server speaks {PROTOCOL_VERSION})")
        token = rest[0] if rest else None
        name = rest[1] if len(rest) > 1 else None
        if name is not None and not isinstance(name, str):
            raise BadArgumentsError("client_name must be a string")
        service = self._service
        if service.auth_token is not None:
            if not service.check_token(token):
                raise AuthError("invalid auth token")
            handlers = dict(service.handlers)
            handlers[Op.HELLO] = self._hello
            self._handlers = handlers
        self.client_name = name
        return service.hello_result()

    # -- lifecycle -------------------------------------------------------------

    @property
    def is_closing(self) -> bool:
        """Whether the connection is closed or closing."""
        return self._closed or self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        """Flush what is queued and close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            if self._pending_out:
                self._transport.write(b"".join(self._pending_out))
                self._pending_out.clear()
            self._transport.close()


class _Later:
    """The type of ``LATER``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


#: A handler returns this when it will answer through ``FrameProtocol.reply``.
LATER: Any = _Later()


class _Deferred:
    """Marks a handler result that completes later (see ``deferred``)."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


def deferred(awaitable: Awaitable[Any]) -> Any:
    """Wrap an awaitable a handler returns so the answer is sent when it completes."""
    return _Deferred(awaitable)


def ready_line(server: asyncio.base_events.Server) -> str:
    """The ``READY host:port`` line printed once a server listens."""
    sock = server.sockets[0]
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"READY {host}:{port}"
