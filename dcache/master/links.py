"""Pipelined links from a master to its aux nodes.

An ``AuxLink`` keeps a few ``ClientConnection``s to one aux node and spreads
requests over them round-robin; answers come back by request id, so a
handful of connections carries any number of concurrent requests.

Timeouts are enforced without a timer per request (the hot path): each
request's future is appended with its deadline to a deque, and one sweeper
task per link fails the futures whose deadline passed. Deadlines are
appended in increasing order, so the sweep only looks at the front.

A link that cannot connect fails requests at once with
``UnavailableError`` and reconnects in the background with jittered, capped
backoff; the router then tries the key's next owner.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from typing import Any

from ..client.connection import ClientConnection, open_connection
from ..errors import UnavailableError, UpstreamTimeoutError
from ..protocol import Limits

__all__ = ["AuxLink"]

log = logging.getLogger("dcache.master.links")

_SWEEP_INTERVAL_S = 0.05
_BACKOFF_BASE_S = 0.05
_BACKOFF_MAX_S = 1.0


class AuxLink:
    """Connections from this master to one aux node."""

    __slots__ = (
        "node_id",
        "host",
        "port",
        "_size",
        "_timeout",
        "_limits",
        "_auth_token",
        "_client_name",
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
    )

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        *,
        size: int = 2,
        timeout: float = 2.0,
        limits: Limits | None = None,
        auth_token: str | None = None,
        client_name: str = "dcache-master",
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self._size = size
        self._timeout = timeout
        self._limits = limits
        self._auth_token = auth_token
        self._client_name = client_name
        self._conns: list[ClientConnection] = []
        self._rr = 0
        self._deadlines: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._connector: asyncio.Task[None] | None = None
        self._failures = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0
        self.failures_total = 0

    @property
    def connected(self) -> bool:
        """Whether at least one connection is open."""
        return any(not c.is_closing for c in self._conns)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return sum(c.pending for c in self._conns)

    def start(self) -> None:
        """Start connecting and sweeping (idempotent)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_loop())
        self._ensure_connector()

    def _ensure_connector(self) -> None:
        if self._closed:
            return
        if self._connector is None or self._connector.done():
            self._connector = asyncio.ensure_future(self._connect_loop())

    async def _connect_loop(self) -> None:
        while not self._closed:
            self._conns = [c for c in self._conns if not c.is_closing]
            if len(self._conns) >= self._size:
                return
            try:
                conn = await open_connection(
                    self.host,
                    self.port,
                    limits=self._limits,
                    connect_timeout=self._timeout,
                    auth_token=self._auth_token,
                    client_name=self._client_name,
                )
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
                conn.close()
                return
            self._failures = 0
            self._conns.append(conn)

    def request(self, op: int, *args: Any) -> asyncio.Future[Any]:
        """Send one request; the future fails with ``UnavailableError`` or ``UpstreamTimeoutError``."""
        conns = self._conns
        n = len(conns)
        if n:
            i = self._rr = (self._rr + 1) % n
            conn: ClientConnection | None = conns[i]
            if conn is not None and conn.is_closing:
                conn = self._first_open()
            if conn is not None:
                self.requests += 1
                fut = conn.request(op, *args)
                loop = self._loop
                assert loop is not None
                self._deadlines.append((loop.time() + self._timeout, fut))
                if n < self._size:
                    self._ensure_connector()
                return fut
        self._ensure_connector()
        self.failures_total += 1
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.create_future()
        fut.set_exception(UnavailableError(f"aux node {self.node_id} at {self.host}:{self.port} is not connected"))
        return fut

    def _first_open(self) -> ClientConnection | None:
        for c in self._conns:
            if not c.is_closing:
                return c
        self._ensure_connector()
        return None

    async def call(self, op: int, *args: Any) -> Any:
        """Send one request and await its result (connection loss becomes ``UnavailableError``)."""
        try:
            return await self.request(op, *args)
        except (ConnectionError, OSError) as exc:
            self.failures_total += 1
            raise UnavailableError(f"aux node {self.node_id}: {exc or exc.__class__.__name__}") from None

    async def _sweep_loop(self) -> None:
        deadlines = self._deadlines
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = loop.time()
            while deadlines:
                deadline, fut = deadlines[0]
                if fut.done():
                    deadlines.popleft()
                    continue
                if deadline > now:
                    break
                deadlines.popleft()
                self.failures_total += 1
                fut.set_exception(UpstreamTimeoutError(f"aux node {self.node_id} did not answer within {self._timeout} s"))

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
        for c in self._conns:
            try:
                await asyncio.wait_for(c.wait_closed(), 1.0)
            except (TimeoutError, Exception):
                pass
        self._conns.clear()
        for _, fut in self._deadlines:
            if not fut.done():
                fut.set_exception(UnavailableError(f"link to aux node {self.node_id} closed"))
        self._deadlines.clear()
