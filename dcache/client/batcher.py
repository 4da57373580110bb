"""``GetBatcher`` and ``SetBatcher``: the ``get``s (``set``s) of one loop iteration sent as one ``mget`` (``mset``) on a ``Client``.

A program that serves many concurrent readers (the HTTP shim answers each
``GET /data/{key}`` with one read) pays per ``Client.get`` a coroutine
chain, a timeout and a frame, and the server a frame; with many reads in
flight most loop iterations start several, and one MGET for all of them
costs about one call. ``GetBatcher.get`` queues the key and returns a
future; the batch leaves on the next loop iteration (``call_soon``), or at
once when it reaches its size cap. A lone key goes as a GET.

Design note
-----------
* **Answer size.** An MGET answer holds every value of the batch in one
  frame, and a frame over the client's limit (its ``limits``, or else the
  server's, 32 MiB by default) closes the connection it came on, or is
  refused with ``FrameTooLargeError`` by a server that checks. So batches
  are capped at ``max_keys``, and fewer when recent values were large: the
  cap is ``answer_bytes`` over the largest value seen lately, a hint that
  decays by 1/16 per batch.
* **Errors.** A batch whose answer fails for a reason that may belong to one
  key or to the batch (an error the server answered, an answer too large to
  receive) is read again key by key over the ``fallback`` client, so each
  reader gets the answer it would have had alone; after an answer too large
  the batcher sends one GET at a time until the hint has decayed. Errors
  that say the cluster is unreachable or slow (timeouts, no endpoint) go to
  every read of the batch, without a second try.
* **A second client.** The connection an oversized answer arrived on is
  closed with everything in flight on it, so a program that cannot afford
  that for its other calls gives the batcher a ``Client`` of its own and
  its main one as ``fallback`` (the HTTP shim does).

Cost: one list append and one future per ``get`` (no future with
``get_into``, which delivers to an object of the caller's, a ``Sink``); one
task per batch. The same for ``set`` and ``set_into``.

``SetBatcher`` does the same for writes: the ``set``s of one iteration with
the same TTL leave as one MSET (a lone one as a SET), capped at
``max_keys`` pairs and ``max_bytes`` of keys and values (a larger value
leaves alone). A batch the cluster refuses, or that one pair fails, is
written again pair by pair over ``fallback``, so each writer gets the
answer it would have had alone; writing a pair twice is harmless (a SET
without a condition, last writer wins, the second write a newer version).
Only unconditional writes are batched: SET with NX/XX is not repeatable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from ..errors import (
    ClientError,
    ConfigError,
    FrameTooLargeError,
    InvalidArgumentError,
    RemoteProtocolError,
    ServerError,
    UpstreamTimeoutError,
)
from ..protocol import MAX_VALUE_BYTES
from .client import Client, Key

__all__ = ["GetBatcher", "SetBatcher", "BatchStats", "Sink", "BATCH_ANSWER_BYTES", "BATCH_WRITE_BYTES"]

#: Answer size one batch of reads is planned for, by default.
BATCH_ANSWER_BYTES = 4 * 1024 * 1024
#: Most bytes of keys and values in one batch of writes, by default.
BATCH_WRITE_BYTES = 1024 * 1024
#: Smallest value size the batcher plans with.
_MIN_VALUE_HINT_BYTES = 4096


_T_contra = TypeVar("_T_contra", contravariant=True)


class Sink(Protocol[_T_contra]):
    """Where ``GetBatcher.get_into`` delivers a read (``Sink[bytes | None]``) and ``SetBatcher.set_into`` a write (``Sink[None]``).

    The part of ``asyncio.Future`` the batchers use: a future is one; a
    program that answers each call with a callback gives its own object
    instead and saves the future's machinery (the HTTP shim). ``set_result``
    and ``set_exception`` are called at most once in all, only while
    ``done()`` is false, and must not raise: the batch delivers its other
    calls after it.
    """

    def done(self) -> bool:
        """Whether the result was delivered."""
        ...

    def set_result(self, result: _T_contra, /) -> None:
        """The result: a read's value (``None`` if the key does not exist), or ``None`` for a stored write."""
        ...

    def set_exception(self, exc: BaseException, /) -> None:
        """What ``Client.get`` (``Client.set``) would have raised for this call."""
        ...


_Batch = list[tuple[Key, Sink[bytes | None]]]


class BatchStats:
    """What a ``GetBatcher`` did, as plain counters (a metrics collector reads them at scrape time).

    Attributes:
        batches: batches sent (an MGET or MSET, or a GET or SET for a lone key).
        keys: keys read (written) in those batches (over ``batches``: the mean batch size).
        fallbacks: batches sent again key by key after the batch failed.
    """

    __slots__ = ("batches", "keys", "fallbacks")

    batches: int
    keys: int
    fallbacks: int

    def __init__(self) -> None:
        self.batches = 0
        self.keys = 0
        self.fallbacks = 0


class _Batcher:
    """What both batchers share: the clients, the cap on keys per batch, the counters, and the batches in flight."""

    __slots__ = ("client", "fallback", "max_keys", "stats", "_loop", "_tasks")

    client: Client
    fallback: Client
    max_keys: int
    stats: BatchStats
    _loop: asyncio.AbstractEventLoop | None
    _tasks: set[asyncio.Task[None]]

    def __init__(self, client: Client, fallback: Client | None, max_keys: int, stats: BatchStats | None, bound: tuple[str, int]) -> None:
        """``bound``: the batcher's other size option, ``(name, value)``, checked like ``max_keys``."""
        for name, value in (("max_keys", max_keys), bound):
            if value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        self.client = client
        self.fallback = client if fallback is None else fallback
        self.max_keys = max_keys
        self.stats = BatchStats() if stats is None else stats
        self._loop = None
        self._tasks = set()

    async def close(self) -> None:
        """Wait for the batches in flight (call after closing the clients: they fail fast then)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, batch: Coroutine[Any, Any, None]) -> None:
        """Run one batch's coroutine as a task, kept until it is done."""
        assert self._loop is not None
        task = self._loop.create_task(batch)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class GetBatcher(_Batcher):
    """Batches the ``get``s made in one loop iteration into one ``mget`` on a ``Client`` (see the module note).

    Args:
        client: the client the batches go over.
        fallback: the client a failed batch is read again over, key by key
            (default: ``client``).
        max_keys: most keys in one batch.
        answer_bytes: answer size a batch is planned for: the cap on keys
            shrinks to ``answer_bytes`` over the largest value seen lately.
        stats: counters to add to (default: new ones; see ``stats``).

    Raises:
        ConfigError: ``max_keys`` or ``answer_bytes`` is below 1.
    """

    __slots__ = ("_answer_bytes", "_cap", "_hint", "_pending")

    _answer_bytes: int
    _cap: int
    _hint: int
    _pending: _Batch

    def __init__(
        self,
        client: Client,
        *,
        fallback: Client | None = None,
        max_keys: int = 64,
        answer_bytes: int = BATCH_ANSWER_BYTES,
        stats: BatchStats | None = None,
    ) -> None:
        super().__init__(client, fallback, max_keys, stats, ("answer_bytes", answer_bytes))
        self._answer_bytes = answer_bytes
        self._hint = _MIN_VALUE_HINT_BYTES
        self._cap = self._cap_for(self._hint)
        self._pending = []

    def get(self, key: Key) -> asyncio.Future[bytes | None]:
        """The value of ``key``, read with the other reads of this loop iteration.

        Returns:
            A future of the value as ``bytes``, or ``None`` if the key does
            not exist; it fails with what ``Client.get`` would raise for
            this key (``TimeoutError``, ``NoAvailableNodeError``,
            ``InvalidArgumentError``, ``KeyTooLargeError``, another
            ``ServerError``...).
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        self.get_into(key, fut)
        return fut

    def get_into(self, key: Key, sink: Sink[bytes | None]) -> None:
        """Read ``key`` with the other reads of this loop iteration into ``sink`` (``get`` without a future).

        ``sink`` gets what ``get``'s future would: the value (``None`` for a
        missing key) or the exception.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = self._pending
        pending.append((key, sink))
        if len(pending) >= self._cap:
            self._flush()
        elif len(pending) == 1:
            loop.call_soon(self._flush)

    def _cap_for(self, hint: int) -> int:
        return max(1, min(self.max_keys, self._answer_bytes // hint))

    def _flush(self) -> None:
        batch = self._pending
        if not batch:
            return
        self._pending = []
        self._start(self._send(batch))

    async def _key_by_key(self, batch: _Batch, exc: Exception, *, too_large: bool) -> None:
        """After a batch failed for ``exc``, which may be one key's fault: read each key on its own (a lone key fails)."""
        if len(batch) == 1 and not too_large:
            _fail_all(batch, exc)
            return
        self.stats.fallbacks += 1
        if too_large:  # one GET at a time until the hint has decayed
            self._hint = MAX_VALUE_BYTES
            self._cap = 1
        await asyncio.gather(*(self._one(key, fut) for key, fut in batch))

    async def _send(self, batch: _Batch) -> None:
        stats = self.stats
        stats.batches += 1
        stats.keys += len(batch)
        try:
            if len(batch) == 1:
                values = [await self.client.get(batch[0][0])]
            else:
                values = await self.client.mget([key for key, _ in batch])
        except InvalidArgumentError as exc:  # one key the client refuses to send: read the others one by one
            await self._key_by_key(batch, exc, too_large=False)
            return
        except (UpstreamTimeoutError, TimeoutError, ClientError, OSError) as exc:  # unreachable or slow: the same for every key
            _fail_all(batch, exc)
            return
        except (ServerError, RemoteProtocolError) as exc:  # may be one key's fault, or an answer too large
            await self._key_by_key(batch, exc, too_large=isinstance(exc, (RemoteProtocolError, FrameTooLargeError)))
            return
        except asyncio.CancelledError:  # no read may wait forever
            _fail_all(batch, ClientError("the read was cancelled"))
            raise
        except Exception as exc:  # a bug: every read of the batch gets it
            _fail_all(batch, exc)
            return
        largest = 0
        for (_, fut), value in zip(batch, values, strict=True):
            if value is not None and len(value) > largest:
                largest = len(value)
            if not fut.done():
                fut.set_result(value)
        hint = self._hint
        hint = largest if largest > hint else max(_MIN_VALUE_HINT_BYTES, hint - (hint >> 4))
        if hint != self._hint:
            self._hint = hint
            self._cap = self._cap_for(hint)

    async def _one(self, key: Key, fut: Sink[bytes | None]) -> None:
        try:
            value = await self.fallback.get(key)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(value)


_Write = tuple[Key, bytes, Sink[None]]


class SetBatcher(_Batcher):
    """Batches the unconditional ``set``s made in one loop iteration into one ``mset`` per TTL on a ``Client`` (see the module note).

    Args:
        client: the client the batches go over.
        fallback: the client a failed batch is written again over, pair by
            pair (default: ``client``).
        max_keys: most pairs in one batch.
        max_bytes: most bytes of keys and values in one batch; a pair as
            large leaves on its own.
        stats: counters to add to (default: new ones; see ``stats``).

    Raises:
        ConfigError: ``max_keys`` or ``max_bytes`` is below 1.
    """

    __slots__ = ("max_bytes", "_pending", "_sizes", "_scheduled")

    max_bytes: int
    #: Writes waiting, by TTL (one batch per TTL), and the bytes of their keys and values.
    _pending: dict[float | None, list[_Write]]
    _sizes: dict[float | None, int]
    _scheduled: bool

    def __init__(
        self,
        client: Client,
        *,
        fallback: Client | None = None,
        max_keys: int = 64,
        max_bytes: int = BATCH_WRITE_BYTES,
        stats: BatchStats | None = None,
    ) -> None:
        super().__init__(client, fallback, max_keys, stats, ("max_bytes", max_bytes))
        self.max_bytes = max_bytes
        self._pending = {}
        self._sizes = {}
        self._scheduled = False

    def set(self, key: Key, value: bytes, ttl: float | None = None) -> asyncio.Future[None]:
        """Store ``value`` under ``key`` (``ttl`` seconds, or ``None``: never expires), with the other writes of this loop iteration.

        Returns:
            A future done (``None``) once the write is stored; it fails
            with what ``Client.set`` would raise for this pair
            (``InvalidArgumentError``, ``ValueTooLargeError``,
            ``OutOfMemoryError``, ``TimeoutError``, ``NoAvailableNodeError``,
            another ``ServerError``...).
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.set_into(key, value, ttl, fut)
        return fut

    def set_into(self, key: Key, value: bytes, ttl: float | None, sink: Sink[None]) -> None:
        """Store ``value`` under ``key`` with the other writes of this loop iteration; ``sink`` gets what ``set``'s future would."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        group = ttl
        try:
            size = len(key) + len(value)
        except TypeError:  # not str or bytes: the batch's check refuses it, and this pair alone fails
            size = 0
        pending = self._pending.get(group)
        if pending is not None and self._sizes[group] + size > self.max_bytes:
            self._send(group)  # this pair would overfill the batch: the batch leaves first
            pending = None
        if pending is None:
            pending = self._pending[group] = []
            self._sizes[group] = 0
        pending.append((key, value, sink))
        self._sizes[group] += size
        if len(pending) >= self.max_keys or self._sizes[group] >= self.max_bytes:
            self._send(group)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        for group in list(self._pending):
            self._send(group)

    def _send(self, ttl: float | None) -> None:
        """Send the batch of writes with TTL ``ttl``."""
        batch = self._pending.pop(ttl)
        del self._sizes[ttl]
        self._start(self._write(batch, ttl))

    async def _write(self, batch: list[_Write], ttl: float | None) -> None:
        stats = self.stats
        stats.batches += 1
        stats.keys += len(batch)
        try:
            if len(batch) == 1:
                await self.client.set(batch[0][0], batch[0][1], ttl=ttl)
            else:
                await self.client.mset([(key, value) for key, value, _ in batch], ttl=ttl)
        except (
            InvalidArgumentError,
            ServerError,
            RemoteProtocolError,
        ) as exc:  # may be one pair's fault (refused, too large, its owners unavailable)
            if len(batch) == 1:
                _fail_writes(batch, exc)
            else:
                await self._pair_by_pair(batch, ttl)
            return
        except (UpstreamTimeoutError, TimeoutError, ClientError, OSError) as exc:  # unreachable or slow: the same for every pair
            _fail_writes(batch, exc)
            return
        except asyncio.CancelledError:  # no write may wait forever
            _fail_writes(batch, ClientError("the write was cancelled"))
            raise
        except Exception as exc:  # a bug: every write of the batch gets it
            _fail_writes(batch, exc)
            return
        for _, _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def _pair_by_pair(self, batch: list[_Write], ttl: float | None) -> None:
        self.stats.fallbacks += 1
        await asyncio.gather(*(self._one(key, value, ttl, fut) for key, value, fut in batch))

    async def _one(self, key: Key, value: bytes, ttl: float | None, fut: Sink[None]) -> None:
        try:
            await self.fallback.set(key, value, ttl=ttl)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(None)


def _fail_writes(batch: list[_Write], exc: BaseException) -> None:
    for _, _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


def _fail_all(batch: _Batch, exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
