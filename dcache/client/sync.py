"""``SyncClient``: the ``Client`` API, blocking, run on a private event loop thread.

The loop (uvloop when installed) runs in a daemon thread that the
``SyncClient`` owns; each method submits the matching ``Client`` coroutine
with ``asyncio.run_coroutine_threadsafe`` and blocks for its result, so
timeouts and errors are exactly ``Client``'s.

Design note
-----------
* A call is submitted under a lock that ``close`` takes to mark the client
  closed, and the calls still waiting once the loop has stopped are failed
  with ``PoolClosedError``: a call made by one thread while another closes
  the client either runs before the close or fails, and never waits for a
  loop that will not run it again.
* The loop thread does not exist in a child made by ``fork()``: a call
  there raises ``RuntimeError`` at once (it waited forever), and ``close``
  in the child only marks its copy closed (the connections are the
  parent's).
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import InvalidStateError
from types import TracebackType
from typing import Any, TypeVar

from ..errors import PoolClosedError
from .client import Client, Key, Pairs, Value

__all__ = ["SyncClient"]

_T = TypeVar("_T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        asyncio.set_event_loop(None)
        loop.close()  # here, not in the caller's thread: also runs when an unclosed SyncClient is collected


def _shutdown_soon(loop: asyncio.AbstractEventLoop, client: Client) -> None:
    async def shutdown() -> None:
        try:
            await client.close()
        finally:
            loop.stop()

    loop.create_task(shutdown())


class SyncClient:
    """Blocking client: the ``Client`` API run on a private event loop thread.

    The loop (uvloop when installed) runs in a daemon thread; each method
    submits the matching ``Client`` coroutine and blocks for its result, so
    the timeouts and errors are the same as ``Client``'s. Safe to call from
    several threads at once. Close it (or use ``with``). Not usable in a
    process forked after it was made (``RuntimeError``): make one per
    process, after the fork.

    Args:
        endpoints: as for ``Client``.
        **options: keyword arguments of ``Client`` (its options, or ``config=``);
            ``ssl=context`` speaks TLS, as for ``Client``.

    Raises:
        ConfigError: bad endpoints or options.
    """

    def __init__(self, endpoints: str | Sequence[str] | None = None, **options: Any) -> None:
        self._closed = True  # until the thread runs, for __del__
        self._client = Client(endpoints, **options)
        self._pid = os.getpid()
        #: Taken to submit a call and to mark the client closed, so no call is submitted after the close.
        self._lock = threading.Lock()
        #: Calls submitted and not yet returned; those left when the loop has stopped are failed.
        self._calls: set[ConcurrentFuture[Any]] = set()
        self._loop = _new_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="dcache-sync-client", daemon=True)
        self._thread.start()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SyncClient {','.join(self._client.endpoints)}{' closed' if self._closed else ''}>"

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._pid != os.getpid():  # before the lock: a thread of the parent may have held it at the fork
            coro.close()
            raise RuntimeError(
                f"this SyncClient was created in process {self._pid} and cannot be used in a process forked from it; "
                "create a SyncClient in each process, after the fork"
            )
        with self._lock:
            if self._closed:
                coro.close()
                raise PoolClosedError("the client is closed")
            if threading.current_thread() is self._thread:
                coro.close()
                raise RuntimeError("SyncClient methods cannot be called from its own event loop thread")
            fut: ConcurrentFuture[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._calls.add(fut)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt while waiting
            raise
        finally:
            self._calls.discard(fut)

    @property
    def client(self) -> Client:
        """The underlying asyncio ``Client`` (runs on this object's loop thread)."""
        return self._client

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the loop thread (idempotent).

        Calls other threads are making fail (``PoolClosedError``, or
        ``ConnectionResetError`` for a request already sent); in a process
        forked after the client was made this only marks it closed.

        Raises:
            RuntimeError: called from the client's own loop thread.
        """
        if self._pid != os.getpid():  # the parent's connections: leave them alone
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            if threading.current_thread() is self._thread:
                raise RuntimeError("SyncClient.close() cannot be called from its own event loop thread")
            self._closed = True  # no call is submitted from here on
            closing = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
        try:
            closing.result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            for call in list(self._calls):  # submitted before the close, never run or never finished
                try:
                    call.set_exception(PoolClosedError("the client was closed before the call finished"))
                except InvalidStateError:  # it finished, or its caller cancelled it
                    pass

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._pid == os.getpid():
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            # Close the connections and stop the thread without blocking: this
            # may run in any thread, the loop's own included.
            try:
                self._loop.call_soon_threadsafe(_shutdown_soon, self._loop, self._client)
            except RuntimeError:  # the loop is already closed
                pass

    def connect(self) -> None:
        """Connect now (see ``Client.connect``)."""
        self._run(self._client.connect())

    def execute(self, op: int, *args: Any) -> Any:
        """Send one raw request (see ``Client.execute``)."""
        return self._run(self._client.execute(op, *args))

    def get(self, key: Key) -> bytes | None:
        """The value of ``key`` as bytes, or ``None`` (see ``Client.get``)."""
        return self._run(self._client.get(key))

    def set(self, key: Key, value: Value, ttl: float | None = None, *, nx: bool = False, xx: bool = False) -> bool:
        """Store ``value``; ``False`` if the nx/xx condition failed (see ``Client.set``)."""
        return self._run(self._client.set(key, value, ttl, nx=nx, xx=xx))

    def delete(self, key: Key) -> bool:
        """Delete ``key``; ``True`` if it existed (see ``Client.delete``)."""
        return self._run(self._client.delete(key))

    def mget(self, keys: Iterable[Key]) -> list[bytes | None]:
        """Values of several keys in order, ``None`` for missing (see ``Client.mget``)."""
        return self._run(self._client.mget(keys))

    def mset(self, mapping: Pairs, ttl: float | None = None) -> int:
        """Store several pairs; returns how many were stored (see ``Client.mset``)."""
        return self._run(self._client.mset(mapping, ttl))

    def exists(self, key: Key) -> bool:
        """Whether ``key`` exists (see ``Client.exists``)."""
        return self._run(self._client.exists(key))

    def expire(self, key: Key, ttl: float) -> bool:
        """Expire ``key`` in ``ttl`` seconds; ``True`` if it existed (see ``Client.expire``)."""
        return self._run(self._client.expire(key, ttl))

    def ttl(self, key: Key) -> float | None:
        """Seconds left; ``None`` if missing, ``-1.0`` if no expiry (see ``Client.ttl``)."""
        return self._run(self._client.ttl(key))

    def incr(self, key: Key, delta: int = 1) -> int:
        """Add ``delta``; returns the new value (see ``Client.incr``)."""
        return self._run(self._client.incr(key, delta))

    def decr(self, key: Key, delta: int = 1) -> int:
        """Subtract ``delta``; returns the new value (see ``Client.decr``)."""
        return self._run(self._client.decr(key, delta))

    def touch(self, key: Key) -> bool:
        """Refresh ``key``'s recency; ``True`` if it exists (see ``Client.touch``)."""
        return self._run(self._client.touch(key))

    def persist(self, key: Key) -> bool:
        """Remove ``key``'s expiry; ``True`` if it had one (see ``Client.persist``)."""
        return self._run(self._client.persist(key))

    def ping(self) -> float:
        """Round-trip seconds of a PING (see ``Client.ping``)."""
        return self._run(self._client.ping())

    def stats(self) -> dict[str, Any]:
        """The server's statistics (see ``Client.stats``)."""
        return self._run(self._client.stats())
