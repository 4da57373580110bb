"""Pipelined links from a master to its aux nodes.

This is the master's hot path, so it avoids futures and tasks where it can:
``AuxLink.send(op, args, callback)`` writes the request (frames written in
one loop iteration leave in one write) and the answer's ``(status, result)``
is handed to ``callback`` straight from ``data_received``. Callers that want
to ``await`` use ``request``, which wraps the same mechanism in a future.

An ``AuxLink`` keeps ``size`` connections to one aux node and spreads
requests over them round-robin; answers come back by request id.

Timeouts cost no timer per request: each request's deadline goes into a
deque (deadlines are appended in increasing order) and one sweeper per link
answers the overdue ones with ``UPSTREAM_TIMEOUT``. A lost connection
answers everything pending on it with ``UNAVAILABLE``. A link that cannot
connect answers at once with ``UNAVAILABLE`` and reconnects in the
background with jittered, capped backoff; the router then tries the key's
next owner.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
from collections.abc import Callable
from typing import Any, cast

from ..errors import HandshakeError, RemoteProtocolError, Status, error_from_status
from ..protocol import PROTOCOL_VERSION, FrameDecoder, Op, pack, queue_frame

__all__ = ["AuxLink", "UpstreamProtocol", "Callback"]

log = logging.getLogger("dcache.master.links")

#: Receives an answer: ``(status, result)``; for errors ``result`` is the message.
Callback = Callable[[int, Any], None]

_SWEEP_INTERVAL_S = 0.05
_BACKOFF_BASE_S = 0.05
_BACKOFF_MAX_S = 1.0
_MAX_REQUEST_ID = 2**32 - 1
_pack = pack
_UNAVAILABLE = int(Status.UNAVAILABLE)
_TIMEOUT = int(Status.UPSTREAM_TIMEOUT)


class UpstreamProtocol(asyncio.Protocol):
    """One connection from a master to an aux node."""

    __slots__ = (
        "_transport",
        "_decoder",
        "waiters",
        "_next_id",
        "_out",
        "_flush_scheduled",
        "_loop",
        "closed",
        "_name",
        "incarnation",
        "_on_answers",
    )

    def __init__(self, name: str, on_answers: Callable[[], None] | None = None) -> None:
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self.waiters: dict[int, Callback] = {}
        self._next_id = 1
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._name = name
        self.incarnation: int | None = None
        #: Called after the answers of one read were handed to their
        #: callbacks (the master writes its clients' answers then).
        self._on_answers = on_answers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiters = self.waiters
        self.waiters = {}
        message = f"connection to aux node {self._name} lost" + (f": {exc}" if exc else "")
        for cb in waiters.values():
            cb(_UNAVAILABLE, message)

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            log.warning("bad bytes from aux node %s: %s", self._name, exc)
            self.close()
            return
        waiters = self.waiters
        for msg in msgs:
            try:
                rid, status, result = msg
            except (TypeError, ValueError):
                self.close()
                return
            cb = waiters.pop(rid, None)
            if cb is not None:
                cb(status, result)
            elif rid == 0:  # connection-level error: the aux node closes next
                log.warning("aux node %s closed the link: %s", self._name, result)
        if self._on_answers is not None:
            self._on_answers()
        if self._decoder.error is not None:
            self.close()

    def send(self, op: int, args: tuple[Any, ...], cb: Callback) -> int:
        """Queue one request; ``cb`` gets its answer. Returns the request id."""
        waiters = self.waiters
        rid = self._next_id
        while rid in waiters:
            rid = rid + 1 if rid < _MAX_REQUEST_ID else 1
        self._next_id = rid + 1 if rid < _MAX_REQUEST_ID else 1
        waiters[rid] = cb
        queue_frame(self._out, _pack([op, rid, *args]))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return rid

    def _flush(self) -> None:
        self._flush_scheduled = False
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

    @property
    def pending_flush(self) -> bool:
        """Whether requests are queued for this loop iteration's write."""
        return self._flush_scheduled

    def fail(self, rid: int, status: int, message: str) -> None:
        """Answer a pending request locally (timeout)."""
        cb = self.waiters.pop(rid, None)
        if cb is not None:
            cb(status, message)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True


class AuxLink:
    """Connections from this master to one aux node."""

    __slots__ = (
        "node_id",
        "host",
        "port",
        "_size",
        "_timeout",
        "_auth_token",
        "_conns",
        "_rr",
        "_deadlines",
        "_sweeper",
        "_connector",
        "_failures",
        "_closed",
        "_loop",
        "requests",
        "failures_total",
        "incarnation",
        "on_restart",
        "_on_answers",
    )

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        *,
        size: int = 2,
        timeout: float = 2.0,
        auth_token: str | None = None,
        on_restart: Callable[[str], None] | None = None,
        on_answers: Callable[[], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self._size = size
        self._timeout = timeout
        self._auth_token = auth_token
        self._conns: list[UpstreamProtocol] = []
        self._rr = 0
        self._deadlines: collections.deque[tuple[float, UpstreamProtocol, int]] = collections.deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._connector: asyncio.Task[None] | None = None
        self._failures = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0
        self.failures_total = 0
        #: The aux process's incarnation (from HELLO); a new one means it restarted.
        self.incarnation: int | None = None
        #: Called (before the new connection carries any request) when the
        #: node answers with a new incarnation: it restarted and may hold
        #: stale data, so the master fences it first.
        self.on_restart = on_restart
        #: Called after each read's answers were handed to their callbacks.
        self._on_answers = on_answers

    @property
    def connected(self) -> bool:
        """Whether at least one connection is open."""
        return any(not c.closed for c in self._conns)

    @property
    def open_connections(self) -> int:
        """Connections open now (at most ``pool_size``)."""
        return sum(1 for c in self._conns if not c.closed)

    @property
    def pool_size(self) -> int:
        """Connections this link keeps open."""
        return self._size

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return sum(len(c.waiters) for c in self._conns)

    def start(self) -> None:
        """Start connecting and sweeping (idempotent)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_loop())
        self._ensure_connector()

    def _ensure_connector(self) -> None:
        if self._closed or self._loop is None:
            return
        if self._connector is None or self._connector.done():
            self._connector = asyncio.ensure_future(self._connect_loop())

    async def _open(self) -> UpstreamProtocol:
        loop = asyncio.get_running_loop()
        name = self.node_id
        on_answers = self._on_answers
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamProtocol(name, on_answers), self.host, self.port), self._timeout
        )
        fut: asyncio.Future[Any] = loop.create_future()

        def on_hello(status: int, result: Any) -> None:
            if not fut.done():
                fut.set_result((status, result))

        proto.send(Op.HELLO, (PROTOCOL_VERSION, self._auth_token, "dcache-master"), on_hello)
        try:
            status, result = await asyncio.wait_for(fut, self._timeout)
        except BaseException:
            proto.close()
            raise
        if status != 0:
            proto.close()
            raise error_from_status(status, str(result))
        if not isinstance(result, dict) or result.get("role") != "aux":
            proto.close()
            raise HandshakeError(f"{self.host}:{self.port} is not an aux node ({result!r})")
        incarnation = result.get("incarnation")
        proto.incarnation = incarnation if type(incarnation) is int else None
        return proto

    async def _connect_loop(self) -> None:
        while not self._closed:
            self._conns = [c for c in self._conns if not c.closed]
            if len(self._conns) >= self._size:
                return
            try:
                proto = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** min(self._failures, 10)) * random.uniform(0.5, 1.0)
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.info("cannot connect to aux %s at %s:%s (%s); retrying", self.node_id, self.host, self.port, exc)
                await asyncio.sleep(delay)
                continue
            if self._closed:
                proto.close()
                return
            self._failures = 0
            incarnation = proto.incarnation
            if incarnation is not None:
                if self.incarnation is not None and incarnation != self.incarnation:
                    log.warning("aux node %s restarted (new incarnation)", self.node_id)
                    for old in self._conns:
                        old.close()
                    self._conns = []
                    if self.on_restart is not None:
                        self.on_restart(self.node_id)
                self.incarnation = incarnation
            self._conns.append(proto)

    def _pick(self) -> UpstreamProtocol | None:
        # Requests made in one loop iteration share one connection: they leave
        # in one write, the aux node answers them in one write, and each
        # client's batch comes back together (one reply write per client).
        # The next iteration moves on to the next connection.
        conns = self._conns
        n = len(conns)
        if n:
            c = conns[self._rr % n]
            if c.pending_flush and not c.closed:
                return c
            i = self._rr = (self._rr + 1) % n
            c = conns[i]
            if not c.closed:
                if n < self._size:
                    self._ensure_connector()
                return c
            for c in conns:
                if not c.closed:
                    self._ensure_connector()
                    return c
        self._ensure_connector()
        return None

    def send(self, op: int, args: tuple[Any, ...], cb: Callback) -> None:
        """Send one request; ``cb(status, result)`` gets the answer, a timeout or a loss."""
        conn = self._pick()
        if conn is None:
            self.failures_total += 1
            cb(_UNAVAILABLE, f"aux node {self.node_id} at {self.host}:{self.port} is not connected")
            return
        self.requests += 1
        rid = conn.send(op, args, cb)
        loop = self._loop
        assert loop is not None
        self._deadlines.append((loop.time() + self._timeout, conn, rid))

    def flush(self) -> None:
        """Write what is queued on every connection now, not at the end of the iteration."""
        for c in self._conns:
            if c.pending_flush:
                c.flush_now()

    def request(self, op: int, *args: Any) -> asyncio.Future[Any]:
        """Send one request; the future gets the result or the typed error."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(status: int, result: Any) -> None:
            if fut.done():
                return
            if status == 0:
                fut.set_result(result)
            else:
                fut.set_exception(error_from_status(status, str(result)))

        self.send(op, args, done)
        return fut

    async def call(self, op: int, *args: Any) -> Any:
        """Send one request and await its result."""
        return await self.request(op, *args)

    async def _sweep_loop(self) -> None:
        deadlines = self._deadlines
        loop = asyncio.get_running_loop()
        message = f"aux node {self.node_id} did not answer within {self._timeout} s"
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = loop.time()
            while deadlines:
                deadline, conn, rid = deadlines[0]
                if rid not in conn.waiters:
                    deadlines.popleft()
                    continue
                if deadline > now:
                    break
                deadlines.popleft()
                self.failures_total += 1
                conn.fail(rid, _TIMEOUT, message)

    async def close(self) -> None:
        """Close every connection and stop the background tasks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in (self._sweeper, self._connector):
            if task is not None:
                task.cancel()
        for c in self._conns:
            c.close()
            c.connection_lost(None)
        self._conns.clear()
        self._deadlines.clear()
