"""``GetBatcher``: the ``get``s of one loop iteration sent as one ``mget`` on a ``Client``.

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
  frame, and a frame over the client's limit (32 MiB by default) closes the
  connection it came on. So batches are capped at ``max_keys``, and fewer
  when recent values were large: the cap is ``answer_bytes`` over the
  largest value seen lately, a hint that decays by 1/16 per batch.
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

Cost: one list append and one future per ``get``; one task per batch.
"""

from __future__ import annotations

import asyncio

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

__all__ = ["GetBatcher", "BatchStats", "BATCH_ANSWER_BYTES"]

#: Answer size one batch of reads is planned for, by default.
BATCH_ANSWER_BYTES = 4 * 1024 * 1024
#: Smallest value size the batcher plans with.
_MIN_VALUE_HINT_BYTES = 4096

_Batch = list[tuple[Key, "asyncio.Future[bytes | None]"]]


class BatchStats:
    """What a ``GetBatcher`` did, as plain counters (a metrics collector reads them at scrape time).

    Attributes:
        batches: batches sent (an MGET, or a GET for a lone key).
        keys: keys read in those batches (over ``batches``: the mean batch size).
        fallbacks: batches read again key by key after the batch failed.
    """

    __slots__ = ("batches", "keys", "fallbacks")

    batches: int
    keys: int
    fallbacks: int

    def __init__(self) -> None:
        self.batches = 0
        self.keys = 0
        self.fallbacks = 0


class GetBatcher:
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

    __slots__ = ("client", "fallback", "max_keys", "stats", "_answer_bytes", "_cap", "_hint", "_pending", "_loop", "_tasks")

    client: Client
    fallback: Client
    max_keys: int
    stats: BatchStats
    _answer_bytes: int
    _cap: int
    _hint: int
    _pending: _Batch
    _loop: asyncio.AbstractEventLoop | None
    _tasks: set[asyncio.Task[None]]

    def __init__(
        self,
        client: Client,
        *,
        fallback: Client | None = None,
        max_keys: int = 64,
        answer_bytes: int = BATCH_ANSWER_BYTES,
        stats: BatchStats | None = None,
    ) -> None:
        if max_keys < 1:
            raise ConfigError(f"max_keys: must be at least 1, got {max_keys}")
        if answer_bytes < 1:
            raise ConfigError(f"answer_bytes: must be at least 1, got {answer_bytes}")
        self.client = client
        self.fallback = client if fallback is None else fallback
        self.max_keys = max_keys
        self.stats = BatchStats() if stats is None else stats
        self._answer_bytes = answer_bytes
        self._hint = _MIN_VALUE_HINT_BYTES
        self._cap = self._cap_for(self._hint)
        self._pending = []
        self._loop = None
        self._tasks = set()

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
        pending = self._pending
        pending.append((key, fut))
        if len(pending) >= self._cap:
            self._flush()
        elif len(pending) == 1:
            loop.call_soon(self._flush)
        return fut

    async def close(self) -> None:
        """Wait for the batches in flight (call after closing the clients: they fail fast then)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _cap_for(self, hint: int) -> int:
        return max(1, min(self.max_keys, self._answer_bytes // hint))

    def _flush(self) -> None:
        batch = self._pending
        if not batch:
            return
        self._pending = []
        assert self._loop is not None
        task = self._loop.create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def _one(self, key: Key, fut: asyncio.Future[bytes | None]) -> None:
        try:
            value = await self.fallback.get(key)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(value)


def _fail_all(batch: _Batch, exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
