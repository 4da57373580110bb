"""A pool of pipelined connections to one dcache node.

Design
------
Connections pipeline (answers are matched by request id), so one connection
carries many requests at once and a node needs only a few. The pool therefore
*shares* connections instead of lending each one to a single caller
(emcache/asyncpg lend exclusively because their connections carry one request
at a time):

* Each open connection has a lease count (callers currently using it).
  ``acquire()`` takes the least-leased open connection if it has fewer than
  ``max_in_flight`` leases. There is no idle deque: with sharing, "idle" is
  just "zero leases", and least-leased-first spreads load so that one large
  value does not hold up every other request behind it.
* When every open connection already has a lease, the pool starts one
  background connect (up to ``max_connections``, counting connects in
  progress) but does not make the caller wait for it: the caller shares a busy
  connection now. Callers wait only when every connection is at
  ``max_in_flight`` and the pool is at ``max_connections``: they queue FIFO
  and are handed a slot (lease already counted) as slots free, bounded by the
  acquire timeout (builtin ``TimeoutError``). Waiting rather than failing is
  the point: a burst is smoothed, not turned into errors.
* The fast path (a slot is free and nobody queues) is a scan over at most
  ``max_connections`` entries with no future and no timeout.
* Closing or retired connections are never handed out; they are dropped from
  the pool the next time it looks, and callers already holding them finish.
  A body that raises does *not* close the connection: request ids keep the
  stream consistent whatever a caller does, so an exception says nothing
  about the connection (lost connections and protocol errors close
  themselves; the client retires a connection after a timeout).
* One background connector task opens connections. A failed connect is
  retried after a jittered, capped exponential backoff
  (``min(backoff_max_s, backoff_base_s * 2**(failures-1))`` times a random
  factor in [0.5, 1]). Each waiter waits for the outcome of at most one
  connect attempt: when an attempt fails and no connection is open, the
  current waiters fail with ``NoAvailableNodeError`` (so a client fails over
  after one connect timeout, not several). After ``unhealthy_after``
  consecutive failures with nothing open the pool is *unhealthy*: ``acquire``
  fails fast with ``NoAvailableNodeError`` and the connector keeps retrying
  in the background; the first success makes the pool healthy again.
  ``on_health_change`` is called on each flip.
* A waiter that was handed a slot and then cancelled (or timed out) before
  it resumed gives the slot back, so cancellation never leaks capacity.
  Release is synchronous, so it cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from ..errors import ConfigError, NoAvailableNodeError, OverloadedError, PoolClosedError, ServerError, error_from_status

__all__ = ["NodePool", "PoolConnection", "AcquireContext"]

log = logging.getLogger("dcache.client")


class PoolConnection(Protocol):
    """What the pool needs from a connection (``ClientConnection`` has it)."""

    @property
    def is_closing(self) -> bool:
        """Whether the connection takes no new requests."""
        ...

    def close(self) -> None:
        """Close the connection (idempotent)."""
        ...

    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed."""
        ...


ConnT = TypeVar("ConnT", bound=PoolConnection)

_DEFAULT: Any = object()


class _Entry(Generic[ConnT]):
    """One open connection and the number of callers currently using it."""

    __slots__ = ("conn", "leases")

    def __init__(self, conn: ConnT) -> None:
        self.conn = conn
        self.leases = 0


class NodePool(Generic[ConnT]):
    """Shared, pipelined connections to one node (see the module docstring).

    Args:
        connection_factory: coroutine function opening one connected,
            handshaken connection; its exceptions count as connect failures
            (a ``ServerError`` such as ``AuthError`` is passed to waiters as
            is; anything else, and ``OverloadedError``, a node at its
            connection limit, is wrapped in ``NoAvailableNodeError``).
        name: label for logs and errors, usually ``host:port``.
        min_connections: connections kept open once the pool is in use.
        max_connections: most connections open or connecting at once.
        max_in_flight: most concurrent users (leases) of one connection.
        acquire_timeout: default seconds ``acquire`` may wait for a slot;
            ``None`` waits without limit.
        backoff_base_s: first reconnect delay after a failure.
        backoff_max_s: cap of the reconnect delay.
        unhealthy_after: consecutive connect failures (with no connection
            open) after which the pool is unhealthy and fails fast.
        on_health_change: called as ``on_health_change(pool, healthy)``
            whenever ``healthy`` flips.

    Raises:
        ConfigError: a size, count or delay is out of range.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_connecting",
        "_connector",
        "_entries",
        "_factory",
        "_failures",
        "_grow",
        "_healthy",
        "_loop",
        "_on_health_change",
        "_waiters",
        "acquire_timeout",
        "backoff_base_s",
        "backoff_max_s",
        "max_connections",
        "max_in_flight",
        "min_connections",
        "name",
        "unhealthy_after",
    )

    def __init__(
        self,
        connection_factory: Callable[[], Awaitable[ConnT]],
        *,
        name: str = "",
        min_connections: int = 1,
        max_connections: int = 4,
        max_in_flight: int = 64,
        acquire_timeout: float | None = 5.0,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        unhealthy_after: int = 3,
        on_health_change: Callable[[NodePool[ConnT], bool], None] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if not 0 <= min_connections <= max_connections:
            raise ConfigError("min_connections must be between 0 and max_connections")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        if acquire_timeout is not None and acquire_timeout <= 0:
            raise ConfigError("acquire_timeout must be positive (or None)")
        if backoff_base_s <= 0 or backoff_max_s < backoff_base_s:
            raise ConfigError("backoff_base_s must be positive and backoff_max_s at least backoff_base_s")
        if unhealthy_after < 1:
            raise ConfigError("unhealthy_after must be at least 1")
        self._factory = connection_factory
        self.name = name
        self.min_connections = min_connections
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.acquire_timeout = acquire_timeout
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.unhealthy_after = unhealthy_after
        self._on_health_change = on_health_change
        self._entries: list[_Entry[ConnT]] = []
        self._waiters: deque[asyncio.Future[_Entry[ConnT]]] = deque()
        self._connecting = 0
        self._connector: asyncio.Task[None] | None = None
        self._grow = False
        self._failures = 0
        self._healthy = True
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return (
            f"<NodePool {self.name!r} open={self.size} in_use={self.in_use} "
            f"waiters={self.waiters} healthy={self._healthy}{' closed' if self._closed else ''}>"
        )

    # -- introspection -------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after ``unhealthy_after`` consecutive connect failures, until one succeeds."""
        return self._healthy

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def size(self) -> int:
        """Open connections (not closing)."""
        return sum(1 for e in self._entries if not e.conn.is_closing)

    @property
    def in_use(self) -> int:
        """Leases currently held, over all connections."""
        return sum(e.leases for e in self._entries)

    @property
    def waiters(self) -> int:
        """Callers queued for a slot."""
        return sum(1 for f in self._waiters if not f.done())

    @property
    def connections(self) -> list[ConnT]:
        """The open connections (a copy, for tools and tests)."""
        return [e.conn for e in self._entries if not e.conn.is_closing]

    # -- acquire / release ---------------------------------------------------

    def acquire(self, timeout: float | None = _DEFAULT) -> AcquireContext[ConnT]:
        """Borrow a share of a connection: ``async with pool.acquire() as conn:``.

        Args:
            timeout: seconds to wait for a slot when none is free; defaults to
                ``acquire_timeout``; ``None`` waits without limit. The fast
                path (a free slot) never waits.

        Returns:
            An async context manager yielding the connection and giving the
            slot back on exit.

        Raises (on entering):
            TimeoutError: no slot freed up within ``timeout``.
            NoAvailableNodeError: the pool is unhealthy, or the connect
                attempt this caller waited for failed with no connection open.
            AuthError, HandshakeError: the server refused the handshake.
            PoolClosedError: the pool is closed.
        """
        return AcquireContext(self, self.acquire_timeout if timeout is _DEFAULT else timeout)

    async def _acquire(self, timeout: float | None) -> _Entry[ConnT]:
        if self._closed:
            raise PoolClosedError(f"pool {self.name} is closed")
        if not self._waiters:
            entry = self._pick()
            if entry is not None:
                if entry.leases:  # every connection is busy: grow in the background
                    self._want_growth()
                entry.leases += 1
                return entry
        if not self._healthy:
            raise NoAvailableNodeError(f"node {self.name} is unavailable (reconnecting in the background)")
        loop = self._loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[_Entry[ConnT]] = loop.create_future()
        self._waiters.append(fut)
        self._dispatch()  # serves us at once if only cancelled waiters were queued; starts the connector
        try:
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # woken, then cancelled: give the slot back
            else:
                fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass
            raise

    def _pick(self) -> _Entry[ConnT] | None:
        """The least-leased open entry with a free slot (drops closing entries)."""
        best: _Entry[ConnT] | None = None
        stale = False
        for e in self._entries:
            if e.conn.is_closing:
                stale = True
            elif best is None or e.leases < best.leases:
                best = e
        if stale:
            self._entries = [e for e in self._entries if not e.conn.is_closing]
            if len(self._entries) < self.min_connections:
                self._ensure_connector()
        if best is None or best.leases >= self.max_in_flight:
            return None
        return best

    def _release(self, entry: _Entry[ConnT]) -> None:
        entry.leases -= 1
        if self._waiters:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters, first come first served."""
        waiters = self._waiters
        while waiters:
            fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            entry = self._pick()
            if entry is None:
                break
            waiters.popleft()
            entry.leases += 1
            fut.set_result(entry)
        if waiters:
            self._ensure_connector()

    # -- connecting ----------------------------------------------------------

    def _want_growth(self) -> None:
        if len(self._entries) + self._connecting < self.max_connections:
            self._grow = True
            self._ensure_connector()

    def _needs_connection(self) -> bool:
        if self._closed:
            return False
        open_n = sum(1 for e in self._entries if not e.conn.is_closing)
        if open_n >= self.max_connections:
            return False
        return not self._healthy or open_n < self.min_connections or self._grow or any(not f.done() for f in self._waiters)

    def _ensure_connector(self) -> None:
        if self._connector is None and self._needs_connection():
            loop = self._loop = self._loop or asyncio.get_running_loop()
            self._connector = loop.create_task(self._connect_loop(), name=f"dcache-pool-connect-{self.name}")

    async def _connect_loop(self) -> None:
        try:
            while self._needs_connection():
                self._grow = False
                self._connecting = 1
                try:
                    conn = await self._factory()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._connecting = 0
                    self._connect_failed(exc)
                    await asyncio.sleep(self._backoff_delay())
                    continue
                finally:
                    self._connecting = 0
                if self._closed:
                    conn.close()
                    return
                self._connected(conn)
        finally:
            self._connector = None

    def _connected(self, conn: ConnT) -> None:
        if self._failures:
            log.info("connected to %s after %d failed attempts", self.name, self._failures)
        self._failures = 0
        self._entries.append(_Entry(conn))
        if not self._healthy:
            self._set_healthy(True)
        self._dispatch()

    def _connect_failed(self, exc: Exception) -> None:
        self._failures += 1
        log.debug("connect to %s failed (%d in a row): %r", self.name, self._failures, exc)
        if any(not e.conn.is_closing for e in self._entries):
            return  # a growth connect failed; waiters still have connections to wait on
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_exception(self._connect_error(exc))
        if self._failures >= self.unhealthy_after and self._healthy:
            log.warning("node %s is unhealthy after %d failed connects: %r", self.name, self._failures, exc)
            self._set_healthy(False)

    def _connect_error(self, exc: Exception) -> BaseException:
        if isinstance(exc, ServerError) and not isinstance(exc, OverloadedError):  # refused our credentials or protocol
            return error_from_status(exc.code, exc.message)
        err = NoAvailableNodeError(f"cannot connect to {self.name}: {exc!r}")
        err.__cause__ = exc
        return err

    def _backoff_delay(self) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(self._failures - 1, 30))
        return delay * random.uniform(0.5, 1.0)

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self._on_health_change is not None:
            try:
                self._on_health_change(self, healthy)
            except Exception:
                log.exception("on_health_change callback failed for %s", self.name)

    async def connect(self, timeout: float | None = _DEFAULT) -> None:
        """Make sure a connection is open, opening one now if needed.

        Args:
            timeout: seconds to wait; defaults to ``acquire_timeout``.

        Raises:
            NoAvailableNodeError: the connect attempt failed or the pool is unhealthy.
            AuthError, HandshakeError: the server refused the handshake.
            TimeoutError: no connection within ``timeout``.
            PoolClosedError: the pool is closed.
        """
        async with self.acquire(timeout):
            pass

    # -- closing -------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection and fail queued callers (idempotent).

        Callers waiting for a slot get ``PoolClosedError``; requests in
        flight fail with ``ConnectionResetError``. Every connection is
        closed before the first wait, so a close cancelled midway (which
        raises ``CancelledError`` as any cancelled wait) leaves none open.
        """
        if self._closed:
            return
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(PoolClosedError(f"pool {self.name} is closed"))
        connector, self._connector = self._connector, None
        conns = [e.conn for e in self._entries]
        self._entries.clear()
        for conn in conns:  # before any await: a close cancelled midway has closed them all
            conn.close()
        if connector is not None:
            connector.cancel()
            await asyncio.wait([connector])  # its CancelledError stays its own; ours (the caller's) propagates
        for conn in conns:
            await conn.wait_closed()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and (self._entries or self._connector is not None):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)


class AcquireContext(Generic[ConnT]):
    """``async with pool.acquire() as conn``: one lease on a shared connection."""

    __slots__ = ("_entry", "_pool", "_timeout")

    def __init__(self, pool: NodePool[ConnT], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._entry: _Entry[ConnT] | None = None

    async def __aenter__(self) -> ConnT:
        self._entry = await self._pool._acquire(self._timeout)
        return self._entry.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._pool._release(entry)
