"""One pipelined client connection to a dcache server.

``ClientConnection`` is an ``asyncio.Protocol`` that owns a ``FrameDecoder``
and a ``RequestTable`` of futures (``dcache.protocol.requests``, the id
allocation and answer matching every connection class shares). Many requests
share the connection at once (pipelining); answers may come back in any
order and are matched by id.

Design notes
------------
* Request ids come from the table: 1 .. 2**32 - 1, wrapping, skipping ids
  still in flight; 0 is reserved for connection-level error frames
  (``[0, status, message]``, after which the server closes), which fail every
  pending request.
* Frames written during one loop iteration are joined and written once, at
  the end of the iteration (``call_soon`` flush): a burst of pipelined
  requests costs one ``send`` syscall instead of one per request. A single
  request pays one extra ready-queue callback, which is far below the cost of
  the round trip it waits for.
* A caller that stops waiting (cancelled, timed out) forgets its id; a late
  answer for an unknown id is dropped. After a *timeout* the client calls
  ``retire()``: the connection takes no new requests, lets the requests
  already in flight finish, and closes when the last one is done, so a
  possibly stuck connection is never reused and nobody else's answer is lost.
* A request larger than the server's frame limit (``max_frame_bytes`` in
  its HELLO answer) is refused before it is queued: the server would close
  the connection on its header, failing every request pipelined on it.
  Without ``limits`` of its own, the connection takes answers up to that
  same limit (a server answers no frame larger than it accepts), so a
  value a node with raised limits stores can be read back.
* A connection the server stopped answering is retired by the first
  caller whose timeout passes; callers cancelled sooner from outside never
  see one pass, so the client also asks ``stalled`` (a request waiting
  longer than its timeout with no byte received since) before each use.
* Flow control: when the transport's buffer is above its high-water mark
  (``pause_writing``), ``call`` waits for ``resume_writing`` before writing.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext
from typing import Any, cast

from ..errors import ForeignProtocolError, HandshakeError, InvalidArgumentError, RemoteProtocolError, ServerError, error_from_status
from ..net import nodelay
from ..protocol import CONNECTION_REQUEST_ID, PROTOCOL_VERSION, FrameDecoder, Limits, Op, RequestTable, encode_request, foreign_protocol
from ..protocol.auth import prove
from ..protocol.framing import HEADER_BYTES as FRAME_HEADER_BYTES

__all__ = ["ClientConnection", "open_connection"]


class ClientConnection(asyncio.Protocol):
    """A pipelined connection: many requests in flight, answers matched by id.

    Build it with ``open_connection`` (which also performs HELLO); the
    constructor is for ``loop.create_connection`` factories and tests.

    Args:
        limits: size limits; ``limits.max_frame_bytes`` bounds one answer.
        loop: the event loop; defaults to the running loop at
            ``connection_made``.
    """

    __slots__ = (
        "_closed",
        "_closing",
        "_decoder",
        "_drain_waiters",
        "_error",
        "_loop",
        "_max_request_bytes",
        "_out",
        "_paused",
        "_requests",
        "_retiring",
        "_transport",
        "_unanswered_since",
        "server_info",
    )

    def __init__(self, *, limits: Limits | None = None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder((limits or Limits()).max_frame_bytes)
        self._requests: RequestTable[asyncio.Future[Any]] = RequestTable()
        self._out: list[bytes] = []
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._retiring = False
        self._error: BaseException | None = None  # why the connection failed, if it did
        self._closed: asyncio.Future[None] | None = None
        #: Largest request body the server reads (its HELLO's ``max_frame_bytes``); a larger
        #: frame would make it close the connection, failing every request on it.
        self._max_request_bytes: int | None = None
        #: Loop time of the first request queued since bytes last arrived (None: none since).
        self._unanswered_since: float | None = None
        #: The server's HELLO answer (``version``, ``node_id``, ``role``,
        #: limits); empty until ``open_connection`` has performed HELLO.
        self.server_info: dict[str, Any] = {}

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._out.clear()
        if self._error is None:
            self._error = exc
        self._fail_all()
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_exception(self._make_error())
        self._drain_waiters.clear()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    def data_received(self, data: bytes) -> None:
        self._unanswered_since = None  # the server is answering
        try:
            msgs = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self._abort(_foreign(data, exc) if not self.server_info else exc)
            return
        requests = self._requests
        pop = requests.pop
        for msg in msgs:
            try:
                rid, status, result = msg
            except (TypeError, ValueError):
                self._abort(_malformed())
                return
            fut = pop(rid)
            if fut is None:
                if rid == CONNECTION_REQUEST_ID:  # connection-level error: the server closes next
                    self._abort(error_from_status(status, _message(result)))
                    return
                if not _hashable(rid):
                    self._abort(_malformed())
                    return
                continue  # an answer nobody waits for any more (timed out)
            if fut.done():
                continue
            if status == 0:
                fut.set_result(result)
            else:
                fut.set_exception(error_from_status(status, _message(result)))
        if self._decoder.error is not None:
            self._abort(self._decoder.error)
        elif self._retiring and not requests:
            self.close()

    # -- requests ------------------------------------------------------------

    def request(self, op: int, *args: Any) -> asyncio.Future[Any]:
        """Send one request and return the future of its result.

        The frame is written at the end of the current loop iteration,
        together with every other request made in it. Prefer ``call``, which
        also honours flow control and forgets the id if the caller stops
        waiting.

        Args:
            op: the op code (``Op``).
            *args: the op's arguments after the request id.

        Returns:
            A future resolved with the result, or failed with the
            ``ServerError`` subclass for the answer's status,
            ``RemoteProtocolError`` if the server sent bad bytes, or
            ``ConnectionResetError`` if the connection is lost first.

        Raises:
            ConnectionResetError: the connection is closed, closing or retired
                (or the error that closed it: a ``ServerError`` from a
                connection-level error frame, a ``RemoteProtocolError``).
            LocalProtocolError: the arguments cannot be encoded.
            InvalidArgumentError: the request is larger than the server's
                frame limit (nothing was sent).
        """
        return self._send(op, args)[1]

    async def call(self, op: int, *args: Any) -> Any:
        """Send one request and wait for its result.

        Waits first while the transport's write buffer is over its
        high-water mark. If the caller is cancelled (or times out), the
        request id is forgotten and a late answer is dropped.

        Args:
            op: the op code (``Op``).
            *args: the op's arguments after the request id.

        Returns:
            The result the server sent.

        Raises:
            ServerError: the server answered with an error (the subclass
                registered for its status, e.g. ``BadArgumentsError``).
            RemoteProtocolError: the server sent bytes that are not frames.
            ConnectionResetError: the connection was lost or is closing.
            LocalProtocolError: the arguments cannot be encoded.
            InvalidArgumentError: the request is larger than the server's
                frame limit (nothing was sent).
        """
        if self._paused:
            await self.drain()
        rid, fut = self._send(op, args)
        try:
            return await fut
        except asyncio.CancelledError:
            if self._requests.forget(rid, fut) and self._retiring and not self._requests:
                self.close()
            raise

    async def drain(self) -> None:
        """Wait until the transport accepts writes again (no-op when it does).

        Raises:
            ConnectionResetError: the connection was lost while waiting.
        """
        if self._closing:
            raise self._make_error()
        if not self._paused:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def _send(self, op: int, args: tuple[Any, ...]) -> tuple[int, asyncio.Future[Any]]:
        if self._closing or self._retiring or self._transport is None:
            raise self._make_error()
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[Any] = loop.create_future()
        requests = self._requests
        rid = requests.add(fut)
        try:
            frame = encode_request(op, rid, *args)
        except Exception:  # LocalProtocolError: the arguments cannot be encoded
            requests.forget(rid, fut)
            raise
        limit = self._max_request_bytes
        if limit is not None and len(frame) - FRAME_HEADER_BYTES > limit:
            requests.forget(rid, fut)
            raise InvalidArgumentError(
                f"request of {len(frame) - FRAME_HEADER_BYTES} bytes exceeds the server's frame limit of {limit} bytes "
                "(max_frame_bytes): nothing was sent; send fewer or smaller values at once"
            )
        if self._unanswered_since is None:
            self._unanswered_since = loop.time()
        out = self._out
        out.append(frame)
        if len(out) == 1:
            loop.call_soon(self._flush)
        return rid, fut

    def _flush(self) -> None:
        out = self._out
        if not out or self._closing or self._transport is None:
            return
        if len(out) == 1:
            self._transport.write(out[0])
        else:
            self._transport.writelines(out)  # uvloop: one writev, no join copy
        out.clear()

    # -- state ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered (callers still waiting)."""
        return len(self._requests)

    @property
    def is_closing(self) -> bool:
        """Whether the connection is closed, closing, or retired (takes no new requests)."""
        return self._closing or self._retiring or self._transport is None or self._transport.is_closing()

    def stalled(self, now: float, after: float) -> bool:
        """Whether a request queued more than ``after`` seconds before ``now`` has had no byte of answer since.

        Its caller's own timeout would have retired the connection, but a
        caller cancelled first (an outer, shorter deadline) says nothing
        about the connection: the client asks this before each use.
        """
        since = self._unanswered_since
        return since is not None and now - since > after

    @property
    def node_id(self) -> str | None:
        """The server's node id from HELLO, if known."""
        value = self.server_info.get("node_id")
        return value if isinstance(value, str) else None

    def retire(self) -> None:
        """Take no new requests; close once the requests in flight are answered.

        Used after a timeout: the connection may be stuck, but other callers'
        answers on it should not be thrown away.
        """
        if self._closing:
            return
        self._retiring = True
        if not self._requests:
            self.close()

    def close(self) -> None:
        """Close now (idempotent): queued frames are flushed, pending requests fail.

        Pending requests fail with ``ConnectionResetError`` once the transport
        reports the connection lost. Bytes the transport still holds once the
        queued frames are handed to it (the server reads slower than we
        wrote, or not at all) are dropped with the connection: their answers
        would never be read, and a server that stopped reading must not hold
        the socket, its buffer and ``wait_closed`` forever.
        """
        if self._closing:
            return
        self._flush()
        self._closing = True
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    async def wait_closed(self) -> None:
        """Wait until the transport has reported the connection lost."""
        if self._closed is not None:
            await asyncio.shield(self._closed)

    def _handshaken(self, info: dict[str, Any], *, bound_answers: bool) -> None:
        """Keep the server's HELLO answer; its frame limit bounds our requests and, with ``bound_answers``, its answers.

        Called once HELLO (and AUTH) are answered, when nothing else is in
        flight or buffered, so the decoder can be replaced.
        """
        self.server_info = info
        limit = info.get("max_frame_bytes")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            return
        self._max_request_bytes = limit
        if bound_answers and limit != self._decoder.max_frame_bytes and not self._decoder.buffered:
            self._decoder = FrameDecoder(limit)  # a server never answers more than it accepts (its limit may be raised)

    # -- failure -------------------------------------------------------------

    def _abort(self, error: BaseException) -> None:
        """Fail every pending request with ``error`` and drop the connection."""
        if self._error is None:
            self._error = error
        self._closing = True
        self._out.clear()
        self._fail_all()
        if self._transport is not None:
            self._transport.abort()

    def _fail_all(self) -> None:
        if not self._requests:
            return
        for fut in self._requests.drain():
            if not fut.done():
                fut.set_exception(self._make_error())

    def _make_error(self) -> BaseException:
        """A fresh exception describing why the connection is unusable."""
        err = self._error
        if isinstance(err, ServerError):
            return error_from_status(err.code, err.message)
        if isinstance(err, ForeignProtocolError):
            return ForeignProtocolError(str(err), protocol=err.protocol)
        if isinstance(err, RemoteProtocolError):
            return RemoteProtocolError(str(err), status=err.status)
        if self._transport is None:
            text = "not connected"
        elif self._retiring and not self._closing:
            text = "connection retired after a timeout; it takes no new requests"
        elif err is None and self._closing and not self._transport.is_closing():
            text = "connection closed by the client"
        else:
            text = "connection to the dcache server was lost"
        new = ConnectionResetError(text)
        if err is not None:
            new.__cause__ = err
        return new


#: What a port that answers in another protocol probably is, and where to go instead.
_FOREIGN_HINTS = {
    "HTTP": "an HTTP port (the dcache HTTP shim's, 8080 by default, or a metrics port)",
    "RESP": "a Redis server or another RESP port",
}


def _foreign(data: bytes, exc: RemoteProtocolError) -> RemoteProtocolError:
    """``exc`` explained, if the server's first bytes (before HELLO was answered) are HTTP or RESP."""
    protocol = foreign_protocol(data)
    if protocol is None:
        return exc
    return ForeignProtocolError(
        f"the server answered in {protocol}, not the dcache protocol: this is probably {_FOREIGN_HINTS[protocol]}; "
        "dcache clients and tools need a master's port (7000 by default) or an aux node's (7101...)",
        protocol=protocol,
    )


def _message(result: Any) -> str:
    return result if isinstance(result, str) else repr(result)


def _malformed() -> RemoteProtocolError:
    return RemoteProtocolError("a response is an array [request_id, status, result]")


def _hashable(rid: object) -> bool:
    try:
        hash(rid)
    except TypeError:
        return False
    return True


async def open_connection(
    host: str,
    port: int,
    *,
    limits: Limits | None = None,
    connect_timeout: float | None = 2.0,
    auth_token: str | None = None,
    client_name: str | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    cluster_secret: bytes | None = None,
    ssl: SSLContext | None = None,
) -> ClientConnection:
    """Connect to a dcache server and perform HELLO (and AUTH, given ``cluster_secret``).

    Args:
        host: server host name or address.
        port: server TCP port.
        limits: size limits (``max_frame_bytes`` bounds one answer);
            ``None``: the frame limit the server's HELLO announces.
        connect_timeout: seconds for TCP connect plus HELLO; ``None``: no
            limit. With ``ssl`` it also bounds the TLS goodbye (close_notify)
            when the connection closes, which a server that stopped reading
            would otherwise hold for 30 seconds.
        auth_token: token sent in HELLO, if the server requires one.
        client_name: name the server may log for this connection.
        loop: event loop; defaults to the running one.
        cluster_secret: prove it with AUTH after HELLO for the cluster
            credential (both sides prove it; see docs/SECURITY.md).
        ssl: speak TLS with this client-side context (``None``: plain TCP);
            the server's certificate is checked against ``host``.

    Returns:
        A connected ``ClientConnection`` whose ``server_info`` holds the
        HELLO answer.

    Raises:
        TimeoutError: connect plus HELLO (and the TLS handshake) took longer than ``connect_timeout``.
        OSError: the TCP connection failed (e.g. ``ConnectionRefusedError``),
            or the TLS handshake did (``ssl.SSLError``, e.g. the server's
            certificate is not trusted).
        AuthError: the server rejected ``auth_token`` or ``cluster_secret``,
            or did not prove ``cluster_secret`` back.
        HandshakeError: the server does not speak our protocol version, or
            answered HELLO with something that is not a HELLO map.
        ForeignProtocolError: the server answered in HTTP or RESP (the
            address is not a dcache port; the message says what it probably is).
        RemoteProtocolError: the server sent other bytes that are not frames.
    """
    loop = loop or asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        if ssl is None:
            _, conn = await loop.create_connection(lambda: ClientConnection(limits=limits, loop=loop), host, port)
        else:  # the TLS goodbye when the connection closes gets as long as the hello: a stopped server holds close() no longer
            _, conn = await loop.create_connection(
                lambda: ClientConnection(limits=limits, loop=loop), host, port, ssl=ssl, ssl_shutdown_timeout=connect_timeout
            )
        try:
            info = await conn.call(Op.HELLO, PROTOCOL_VERSION, auth_token, client_name)
            if not isinstance(info, dict):
                raise HandshakeError(f"HELLO answered {type(info).__name__}, not a map")
            if info.get("version") != PROTOCOL_VERSION:
                raise HandshakeError(f"server speaks protocol version {info.get('version')!r}, this client {PROTOCOL_VERSION}")
            if cluster_secret is not None:
                await prove(lambda nonce, proof: conn.call(Op.AUTH, nonce, proof), info, cluster_secret, f"{host}:{port}")
        except BaseException:
            conn.close()
            raise
    conn._handshaken(info, bound_answers=limits is None)
    return conn
