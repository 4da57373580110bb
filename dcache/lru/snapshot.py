"""Snapshot files of an LRU cache: a versioned, checksummed msgpack stream; pure.

``dump`` writes the entries of a cache to a binary file object and ``load``
reads them back, refusing anything that is not a complete, intact snapshot.
Neither opens files, touches the event loop or logs: the aux node's
``SnapshotManager`` does the file handling around them.

Format 1 (normative)
====================

A snapshot is a byte stream of four parts, back to back, with nothing
before, between or after them::

    MAGIC  HEADER  ENTRY * count  TRAILER

``MAGIC``
    The 8 bytes ``b"DCSNAP\\x00\\x01"``.

``HEADER``
    A msgpack map with str keys::

        {"format": 1, "node_id": str, "ring_epoch": int >= 0,
         "created_ms": int >= 0, "count": int >= 0}

    ``format`` is the format version (this document describes 1);
    ``node_id`` the node that wrote the snapshot; ``ring_epoch`` the ring
    epoch it held; ``created_ms`` the wall-clock time (Unix milliseconds) at
    which the copy of the entries began; ``count`` the number of entries
    that follow. Readers ignore header keys they do not know, so later
    versions of format 1 may add optional keys; anything incompatible gets a
    new ``format`` number.

``ENTRY``
    A msgpack array of exactly four elements::

        [key: bin, value: bin, expires_at_ms: int >= 0, version: int >= 0]

    ``expires_at_ms`` is the absolute expiry in Unix milliseconds, 0 meaning
    none; ``version`` the entry's hybrid-logical-clock version (0 =
    unversioned). Keys are unique within a snapshot. Entries are written in
    the order the writer chose (the aux node writes its cache's dict order);
    a reader that replays them into an LRU makes the last one the most
    recently used.

``TRAILER``
    A msgpack map with exactly two str keys::

        {"count": int, "xxh3_64": int}

    ``count`` repeats the header's; ``xxh3_64`` is the XXH3 64-bit hash
    (seed 0) of every byte before the trailer, from the first magic byte to
    the last byte of the last entry.

Integers use msgpack's smallest encoding (any valid msgpack int encoding is
accepted on reading); ``bin`` is bin 8/16/32, ``str`` is UTF-8.

Validation
==========

``load`` checks, in stream order: the magic (a mismatch raises
``SnapshotForeignError``, except a file too short to hold it, which is
truncated); the header's ``format`` (not 1: ``SnapshotForeignError``); the
header's fields and types; every entry's shape and types; the trailer's
shape and ``count``; the checksum; and that the stream ends right after the
trailer. Any other failure (truncation, undecodable msgpack, limits
exceeded) raises ``SnapshotCorruptError``. ``load`` either returns every
entry or raises: it never returns part of a snapshot.

Writing in pieces
=================

``dump(items, file, ...)`` is the one-call, streaming writer. It is built
from two steps a caller can also use separately, as the aux node does to keep its
event loop responsive: ``pack_entries`` turns a slice of entries into bytes
(on the loop, a slice per iteration, creating no GC-tracked objects), and
``write_packed`` writes magic, header, the packed slices and the trailer
(in a worker thread: it only hashes and writes, mostly without the GIL).

Complexity. Both directions are O(total bytes) in time. ``dump`` holds one
packed chunk of ``DUMP_CHUNK_ENTRIES`` entries besides its input; ``load``
holds one read buffer (``LOAD_READ_BYTES``, or one entry if larger) besides
the entries it returns.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import msgpack
import xxhash

from ..errors import DCacheError
from ..widths import UINT64_MAX

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "DUMP_CHUNK_ENTRIES",
    "LOAD_READ_BYTES",
    "MAX_SNAPSHOT_BIN_BYTES",
    "SnapshotEntry",
    "SnapshotData",
    "SnapshotError",
    "SnapshotCorruptError",
    "SnapshotForeignError",
    "dump",
    "load",
    "pack_entries",
    "write_packed",
]

#: The first 8 bytes of every snapshot.
MAGIC = b"DCSNAP\x00\x01"
#: The ``format`` this module writes and the only one it reads.
FORMAT_VERSION = 1
#: Entries packed per write in ``dump``.
DUMP_CHUNK_ENTRIES = 4096
#: Bytes asked of the file per read in ``load``.
LOAD_READ_BYTES = 1024 * 1024
#: Default largest key or value ``load`` accepts (msgpack ``bin`` length).
MAX_SNAPSHOT_BIN_BYTES = 256 * 1024 * 1024

#: ``(key, value, expires_at_ms, version)``: the tuple ``LRUCache.items()`` yields.
SnapshotEntry = tuple[bytes, bytes, int, int]

_MAX_STR_BYTES = 64 * 1024  # header strings (node ids) and map keys
_MAX_MAP_LEN = 64
_ENTRY_LEN = 4
_TRAILER_KEYS = frozenset(("count", "xxh3_64"))


class SnapshotError(DCacheError):
    """A snapshot could not be read: the base of the two kinds below."""


class SnapshotCorruptError(SnapshotError):
    """The data is a damaged or truncated snapshot (checksum, structure, length)."""


class SnapshotForeignError(SnapshotError):
    """The data is not a snapshot this code reads: wrong magic or unknown format."""


class _Writer(Protocol):
    def write(self, data: bytes, /) -> Any: ...


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class SnapshotData:
    """A snapshot read by ``load``.

    Attributes:
        node_id, ring_epoch, created_ms: the header's fields.
        count: entries stored in the file (including the expired ones).
        entries: the unexpired entries, in file order.
        expired: entries dropped because they had expired at ``now_ms``.
        size_bytes: length of the whole stream.
    """

    node_id: str
    ring_epoch: int
    created_ms: int
    count: int
    entries: list[SnapshotEntry]
    expired: int
    size_bytes: int


def dump(
    items: Collection[SnapshotEntry],
    file: _Writer,
    *,
    node_id: str,
    ring_epoch: int,
    created_ms: int,
) -> int:
    """Write ``items`` to ``file`` as a format-1 snapshot, streaming.

    Entries are packed and written ``DUMP_CHUNK_ENTRIES`` at a time, so
    memory beyond ``items`` stays at one chunk. A failure part-way leaves a
    truncated stream, which ``load`` rejects.

    Args:
        items: ``(key, value, expires_at_ms, version)`` tuples with unique
            keys (not checked); ``len(items)`` goes in the header, then they
            are iterated once.
        file: a binary file object (anything with ``write(bytes)``).
        node_id: the writing node's id.
        ring_epoch: the ring epoch the node holds (>= 0).
        created_ms: wall-clock Unix milliseconds of the copy (>= 0).

    Returns:
        The number of bytes written.

    Raises:
        ValueError: a header field or an entry has the wrong type or range
            (see ``pack_entries``), or iterating ``items`` did not yield
            ``len(items)`` entries (the trailer is then not written).
        OSError: whatever ``file.write`` raises.
    """
    it = iter(items)

    def chunks() -> Iterator[tuple[bytes, int]]:
        while True:
            chunk = pack_entries(islice(it, DUMP_CHUNK_ENTRIES))
            if not chunk[1]:
                return
            yield chunk

    return write_packed(chunks(), file, count=len(items), node_id=node_id, ring_epoch=ring_epoch, created_ms=created_ms)


def pack_entries(entries: Iterable[SnapshotEntry]) -> tuple[bytes, int]:
    """Pack entries into the ``ENTRY * n`` part of a snapshot.

    Packs one entry at a time into a reused buffer, creating no objects the
    garbage collector tracks, so a caller on an event loop can pack a slice
    per loop iteration without triggering collections.

    Args:
        entries: ``(key, value, expires_at_ms, version)`` tuples.

    Returns:
        ``(packed bytes, number of entries)``.

    Raises:
        ValueError: an entry is not a 4-tuple of ``bytes``, ``bytes`` and two
            ints in ``0 .. 2**64 - 1``.
    """
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    pack = packer.pack
    n = 0
    for entry in entries:
        if type(entry) is not tuple or len(entry) != _ENTRY_LEN:
            raise ValueError(f"snapshot entry must be a 4-tuple, not {type(entry).__name__} {entry!r:.80}")
        key, value, expires_at, version = entry
        if (
            type(key) is not bytes
            or type(value) is not bytes
            or type(expires_at) is not int
            or type(version) is not int
            or not 0 <= expires_at <= UINT64_MAX
            or not 0 <= version <= UINT64_MAX
        ):
            raise ValueError(f"bad snapshot entry for key {key!r:.80}: need (bytes, bytes, int >= 0, int >= 0)")
        pack(entry)
        n += 1
    return packer.bytes(), n


def write_packed(
    chunks: Iterable[tuple[bytes, int]],
    file: _Writer,
    *,
    count: int,
    node_id: str,
    ring_epoch: int,
    created_ms: int,
) -> int:
    """Write a snapshot whose entries were packed by ``pack_entries``.

    Writes the magic and header, then each chunk as it comes (so the caller
    can free consumed ones), then the trailer with the checksum.

    Args:
        chunks: ``pack_entries`` results, in order.
        file: a binary file object (anything with ``write(bytes)``).
        count: the number of entries the chunks hold (goes in the header).
        node_id, ring_epoch, created_ms: the header fields (see ``dump``).

    Returns:
        The number of bytes written.

    Raises:
        ValueError: a header field has the wrong type or range, or the
            chunks hold a different number of entries than ``count`` (the
            trailer is then not written).
        OSError: whatever ``file.write`` raises.
    """
    if type(node_id) is not str:
        raise ValueError(f"node_id must be a str, not {type(node_id).__name__}")
    for name, n in (("count", count), ("ring_epoch", ring_epoch), ("created_ms", created_ms)):
        if type(n) is not int or not 0 <= n <= UINT64_MAX:
            raise ValueError(f"{name} must be an int in 0..2**64-1, got {n!r}")
    hasher = xxhash.xxh3_64()
    header = {
        "format": FORMAT_VERSION,
        "node_id": node_id,
        "ring_epoch": ring_epoch,
        "created_ms": created_ms,
        "count": count,
    }
    head = MAGIC + msgpack.packb(header, use_bin_type=True)
    hasher.update(head)
    file.write(head)
    written = len(head)
    seen = 0
    for data, n in chunks:
        hasher.update(data)
        file.write(data)
        written += len(data)
        seen += n
    if seen != count:
        raise ValueError(f"the chunks hold {seen} entries, not the {count} the header announced")
    tail = msgpack.packb({"count": count, "xxh3_64": hasher.intdigest()}, use_bin_type=True)
    file.write(tail)
    return written + len(tail)


def load(file: _Reader, *, now_ms: int, max_bin_bytes: int = MAX_SNAPSHOT_BIN_BYTES) -> SnapshotData:
    """Read and fully validate a snapshot; drop the entries expired at ``now_ms``.

    Reads ``file`` to its end. Nothing is returned unless the whole stream is
    valid (see the module's Validation section).

    Args:
        file: a binary file object (anything with ``read(n) -> bytes``).
        now_ms: current wall-clock Unix milliseconds; entries with
            ``0 < expires_at_ms <= now_ms`` are dropped (and counted).
        max_bin_bytes: largest key or value accepted; a larger one is
            treated as corruption (it bounds memory on damaged lengths).

    Returns:
        A ``SnapshotData``.

    Raises:
        SnapshotForeignError: wrong magic, or a ``format`` other than 1.
        SnapshotCorruptError: anything else wrong: truncated, bad msgpack,
            wrong shapes or types, count or checksum mismatch, bytes after
            the trailer.
        OSError: whatever ``file.read`` raises.
    """
    return _Loader(file, now_ms, max_bin_bytes).run()


class _Loader:
    """One ``load`` call: a feed-mode ``Unpacker`` plus exact checksumming.

    Bytes are fed in chunks. While the header or an entry is still expected,
    every byte fed so far lies before the trailer, so it is hashed just
    before the next chunk is fed; once ``count`` entries are read the
    trailer's offset (``Unpacker.tell()``) is known and only the part of the
    last chunk before it is hashed.
    """

    __slots__ = ("_file", "_now", "_unpacker", "_hasher", "_fed", "_hashed", "_last")

    def __init__(self, file: _Reader, now_ms: int, max_bin_bytes: int) -> None:
        self._file = file
        self._now = now_ms
        self._unpacker = msgpack.Unpacker(
            None,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_buffer_size=max_bin_bytes + 2 * LOAD_READ_BYTES,
            max_bin_len=max_bin_bytes,
            max_str_len=_MAX_STR_BYTES,
            max_array_len=_ENTRY_LEN,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
        )
        self._hasher = xxhash.xxh3_64()
        self._fed = 0  # bytes fed to the unpacker (after the magic)
        self._hashed = 0  # of those, bytes hashed
        self._last = b""  # the chunk fed last; holds every fed byte not yet hashed

    def run(self) -> SnapshotData:
        try:
            return self._run()
        except msgpack.UnpackException as exc:  # FormatError, StackError, BufferFull, ...
            raise SnapshotCorruptError(f"undecodable msgpack: {exc!r}") from None
        except (ValueError, TypeError, OverflowError) as exc:  # limits, bad UTF-8, unhashable map keys
            raise SnapshotCorruptError(f"undecodable msgpack: {exc!r}") from None

    def _run(self) -> SnapshotData:
        magic = self._read_exact(len(MAGIC))
        if magic != MAGIC:
            if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
                raise SnapshotCorruptError(f"truncated: {len(magic)} bytes, shorter than the magic")
            raise SnapshotForeignError(f"not a dcache snapshot: magic {magic!r}, expected {MAGIC!r}")
        self._hasher.update(magic)

        header = self._next_before_trailer("header")
        if type(header) is not dict:
            raise SnapshotCorruptError(f"header is a {type(header).__name__}, not a map")
        fmt = header.get("format")
        if fmt != FORMAT_VERSION or type(fmt) is not int:
            raise SnapshotForeignError(f"snapshot format {fmt!r} is not supported (this code reads {FORMAT_VERSION})")
        node_id = header.get("node_id")
        if type(node_id) is not str:
            raise SnapshotCorruptError(f"header node_id is {node_id!r}, not a str")
        ring_epoch = _header_int(header, "ring_epoch")
        created_ms = _header_int(header, "created_ms")
        count = _header_int(header, "count")

        entries, expired = self._entries(count)

        trailer_at = self._unpacker.tell()
        self._hasher.update(memoryview(self._last)[: trailer_at - self._hashed])
        trailer = self._next("trailer")
        if type(trailer) is not dict or trailer.keys() != _TRAILER_KEYS:
            raise SnapshotCorruptError(f"bad trailer: {trailer!r:.200}")
        if trailer["count"] != count or type(trailer["count"]) is not int:
            raise SnapshotCorruptError(f"trailer count {trailer['count']!r} does not match the header's {count}")
        digest = self._hasher.intdigest()
        if trailer["xxh3_64"] != digest or type(trailer["xxh3_64"]) is not int:
            raise SnapshotCorruptError(f"checksum mismatch: trailer says {trailer['xxh3_64']!r}, data hashes to {digest}")
        end = self._unpacker.tell()
        if end != self._fed or self._file.read(1):
            raise SnapshotCorruptError(f"trailing bytes after the trailer (at offset {len(MAGIC) + end})")
        return SnapshotData(node_id, ring_epoch, created_ms, count, entries, expired, len(MAGIC) + end)

    def _entries(self, count: int) -> tuple[list[SnapshotEntry], int]:
        entries: list[SnapshotEntry] = []
        append = entries.append
        now = self._now
        unpacker = self._unpacker
        remaining = count
        expired = 0
        while remaining:
            for e in unpacker:
                if (
                    type(e) is not tuple
                    or len(e) != _ENTRY_LEN
                    or type(e[0]) is not bytes
                    or type(e[1]) is not bytes
                    or type(e[2]) is not int
                    or type(e[3]) is not int
                    or e[2] < 0
                    or e[3] < 0
                ):
                    raise SnapshotCorruptError(f"entry {count - remaining} is malformed: {e!r:.200}")
                exp = e[2]
                if exp and exp <= now:
                    expired += 1
                else:
                    append(e)
                remaining -= 1
                if not remaining:
                    break
            else:
                self._refill_before_trailer(f"entry {count - remaining} of {count}")
        return entries, expired

    def _next_before_trailer(self, what: str) -> Any:
        """The next object, which lies before the trailer (so may hash on refill)."""
        while True:
            for obj in self._unpacker:
                return obj
            self._refill_before_trailer(what)

    def _next(self, what: str) -> Any:
        """The next object, refilling without hashing (for the trailer)."""
        while True:
            for obj in self._unpacker:
                return obj
            if not self._feed():
                raise SnapshotCorruptError(f"truncated in the {what}")

    def _refill_before_trailer(self, what: str) -> None:
        unhashed = self._fed - self._hashed
        if unhashed:
            self._hasher.update(memoryview(self._last)[len(self._last) - unhashed :])
            self._hashed = self._fed
        if not self._feed():
            raise SnapshotCorruptError(f"truncated in the {what}")

    def _feed(self) -> bool:
        data = self._file.read(LOAD_READ_BYTES)
        if not data:
            return False
        self._unpacker.feed(data)
        self._fed += len(data)
        self._last = data
        return True

    def _read_exact(self, n: int) -> bytes:
        parts = []
        got = 0
        while got < n:
            data = self._file.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)


def _header_int(header: dict[str, Any], name: str) -> int:
    n = header.get(name)
    if type(n) is not int or n < 0:
        raise SnapshotCorruptError(f"header {name} is {n!r}, not an int >= 0")
    return n
