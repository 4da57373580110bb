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
from collections.abc import Awaitable, Callable
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
from .protocol.framing import FrameDecoder

__all__ = ["LATER", "Handler", "ServerState", "FrameProtocol", "Service", "deferred", "ready_line"]

log = logging.getLogger("dcache.server")

#: A request handler: takes the decoded request array, returns the result
#: (or an awaitable of it, for services that forward), raises ``ServerError``.
Handler = Callable[[list[Any]], Any]

_header = HEADER.pack
_OK = Status.OK.value


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

    def protocol_factory(self) -> FrameProtocol:
        """A new connection protocol (pass to ``loop.create_server``)."""
        return FrameProtocol(self)


class FrameProtocol(asyncio.Protocol):
    """One client connection: frames in, handler answers out."""

    __slots__ = (
        "_service",
        "_decoder",
        "_handlers",
        "_transport",
        "_pending_out",
        "_flush_scheduled",
        "_closed",
        "_paused",
        "_loop",
        "peer",
        "client_name",
    )

    def __init__(self, service: Service) -> None:
        self._service = service
        self._decoder = FrameDecoder(service.limits.max_frame_bytes)
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
        try:
            msgs = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        service = self._service
        service.requests_total += len(msgs)
        service.current = self
        handlers = self._handlers
        out: list[bytes] = []
        append = out.append
        for msg in msgs:
            try:
                rid = msg[1]
                result = handlers[msg[0]](msg)
            except ServerError as exc:
                service.errors_total += 1
                body = self._error_body(msg, exc.code, exc.message)
            except Exception as exc:
                service.errors_total += 1
                body = self._bad_request(msg, exc)
            else:
                if result is LATER:
                    continue
                if result.__class__ is _Deferred:
                    self._defer(rid, result)
                    continue
                try:
                    body = pack([rid, _OK, result])
                except Exception as exc:  # rid not encodable: it was not an int
                    service.errors_total += 1
                    body = self._bad_request(msg, exc)
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

    # -- helpers -------------------------------------------------------------

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
        """Queue frames and flush them at the end of this loop iteration."""
        if self._closed or self._transport is None:
            return
        self._pending_out.extend(chunks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._pending_out
        if out and not self._closed and self._transport is not None:
            self._transport.writelines(out)  # uvloop: one writev, no join copy
        out.clear()

    def reply(self, rid: int, status: int, result: Any) -> None:
        """Answer request ``rid`` later (for handlers that returned ``LATER``)."""
        if status:
            self._service.errors_total += 1
            body = pack([rid, status, result])
        else:
            try:
                body = pack([rid, status, result])
            except Exception as exc:  # an unencodable result is our bug: answer, keep serving
                log.error("cannot encode the answer to request %s: %s", rid, exc)
                body = pack([rid, int(Status.INTERNAL), "internal error: unencodable result"])
        if self._closed or self._transport is None:
            return
        self._pending_out.append(_header(len(body)))
        self._pending_out.append(body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _defer(self, rid: int, deferred: _Deferred) -> None:
        task = asyncio.ensure_future(deferred.awaitable)
        task.add_done_callback(lambda t: self._deferred_done(rid, t))

    def _deferred_done(self, rid: int, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            body = pack([rid, int(Status.INTERNAL), "request cancelled"])
        else:
            exc = task.exception()
            if exc is None:
                body = pack([rid, _OK, task.result()])
            elif isinstance(exc, ServerError):
                self._service.errors_total += 1
                body = pack([rid, exc.code, exc.message])
            else:
                self._service.errors_total += 1
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
