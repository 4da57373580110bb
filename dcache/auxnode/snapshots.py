"""Snapshot files of an aux node: load at start, periodic and final snapshots.

The format and its validation live in ``dcache.lru.snapshot`` (pure); this
module does the file handling and the scheduling around it.

Files in ``data_dir``:

* ``snapshot.msgpack``: the current generation;
* ``snapshot.prev.msgpack``: the one before it;
* ``snapshot.tmp.<pid>``: a snapshot being written, and
  ``snapshot.tmp.prev.<pid>``: current's second name on its way to prev
  (both removed at start if a crash left them behind);
* ``snapshot[.prev].corrupt.<unix-ts>.msgpack``: files that failed
  validation at start, set aside for inspection (never deleted by dcache);
* ``lock``: the running node's pid, locked (``flock``) while it runs, so a
  second node given the same folder refuses to start.

Taking a snapshot: the entries are copied on the event loop in slices of
``COPY_CHUNK_ENTRIES``, yielding to the loop between slices (copying a
million entries in one go stalls it for 130-230 ms); the key list itself is
copied a shard of the cache at a time. Each slice is copied
straight into packed msgpack bytes, the one form of copy the garbage
collector never walks (see ``_copy``). Then a single worker thread writes
header, slices and trailer into the temp file (hashing and writing, mostly
without the GIL), fsyncs it, makes current the prev too (a hard link renamed
over prev: current never goes missing), renames the temp file to current
and fsyncs the directory. Only one
snapshot runs at a time: an ``asyncio.Lock`` covers the copy, and the single
worker serializes writes even if a caller was cancelled mid-write (the write
itself cannot be interrupted, so it is shielded and finishes).

Loading at start tries current, then prev. A file is read a piece at a
time in the worker thread and decoded and applied on the loop as it comes
(``SnapshotDecoder``), so the load holds the cache and one piece, never the
whole file as entries (which peaked at three times the file's size). A file
that fails validation is renamed aside, logged and counted, and the next
generation is tried; when the damage shows only at its end (checksum,
truncation) the entries it already put in are removed first, so the cache
never holds part of a snapshot. If none is valid the node starts empty. A bad file can therefore never make the
node crash-loop. A file that cannot be read at all (permissions, an I/O
error) stops the start instead: the node would otherwise rotate it to prev
at its next snapshot and delete it at the one after.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol

from ..config import AuxConfig
from ..errors import ConfigError
from ..files import make_private_dir, open_private
from ..hlc import HybridClock, wall_ms
from ..lru import EntryTooLargeError, LRUCache
from ..lru.cache import PyEntry
from ..lru.snapshot import (
    LOAD_READ_BYTES,
    SnapshotDecoder,
    SnapshotEntry,
    SnapshotError,
    SnapshotHeader,
    pack_entries,
    write_packed,
)
from ..protocol import Limits
from ..server import ServerState


def _prepare_data_dir(path: str) -> None:
    """Create ``path`` (mode 0700) if needed and check this process can write there.

    Raises:
        ConfigError: ``--data-dir`` cannot be used, with why and what to do.
    """
    try:
        make_private_dir(path)
        os.listdir(path)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"data_dir: cannot use {path}: it, or a folder above it, is a file; give --data-dir a folder") from None
    except FileNotFoundError:
        raise ConfigError(
            f"data_dir: cannot create {path}: a folder above it cannot be made there; give --data-dir another folder"
        ) from None
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot use {path}: {exc.strerror or exc}; give --data-dir a folder this user can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"data_dir: cannot write to {path}: permission denied; give --data-dir a folder this user can write")


LOCK_NAME = "lock"


def _lock_data_dir(path: str) -> BinaryIO:
    """Take ``path``'s lock file (``flock``, exclusive) for this process and write its pid there; return it open.

    The kernel drops the lock with the process, however it ends (even
    SIGKILL), so a crash never leaves a stale lock.

    Raises:
        ConfigError: another process holds it: two nodes would overwrite each other's snapshots.
    """
    lock = os.path.join(path, LOCK_NAME)
    try:
        f = open(lock, "a+b")  # held open (and locked) for the node's life
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {lock}: {exc.strerror or exc}; give --data-dir a folder this user can write") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().decode(errors="replace").strip() or "unknown"
        f.close()
        raise ConfigError(
            f"data_dir: {path} is in use by another aux node (pid {holder}); give each node its own --data-dir "
            "(two nodes on one folder overwrite each other's snapshots)"
        ) from None
    f.truncate(0)
    f.write(b"%d\n" % os.getpid())
    f.flush()
    return f


class SnapshotHost(Protocol):
    """What the snapshot manager needs of its node (an ``AuxNode`` has it)."""

    config: AuxConfig
    cache: LRUCache
    clock: HybridClock
    node_id: str
    state: ServerState
    ring_epoch: int

    @property
    def limits(self) -> Limits: ...

    def set_ring_epoch(self, epoch: int) -> None:
        """Record the ring epoch a snapshot says the node was admitted at."""
        ...


__all__ = [
    "CURRENT_NAME",
    "LOCK_NAME",
    "PREV_NAME",
    "TMP_PREFIX",
    "COPY_CHUNK_ENTRIES",
    "APPLY_CHUNK_ENTRIES",
    "SnapshotManager",
    "SnapshotHost",
]

log = logging.getLogger("dcache.aux.snapshots")

CURRENT_NAME = "snapshot.msgpack"
PREV_NAME = "snapshot.prev.msgpack"
TMP_PREFIX = "snapshot.tmp."
#: Entries copied per loop iteration while taking a snapshot (about 1 ms for
#: 500). A packed slice of 500 entries of 100 bytes stays under the 128 KiB
#: above which the daemons have glibc map memory (``daemon.pin_mmap_threshold``):
#: slices come from the heap, not from an mmap and munmap each.
COPY_CHUNK_ENTRIES = 500
#: Entries decoded and applied per loop iteration while loading one: about
#: 6 ms of CPU for 100-byte values (1.3 µs to decode and check one, 3.7 µs to
#: apply it), 15-18 ms when each evicts an older one (a snapshot larger
#: than --max-memory).
APPLY_CHUNK_ENTRIES = 1_000
#: Packed chunks (of ``COPY_CHUNK_ENTRIES`` entries) freed per loop iteration after a snapshot is written.
RELEASE_CHUNKS = 16


class SnapshotManager:
    """Loads, takes and schedules the snapshots of one ``AuxNode``.

    Disabled (every method a no-op, no files touched) when the node's config
    has no ``data_dir``. ``snapshot_interval`` 0 disables only the periodic
    snapshots; ``close()`` still takes a final one.

    Counters (see ``stats()``) are plain ints: ``taken``, ``failures``,
    ``rejected`` (files set aside at load), ``loaded_keys``.
    """

    __slots__ = (
        "_closed",
        "_dir_lock",
        "_executor",
        "_last_created_ms",
        "_lock",
        "_node",
        "data_dir",
        "failures",
        "interval",
        "last_duration_s",
        "loaded_keys",
        "max_version",
        "rejected",
        "taken",
        "versions_refused",
    )

    def __init__(self, node: SnapshotHost) -> None:
        """Bind to ``node`` (its ``config``, ``cache``, ``clock``, ``node_id``, ``state``)."""
        self._node = node
        self.data_dir: str | None = node.config.data_dir
        self.interval: float = node.config.snapshot_interval
        self._lock = asyncio.Lock()
        #: The data dir's lock file, held open (locked) from ``load`` to ``close``.
        self._dir_lock: BinaryIO | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._last_created_ms = 0
        self.last_duration_s = 0.0
        self.taken = 0
        self.failures = 0
        self.rejected = 0
        self.loaded_keys = 0
        #: Highest entry version loaded at start (0 if none).
        self.max_version = 0
        #: Entries skipped at load: their version was further ahead of the clock than --max-clock-skew.
        self.versions_refused = 0

    @property
    def enabled(self) -> bool:
        """Whether the node has a data dir."""
        return self.data_dir is not None

    def stats(self) -> dict[str, Any]:
        """The snapshot fields of STATS.

        ``snapshot_age_s`` is the age of the newest snapshot on disk (taken or
        loaded), -1 if there is none; ``snapshot_duration_s`` the time the
        last successful snapshot took (copy and write).
        """
        age = (wall_ms() - self._last_created_ms) / 1000 if self._last_created_ms else -1
        return {
            "snapshot_age_s": round(age, 3),
            "snapshot_duration_s": round(self.last_duration_s, 4),
            "snapshots_taken": self.taken,
            "snapshot_failures": self.failures,
            "snapshots_rejected": self.rejected,
            "snapshot_loaded_keys": self.loaded_keys,
            "snapshot_versions_refused": self.versions_refused,
        }

    # -- start -------------------------------------------------------------

    async def load(self) -> int:
        """Load the newest valid generation into the (empty) cache; return how many keys.

        Creates the data dir if needed (mode 0700) and removes temp files a
        crash left behind. A snapshot written by another node id than a
        configured ``--node-id`` is loaded with a WARNING. Entries go in with ``LRUCache.apply`` (versions
        kept, expired ones dropped) as they are read (``_load_file``), so
        the load holds the cache and one piece of the file, never a copy of
        it; the node's clock observes the highest version loaded. An entry
        whose version is further ahead of the clock than ``--max-clock-skew``
        is skipped, counted and logged: it would push every later version
        of this node into the future. A file found damaged after some of its
        entries went in (a checksum mismatch, truncation) has them removed
        again before the next generation is tried: the cache never holds
        part of a snapshot.

        Raises:
            ConfigError: the data dir cannot be created, listed or written,
                another node holds it (its ``lock``), or a snapshot in it
                exists but cannot be read (permissions,
                an I/O error): a problem worth failing the start for; the
                message says why in one line. A file that reads but fails
                validation never raises: it is set aside.
        """
        if self.data_dir is None:
            return 0
        data_dir = self.data_dir
        _prepare_data_dir(data_dir)
        if self._dir_lock is None:
            self._dir_lock = _lock_data_dir(data_dir)
        self._remove_temp_files()
        gc.collect()  # the load freezes what is alive as it goes (_load_file): no garbage of before with it
        for name in (CURRENT_NAME, PREV_NAME):
            path = os.path.join(data_dir, name)
            t0 = time.monotonic()
            try:
                with open(path, "rb") as f:
                    header, stats = await self._load_file(f)
            except FileNotFoundError:
                continue
            except SnapshotError as exc:
                self.rejected += 1
                aside = _set_aside(path, name)
                log.warning("snapshot %s rejected: %s; moved to %s", path, exc, aside or "(could not move it)")
                continue
            except OSError as exc:
                # Starting without it would rotate it to prev at the next snapshot and delete it at the one after.
                raise ConfigError(
                    f"data_dir: cannot read snapshot {path}: {exc.strerror or exc}; fix it, or move it out of "
                    "--data-dir to start without it (a node never overwrites a snapshot it could not read)"
                ) from None
            mine = self._node.config.node_id
            if mine and header.node_id != mine:
                log.warning(
                    "snapshot %s was written by %s, not by this node (%s): loading it anyway; if it was copied from "
                    "another node's --data-dir by mistake, stop this node and put its own snapshot back",
                    path,
                    header.node_id,
                    mine,
                )
            loaded = self._loaded(stats)
            self._last_created_ms = header.created_ms
            self._node.set_ring_epoch(header.ring_epoch)
            log.info(
                "loaded %d keys from %s (%d in file, %d expired; written by %s at epoch %d) in %.2fs",
                loaded,
                path,
                header.count,
                stats.expired,
                header.node_id,
                header.ring_epoch,
                time.monotonic() - t0,
            )
            return loaded
        log.info("no valid snapshot in %s: starting empty", data_dir)
        return 0

    async def _load_file(self, f: BinaryIO) -> tuple[SnapshotHeader, _LoadStats]:
        """Read, check and apply one snapshot file, a piece at a time; its header and what applying did.

        Each piece (``LOAD_READ_BYTES``) is read in the worker thread and
        decoded on the loop, and its entries are applied
        ``APPLY_CHUNK_ENTRIES`` per loop iteration (6-18 ms), each batch
        then frozen out of the garbage collector's reach as the node does
        every few seconds (``AuxNode._gc_loop``): the full collections that
        walked the growing cache took a third of the load's CPU and held
        the loop 100-250 ms each. If the file
        turns out damaged (or reading it fails), the entries applied are
        removed again, a shard of the cache per loop iteration, and the
        cache's counters put back, before the error propagates.

        Raises:
            SnapshotError: the file is damaged or not a snapshot.
            OSError: reading it failed.
        """
        loop = asyncio.get_running_loop()
        executor = self._get_executor()
        cache = self._node.cache
        counters = (cache.sets, cache.evictions, cache.expirations, cache.deletes)
        decoder = SnapshotDecoder(now_ms=wall_ms())
        stats = _LoadStats(self._node.limits.version_ceiling(), cache.evictions)
        try:
            while not decoder.complete:
                data = await loop.run_in_executor(executor, f.read, LOAD_READ_BYTES)
                if not data:
                    break
                decoder.feed(data)
                while (batch := decoder.decode(APPLY_CHUNK_ENTRIES)) is not None:
                    stats.apply(cache, batch)
                    del batch
                    # As AuxNode._gc_loop does every few seconds: free the young cyclic garbage, then put what
                    # is alive out of the collector's reach, so no full collection walks the growing cache.
                    gc.collect(1)
                    gc.freeze()
                    await asyncio.sleep(0)
            else:
                decoder.feed(await loop.run_in_executor(executor, f.read, 1))  # one byte past the trailer: not the end
            decoder.finish()
        except BaseException:
            await _remove_all(cache)
            cache.sets, cache.evictions, cache.expirations, cache.deletes = counters
            raise
        assert decoder.header is not None  # finish() raised otherwise
        stats.expired = decoder.expired
        return decoder.header, stats

    def _loaded(self, stats: _LoadStats) -> int:
        """Log what a successful load skipped or evicted, count it, move the clock; the keys loaded."""
        node = self._node
        loaded = stats.applied
        if stats.too_large:
            log.warning("%d snapshot entries are larger than max_memory and were skipped", stats.too_large)
        evicted = node.cache.evictions - stats.evictions_before
        if evicted:  # the cache was empty: every eviction is a loaded entry, the oldest first
            loaded -= evicted
            log.warning(
                "%d snapshot entries did not fit in --max-memory %d bytes (or --max-items) and were evicted, the least "
                "recently used first; the next snapshot will not hold them (raise the budget to keep them)",
                evicted,
                node.config.max_memory,
            )
        if stats.too_new:
            self.versions_refused += stats.too_new
            log.warning(
                "%d snapshot entries carry versions further ahead of this clock than --max-clock-skew and were skipped",
                stats.too_new,
            )
        if stats.max_version:
            node.clock.observe(stats.max_version)
        self.max_version = max(self.max_version, stats.max_version)
        self.loaded_keys += loaded
        return loaded

    def _remove_temp_files(self) -> None:
        assert self.data_dir is not None
        for name in os.listdir(self.data_dir):
            if name.startswith(TMP_PREFIX):
                path = os.path.join(self.data_dir, name)
                try:
                    os.unlink(path)
                except OSError as exc:
                    log.warning("cannot remove leftover %s: %s", path, exc)
                else:
                    log.info("removed %s, left over from an interrupted snapshot", path)

    def start(self) -> None:
        """Start the periodic snapshot task (if enabled and the interval is > 0)."""
        if self.data_dir is not None and self.interval > 0 and not self._closed:
            self._node.state.spawn(self._periodic(), "snapshots")

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.snapshot()
            except Exception:  # snapshot() handles its own errors; this is a last resort
                log.exception("periodic snapshot failed")

    # -- taking one --------------------------------------------------------

    async def snapshot(self, *, final: bool = False) -> bool:
        """Take a snapshot now (waiting for one in progress first).

        Failures are logged (one ERROR line: why, and what is on disk
        instead) and counted, never raised.

        Args:
            final: the stop's last snapshot: a failure's line says what is lost.

        Returns:
            Whether a snapshot was written (False when disabled or failed).
        """
        if self.data_dir is None:
            return False
        async with self._lock:
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            created_ms = wall_ms()
            node = self._node
            try:
                items = await self._copy()
                copy_s = time.monotonic() - t0
                fut = loop.run_in_executor(self._get_executor(), self._write, items, node.node_id, self._ring_epoch(), created_ms)
            except Exception:
                self.failures += 1
                log.exception("%s failed while copying the entries; %s", "final snapshot" if final else "snapshot", self._on_disk(final))
                return False

            def finished(f: asyncio.Future[int]) -> None:
                # A callback, so it is counted even if the awaiting task was cancelled.
                if f.cancelled():
                    return
                exc = f.exception()
                if exc is not None:
                    self.failures += 1
                    what = "final snapshot" if final else "snapshot"
                    if isinstance(exc, OSError):  # a full disk, permissions: one line a try, the cause is in it
                        log.error("%s to %s failed: %s; %s", what, self.data_dir, exc, self._on_disk(final))
                    else:
                        log.error("%s to %s failed: %r; %s", what, self.data_dir, exc, self._on_disk(final), exc_info=exc)
                    return
                self.taken += 1
                self._last_created_ms = created_ms
                self.last_duration_s = time.monotonic() - t0
                log.debug("snapshot written: %d bytes in %.3fs (copy on loop %.3fs)", f.result(), self.last_duration_s, copy_s)

            fut.add_done_callback(finished)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                raise
            except Exception:
                ok = False
            else:
                ok = True
            await items.release()
            return ok

    async def _copy(self) -> _Packed:
        """Copy the live entries on the loop, packed, a slice per loop iteration.

        The entries are listed one shard of the cache at a time
        (``LRUCache.entry_shards``: about 4,000 a shard for a million),
        never all at once: one ``list()`` of a million keys held the loop
        for 15-35 ms. Each slice of ``COPY_CHUNK_ENTRIES`` entries is checked
        again (``is_live``: still its key's entry, not expired) and packed
        into msgpack bytes right away, which makes the copy immutable and
        invisible to the garbage collector. Measured on 1M
        keys, a copy held as tuples or lists of references instead is walked
        by young collections until it ages (10-25 ms each) and freeing it at
        once holds the GIL (so stalls the loop) for about 30 ms.

        Writes made during the copy may or may not be in it; an entry that
        exists for the whole copy is in it exactly once, with its value as
        of its slice.
        """
        cache = self._node.cache
        is_live = cache.is_live
        step = COPY_CHUNK_ENTRIES
        chunks: list[tuple[bytes, int]] = []

        def pack(entries: list[PyEntry]) -> None:
            chunks.append(pack_entries((e.key, e.value, e.expires_at, e.version) for e in entries if is_live(e)))

        pending: list[PyEntry] = []
        for entries in cache.entry_shards():
            pending += entries
            while len(pending) >= step:
                pack(pending[:step])
                del pending[:step]
                await asyncio.sleep(0)
        if pending:
            pack(pending)
        return _Packed(chunks)

    def _write(self, items: _Packed, node_id: str, ring_epoch: int, created_ms: int) -> int:
        """Write the packed copy to the temp file and rotate it into place (worker thread)."""
        data_dir = self.data_dir
        assert data_dir is not None
        tmp = os.path.join(data_dir, f"{TMP_PREFIX}{os.getpid()}")
        current = os.path.join(data_dir, CURRENT_NAME)
        try:
            with open_private(tmp) as f:
                size = write_packed(items, f, count=items.count, node_id=node_id, ring_epoch=ring_epoch, created_ms=created_ms)
                f.flush()
                os.fsync(f.fileno())
            _keep_as_prev(data_dir, current)
            os.replace(tmp, current)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(data_dir)
        return size

    def _on_disk(self, final: bool) -> str:
        """What a failed snapshot leaves: the one on disk stays, or (``final``) the writes since it are lost."""
        assert self.data_dir is not None
        if self._last_created_ms and any(os.path.exists(os.path.join(self.data_dir, n)) for n in (CURRENT_NAME, PREV_NAME)):
            age = f"the last snapshot on disk ({(wall_ms() - self._last_created_ms) / 1000:.1f} s old)"
            if final:
                return f"the writes since {age} are lost (exit code 1)"
            return f"{age} stays"
        if final:
            return "no snapshot is on disk: every key of this node is lost (exit code 1)"
        return "no snapshot is on disk"

    def _ring_epoch(self) -> int:
        epoch = self._node.ring_epoch
        return epoch if type(epoch) is int and epoch >= 0 else 0

    def _get_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcache-snapshot")
        return self._executor

    # -- shutdown ----------------------------------------------------------

    async def close(self) -> bool:
        """Take the final snapshot (if enabled) and stop the worker; idempotent.

        Call after connections are closed and the periodic task is cancelled,
        so the snapshot holds every acknowledged write.

        Returns:
            False if the final snapshot failed (its ERROR line says what is
            lost), else True (also when disabled, or already closed).
        """
        if self._closed:
            return True
        self._closed = True
        kept = True
        if self.data_dir is not None:
            kept = await self.snapshot(final=True)
            if kept:
                log.info("final snapshot written to %s", os.path.join(self.data_dir, CURRENT_NAME))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._dir_lock is not None:
            self._dir_lock.close()  # the lock goes with it
            self._dir_lock = None
        return kept


class _Packed:
    """The packed copy: iterating hands the chunks to ``write_packed``; ``release`` frees them.

    The chunks are freed on the loop, newest first, a few per iteration.
    The allocator hands out the chunks' memory in order from the top of its
    heap; freeing them oldest first (as the writer did while it wrote) made
    the last free give all of it back to the system in one call that held
    the GIL, so the loop, for 8-11 ms with 1M keys (a ``brk`` shrinking the
    heap by the snapshot's 129 MB). Newest first, each free gives back about
    one chunk's worth.
    """

    __slots__ = ("chunks", "count")

    def __init__(self, chunks: list[tuple[bytes, int]]) -> None:
        self.chunks = chunks
        self.count = sum(n for _, n in chunks)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return iter(self.chunks)

    async def release(self) -> None:
        """Free the chunks, newest first, ``RELEASE_CHUNKS`` per loop iteration."""
        chunks = self.chunks
        pop = chunks.pop
        while chunks:
            for _ in range(min(RELEASE_CHUNKS, len(chunks))):
                pop()
            if chunks:
                await asyncio.sleep(0)


class _LoadStats:
    """What applying one snapshot file's entries did, batch by batch (``SnapshotManager._load_file``)."""

    __slots__ = ("applied", "ceiling", "evictions_before", "expired", "max_version", "too_large", "too_new")

    def __init__(self, ceiling: int, evictions_before: int) -> None:
        self.ceiling = ceiling  # the highest version accepted (the clock plus --max-clock-skew)
        self.evictions_before = evictions_before  # the cache's evictions when the load began
        self.applied = 0  # entries stored (some may have been evicted since)
        self.too_large = 0  # entries larger than the whole budget
        self.too_new = 0  # entries with a version above the ceiling
        self.max_version = 0  # the highest version stored or offered
        self.expired = 0  # entries the file held that had expired (the decoder's count, set at the end)

    def apply(self, cache: LRUCache, entries: list[SnapshotEntry]) -> None:
        """``LRUCache.apply`` each entry in order, counting what was stored, too large or too new."""
        apply = cache.apply
        ceiling = self.ceiling
        max_version = self.max_version
        for key, value, expires_at, version in entries:
            if version > ceiling:
                self.too_new += 1
                continue
            try:
                if apply(key, value, expires_at=expires_at, version=version):
                    self.applied += 1
            except EntryTooLargeError:
                self.too_large += 1
            if version > max_version:
                max_version = version
        self.max_version = max_version


async def _remove_all(cache: LRUCache) -> None:
    """Empty ``cache`` a shard at a time, yielding to the loop between shards (one ``clear()`` of 1M entries took 0.65 s)."""
    delete = cache.delete
    for keys in cache.key_shards():
        for key in keys:
            delete(key)
        await asyncio.sleep(0)
    cache.clear()  # what deleting leaves: the expiry heap's stale items


def _set_aside(path: str, name: str) -> str | None:
    """Rename a rejected file to ``<stem>.corrupt.<unix-ts>[-n].msgpack``; return the new path."""
    stem = name.removesuffix(".msgpack")
    directory = os.path.dirname(path)
    ts = int(time.time())
    for n in range(100):
        suffix = f"{ts}-{n}" if n else str(ts)
        target = os.path.join(directory, f"{stem}.corrupt.{suffix}.msgpack")
        if os.path.exists(target):
            continue
        try:
            os.replace(path, target)
        except OSError as exc:
            log.error("cannot move rejected snapshot %s aside: %s", path, exc)
            return None
        return target
    return None


def _keep_as_prev(data_dir: str, current: str) -> None:
    """Make the current generation the previous one too, leaving it current (worker thread).

    ``current`` gets a second name, which is renamed over prev: current
    exists at every moment, so a crash anywhere restarts from the newest
    complete generation (renaming current to prev, then the new file to
    current, left no current in between: a kill there restarted one
    generation back and deleted the new one as a leftover). On a file system
    without hard links, current is renamed to prev as before.

    Raises:
        OSError: the link or the rename failed (the files are as they were).
    """
    prev = os.path.join(data_dir, PREV_NAME)
    link = os.path.join(data_dir, f"{TMP_PREFIX}prev.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)  # left by a link whose rename failed
    try:
        os.link(current, link)
    except FileNotFoundError:
        return  # the first snapshot in this folder
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        with contextlib.suppress(FileNotFoundError):
            os.replace(current, prev)
        return
    try:
        os.replace(link, prev)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(link)
        raise


#: ``link()`` errors of a file system that has no hard links (FAT, some FUSE and network file systems).
_NO_HARD_LINKS = frozenset((errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
