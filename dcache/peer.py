"""Connections between daemons (sans futures on the hot path): ``PeerConnection`` and ``open_peer``.

A master's links to its aux nodes (``dcache.master.links``), a follower
master's connection to its coordinator and an aux node's to the master it
joined all use ``PeerConnection``: an ``asyncio.Protocol`` over a
``FrameDecoder`` and a ``RequestTable``. ``send(op, args, callback,
deadline)`` queues a request (frames queued in one loop iteration leave in
one write) and the answer's ``(status, result)`` goes to the callback
straight from ``data_received``; ``call`` wraps the same in an awaitable
with a timeout and raises the typed error of an error answer.

The public client (``dcache.client``) has its own connection class, with
flow control and futures per request, for applications.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ssl import SSLContext
from typing import Any, ClassVar, cast

from .errors import AuthError, HandshakeError, RemoteProtocolError, Status, error_from_status
from .net import nodelay
from .protocol import PROTOCOL_VERSION, PUSH_ID, FrameDecoder, Op, RequestTable, pack, queue_frame
from .protocol.auth import prove

__all__ = ["Callback", "PeerConnection", "answer_to", "handshake", "open_peer"]

log = logging.getLogger("dcache.peer")

#: Receives an answer: ``(status, result)``; for errors ``result`` is the message.
Callback = Callable[[int, Any], None]

_pack = pack
_UNAVAILABLE = int(Status.UNAVAILABLE)
_TIMEOUT = int(Status.UPSTREAM_TIMEOUT)
_PUSH_ID = PUSH_ID


class PeerConnection(asyncio.Protocol):
    """One connection from a daemon to another (a master's to an aux node, a follower's to its coordinator...).

    ``name`` says who is at the other end, for messages ("aux node a1").
    """

    __slots__ = (
        "_transport",
        "_decoder",
        "requests",
        "_out",
        "pending_flush",
        "_loop",
        "closed",
        "_name",
        "incarnation",
        "features",
        "_on_answers",
        "last_answer",
        "lease_from",
        "lease_ping",
        "server_info",
        "on_push",
        "routed_by",
    )

    #: The connection whose answers are being handed to their callbacks (None between reads): a
    #: callback learns which connection carried its answer (a master's near cache ties a copy
    #: made by a write's answer to the connection the owner subscribed).
    answering: ClassVar[PeerConnection | None] = None

    def __init__(self, name: str, on_answers: Callable[[], None] | None = None) -> None:
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        #: The requests waiting for an answer on this connection.
        self.requests: RequestTable[Callback] = RequestTable()
        self._out: list[bytes] = []
        #: Whether requests are queued for this loop iteration's write (its flush is scheduled).
        self.pending_flush = False
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._name = name
        self.incarnation: int | None = None
        #: The optional behaviours the peer's HELLO listed (``features``; an aux node's ``"keep-copy"``).
        self.features: frozenset[str] = frozenset()
        #: Called after the answers of one read were handed to their
        #: callbacks (the master writes its clients' answers then).
        self._on_answers = on_answers
        #: ``loop.time()`` of the last answer received.
        self.last_answer = self._loop.time()
        #: A near-cache lease on this connection (``dcache.master.links``): the
        #: ``loop.time()`` at which the newest PING the peer answered was sent.
        self.lease_from = float("-inf")
        #: Whether such a PING is in flight.
        self.lease_ping = False
        #: The peer's HELLO answer (``open_peer``).
        self.server_info: dict[str, Any] = {}
        #: Gets the frames the peer sends unasked: ``on_push(conn, kind, payload)`` (None: they are ignored).
        self.on_push: Callable[[PeerConnection, int, Any], None] | None = None
        #: The ring epoch this connection's requests are routed by, as last told to the peer (a master's EPOCH; 0: never).
        self.routed_by = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        message = f"connection to {self._name} lost" + (f": {exc}" if exc else "")
        for cb in self.requests.drain():
            cb(_UNAVAILABLE, message)

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            log.warning("bad bytes from %s: %s", self._name, exc)
            self.close()
            return
        if msgs:
            self.last_answer = self._loop.time()
        pop = self.requests.waiters.pop  # the table's dict, straight (the hot path)
        PeerConnection.answering = self
        try:
            for msg in msgs:
                try:
                    rid, status, result = msg
                    cb = pop(rid, None)
                except (TypeError, ValueError):  # not [id, status, result], or an unhashable id
                    log.warning("malformed answer from %s", self._name)
                    self.close()
                    return
                if cb is not None:
                    cb(status, result)
                elif rid == _PUSH_ID:
                    if self.on_push is not None:
                        self.on_push(self, status, result)
                elif rid == 0:  # connection-level error: the aux node closes next
                    log.warning("%s closed the connection: %s", self._name, result)
        finally:
            PeerConnection.answering = None
        if self._on_answers is not None:
            self._on_answers()
        if self._decoder.error is not None:
            self.close()

    def send(self, op: int, args: tuple[Any, ...], cb: Callback, deadline: float | None, late: bool = False, now: bool = False) -> int:
        """Queue one request; ``cb`` gets its answer (or a timeout once ``deadline`` passes, see ``fail_overdue``); returns its id.

        ``late``: the deadline is in the table's late lane (a request the peer may hold back on purpose).
        ``now``: write it (with the requests queued before it) at once, as ``flush_now``, instead of
        at the end of the loop iteration: no flush is scheduled for it.
        """
        rid = self.requests.add(cb, deadline, late=late)
        queue_frame(self._out, _pack([op, rid, *args]))
        if now:
            self._flush()
        elif not self.pending_flush:
            self.pending_flush = True
            self._loop.call_soon(self._flush)
        return rid

    def _flush(self) -> None:
        self.pending_flush = False
        out = self._out
        if out and not self.closed and self._transport is not None:
            if len(out) == 1:
                self._transport.write(out[0])
            else:
                self._transport.writelines(out)
        out.clear()

    def flush_now(self) -> None:
        """Write the queued requests now (the scheduled flush then finds nothing)."""
        self._flush()

    def fail_overdue(self, now: float, message: str) -> int:
        """Answer every request whose deadline passed with ``UPSTREAM_TIMEOUT``; return how many."""
        expired = self.requests.expired(now)
        for _, cb in expired:
            cb(_TIMEOUT, message)
        return len(expired)

    def fail_all(self, status: int, message: str) -> int:
        """Answer every request waiting on this connection now; return how many."""
        waiting = self.requests.drain()
        for cb in waiting:
            cb(status, message)
        return len(waiting)

    async def call(self, op: int, *args: Any, timeout: float) -> Any:
        """Send one request and wait for its result, at most ``timeout`` seconds.

        Raises:
            ServerError: the error the peer answered (``UnavailableError`` if the connection is lost).
            TimeoutError: no answer in time (a late answer is dropped).
        """
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()
        done = answer_to(fut)
        if self.closed:
            raise error_from_status(_UNAVAILABLE, f"connection to {self._name} is closed")
        # No deadline in the table: asyncio.timeout bounds this wait, and the
        # connections call() is used on (follower, join agent) have no sweeper
        # to drop answered requests' deadlines (one entry per call, forever).
        rid = self.send(op, args, done, None)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if not fut.done():
                fut.cancel()
            self.requests.forget(rid, done)  # a timeout cancels fut before this runs: forget unconditionally

    @property
    def is_closing(self) -> bool:
        """Whether the connection is closed or closing."""
        return self.closed or self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        """Close the connection; requests waiting on it are answered ``UNAVAILABLE``."""
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True


def answer_to(fut: asyncio.Future[Any]) -> Callback:
    """A callback that settles ``fut`` with an answer: the result, or the typed error of an error status."""

    def done(status: int, result: Any) -> None:
        if fut.done():
            return
        if status == 0:
            fut.set_result(result)
        else:
            fut.set_exception(error_from_status(status, str(result)))

    return done


async def handshake(
    conn: PeerConnection,
    *,
    name: str,
    auth_token: str | None,
    client_name: str,
    secret: bytes | None,
    timeout: float,
    expect_role: str | None = None,
) -> dict[str, Any]:
    """HELLO, then (with a cluster secret) AUTH both ways, on a new connection; return the HELLO answer.

    Raises:
        ServerError: HELLO or AUTH was refused (``AuthError``, ``HandshakeError``...).
        AuthError: the peer has no cluster secret, or did not prove it; or it
            has one and ``secret`` is ``None``.
        HandshakeError: the peer is not a ``expect_role`` node.
        TimeoutError: an answer took longer than ``timeout``.
    """
    info = await conn.call(Op.HELLO, PROTOCOL_VERSION, auth_token, client_name, timeout=timeout)
    if not isinstance(info, dict):
        raise HandshakeError(f"{name} answered HELLO with {type(info).__name__}, not a map")
    if expect_role is not None and info.get("role") != expect_role:
        raise HandshakeError(f"{name} is not a {expect_role} (it says it is {info.get('role')!r})")
    if secret is not None:
        await prove(lambda nonce, proof: conn.call(Op.AUTH, nonce, proof, timeout=timeout), info, secret, name)
    elif "nonce" in info:
        raise AuthError(f"{name} has a cluster secret and this node has none (start it with --cluster-secret-file)")
    return info


async def open_peer(
    host: str,
    port: int,
    *,
    name: str,
    auth_token: str | None,
    client_name: str,
    timeout: float,
    expect_role: str | None = None,
    secret: bytes | None = None,
    ssl: SSLContext | None = None,
) -> PeerConnection:
    """Connect to another daemon and ``handshake``; the connection's ``server_info`` holds the HELLO answer.

    With ``ssl`` (the daemon's peer context, ``dcache.tls``) the connection is TLS.

    Raises:
        TimeoutError: connect plus handshake took longer than ``timeout``.
        OSError: the TCP connection failed (``ssl.SSLError``: the TLS handshake did).
        ServerError: HELLO or AUTH was refused (``AuthError``, ``HandshakeError``...).
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(lambda: PeerConnection(name), host, port, ssl=ssl)
        try:
            info = await handshake(
                conn, name=name, auth_token=auth_token, client_name=client_name, secret=secret, timeout=timeout, expect_role=expect_role
            )
        except BaseException:
            conn.close()
            raise
    conn.server_info = info
    return conn
