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

Reading in pieces
=================

``load`` is built on ``SnapshotDecoder``, which a caller feeds the file a
piece at a time and which hands out each batch of entries as soon as they
are decoded and checked for shape, so the caller can apply them at once
and never hold the whole snapshot (the aux node does, so loading costs the
final cache plus one piece, not a copy of the file). The damage only the
end can show (a checksum or count mismatch, truncation, trailing bytes)
is then known when ``finish`` returns: such a caller undoes what it applied
if it raises. Both run the same checks in the same order and raise the same
errors.

Writing in pieces
=================

``dump(items, file, ...)`` is the one-call, streaming writer. It is built
from two steps a caller can also use separately, as the aux node does to keep its
event loop responsive: ``pack_entries`` turns a slice of entries into bytes
(on the loop, a slice per iteration, creating no GC-tracked objects), and
``write_packed`` writes magic, header, the packed slices and the trailer
(in a worker thread: it only hashes and writes, mostly without the GIL).

Complexity. Both directions are O(total bytes) in time. ``dump`` holds one
packed chunk of ``DUMP_CHUNK_ENTRIES`` entries besides its input;
``SnapshotDecoder`` holds one read buffer (``LOAD_READ_BYTES``, or one
entry if larger) besides the batch it returns, and ``load`` the entries it
returns too.
"""

from __future__ import annotations

from collections import deque
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
    "SnapshotDecoder",
    "SnapshotHeader",
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

    Reads ``file`` to its end (the one-call form of ``SnapshotDecoder``,
    which holds every entry: a caller that applies entries as they come
    uses the decoder itself). Nothing is returned unless the whole stream is
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
    decoder = SnapshotDecoder(now_ms=now_ms, max_bin_bytes=max_bin_bytes)
    entries: list[SnapshotEntry] = []
    decode = decoder.decode
    while not decoder.complete:
        data = file.read(LOAD_READ_BYTES)
        if not data:
            break
        decoder.feed(data)
        while (batch := decode(DUMP_CHUNK_ENTRIES)) is not None:
            entries += batch
    else:
        decoder.feed(file.read(1))  # one byte past the trailer tells it is not the end
    size = decoder.finish()
    header = decoder.header
    assert header is not None  # finish() raised otherwise
    return SnapshotData(header.node_id, header.ring_epoch, header.created_ms, header.count, entries, decoder.expired, size)


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """The header of a snapshot (see the format's ``HEADER``).

    Attributes:
        node_id, ring_epoch, created_ms: the header's fields.
        count: entries stored in the file (including expired ones).
    """

    node_id: str
    ring_epoch: int
    created_ms: int
    count: int


class SnapshotDecoder:
    """Reads a snapshot fed in pieces: entries come out as they are decoded, the verdict at the end (sans-IO).

    The caller ``feed``s the file's bytes in order, a piece of at most
    ``LOAD_READ_BYTES`` at a time, and after each piece calls ``decode``
    until it returns ``None``; at the end of the file it calls ``finish``.
    Every entry ``decode`` returns has been checked for shape and type, but
    whether the snapshot is intact (checksum, count, length) is known only
    when ``finish`` returns: a caller that used the entries before must undo
    them if it raises.

    Memory beyond what the caller keeps: the unpacker's buffer (the piece
    fed last and any object it started, so one read or one entry, whichever
    is larger) and the entries of one ``decode`` call. Each byte is hashed
    once, as soon as it is known to precede the trailer: up to the end of
    the header or of an entry just decoded (``Unpacker.tell()``, which is
    exact only there: it also counts the bytes of an object begun), or all
    bytes fed when the unpacker runs dry while an entry is still expected;
    so only bytes fed since the last ``decode`` wait, and the trailer's
    bytes are never hashed.
    """

    __slots__ = (
        "_count",
        "_decoded",
        "_end",
        "_extra",
        "_fed",
        "_hashed",
        "_hasher",
        "_magic",
        "_now",
        "_pending",
        "_skip",
        "_unpacker",
        "expired",
        "header",
    )

    def __init__(self, *, now_ms: int, max_bin_bytes: int = MAX_SNAPSHOT_BIN_BYTES) -> None:
        """A decoder that drops the entries expired at ``now_ms`` and refuses keys or values over ``max_bin_bytes``.

        Args:
            now_ms: current wall-clock Unix milliseconds (see ``load``).
            max_bin_bytes: largest key or value accepted (see ``load``).
        """
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
        self._magic = b""  # the first bytes fed, until there are len(MAGIC) of them
        self._fed = 0  # bytes fed to the unpacker (those after the magic)
        self._hashed = 0  # of those, bytes hashed
        self._pending: deque[bytes] = deque()  # pieces fed and not wholly hashed, oldest first
        self._skip = 0  # bytes of _pending[0] already hashed
        self._count = -1  # the header's count, once read
        self._decoded = 0  # entries decoded, expired ones included
        self._end = -1  # unpacker offset just past the trailer, once read
        self._extra = 0  # bytes fed after the trailer's piece
        #: The header, once decoded (``None`` before).
        self.header: SnapshotHeader | None = None
        #: Entries dropped so far because they had expired at ``now_ms``.
        self.expired = 0

    @property
    def complete(self) -> bool:
        """Whether the trailer has been read and checked (``finish`` still checks that the file ends there)."""
        return self._end >= 0

    def feed(self, data: bytes) -> None:
        """Add the next bytes of the file (no decoding happens here).

        Raises:
            SnapshotCorruptError: more bytes are buffered than one object and
                one read can need (the caller did not drain ``decode``).
        """
        if not data:
            return
        if self._end >= 0:  # past the trailer: counted, and refused by finish()
            self._extra += len(data)
            return
        if len(self._magic) < len(MAGIC):
            need = len(MAGIC) - len(self._magic)
            self._magic += data[:need]
            if self._magic == MAGIC:
                self._hasher.update(MAGIC)
            if len(data) <= need:
                return
            data = data[need:]
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise SnapshotCorruptError("an object is larger than max_bin_bytes allows") from None
        self._fed += len(data)
        self._pending.append(data)

    def decode(self, max_entries: int) -> list[SnapshotEntry] | None:
        """Decode what the bytes fed so far hold: the header, up to ``max_entries`` entries, then the trailer.

        Args:
            max_entries: most entries to decode in this call (expired ones
                included), which bounds its time and the list it returns.

        Returns:
            The unexpired entries decoded, in file order (possibly empty,
            when only the header, expired entries or the trailer were);
            ``None`` when nothing more can be decoded until more bytes are
            fed (or the trailer was read).

        Raises:
            SnapshotForeignError: wrong magic, or a ``format`` other than 1.
            SnapshotCorruptError: bad msgpack, wrong shapes or types, a
                trailer whose count or checksum does not match.
        """
        try:
            return self._decode(max_entries)
        except msgpack.UnpackException as exc:  # FormatError, StackError, ...
            raise SnapshotCorruptError(f"undecodable msgpack: {exc!r}") from None
        except (ValueError, TypeError, OverflowError) as exc:  # limits, bad UTF-8, unhashable map keys
            raise SnapshotCorruptError(f"undecodable msgpack: {exc!r}") from None

    def finish(self) -> int:
        """Check that the file, now fed whole, was one complete snapshot; return its length in bytes.

        Call once the file has ended and ``decode`` returned ``None``.

        Raises:
            SnapshotForeignError: wrong magic.
            SnapshotCorruptError: the file ended before the trailer
                (truncated), or bytes follow the trailer.
        """
        if self._end < 0:
            self._check_magic()
            if len(self._magic) < len(MAGIC):
                raise SnapshotCorruptError(f"truncated: {len(self._magic)} bytes, shorter than the magic")
            if self.header is None:
                raise SnapshotCorruptError("truncated in the header")
            if self._decoded < self._count:
                raise SnapshotCorruptError(f"truncated in the entry {self._decoded} of {self._count}")
            raise SnapshotCorruptError("truncated in the trailer")
        if self._extra or self._end != self._fed:
            raise SnapshotCorruptError(f"trailing bytes after the trailer (at offset {len(MAGIC) + self._end})")
        return len(MAGIC) + self._end

    def _check_magic(self) -> bool:
        """Whether the whole magic is here and right; raise if what is here cannot be it."""
        magic = self._magic
        if magic == MAGIC:
            return True
        if not MAGIC.startswith(magic):
            raise SnapshotForeignError(f"not a dcache snapshot: magic {magic!r}, expected {MAGIC!r}")
        return False

    def _decode(self, max_entries: int) -> list[SnapshotEntry] | None:
        if self._end >= 0:
            return None
        unpacker = self._unpacker
        progressed = False
        if self.header is None:
            if not self._check_magic():
                return None
            try:
                raw = unpacker.unpack()
            except msgpack.OutOfData:
                self._hash_to(self._fed)  # all of it belongs to the header
                return None
            self.header = _parse_header(raw)
            self._count = self.header.count
            self._hash_to(unpacker.tell())
            progressed = True
        entries: list[SnapshotEntry] = []
        want = min(self._count - self._decoded, max_entries)
        if want > 0:
            n = self._entries(want, entries)
            self._decoded += n
            if n < want:  # out of data with an entry still expected: every byte fed lies before the trailer
                self._hash_to(self._fed)
                return entries if n or progressed else None
            self._hash_to(unpacker.tell())
            progressed = True
        if self._decoded == self._count:
            if self._read_trailer():
                progressed = True
        return entries if progressed else None

    def _entries(self, want: int, out: list[SnapshotEntry]) -> int:
        """Decode up to ``want`` entries, appending the unexpired ones to ``out``; return how many were decoded."""
        append = out.append
        now = self._now
        n = 0
        for e in self._unpacker:
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
                raise SnapshotCorruptError(f"entry {self._decoded + n} is malformed: {e!r:.200}")
            exp = e[2]
            if exp and exp <= now:
                self.expired += 1
            else:
                append(e)
            n += 1
            if n == want:
                break
        return n

    def _read_trailer(self) -> bool:
        """Read and check the trailer if it is all here (the bytes before it are hashed); whether it was."""
        try:
            trailer = self._unpacker.unpack()
        except msgpack.OutOfData:
            return False
        count = self._count
        if type(trailer) is not dict or trailer.keys() != _TRAILER_KEYS:
            raise SnapshotCorruptError(f"bad trailer: {trailer!r:.200}")
        if trailer["count"] != count or type(trailer["count"]) is not int:
            raise SnapshotCorruptError(f"trailer count {trailer['count']!r} does not match the header's {count}")
        digest = self._hasher.intdigest()
        if trailer["xxh3_64"] != digest or type(trailer["xxh3_64"]) is not int:
            raise SnapshotCorruptError(f"checksum mismatch: trailer says {trailer['xxh3_64']!r}, data hashes to {digest}")
        self._end = self._unpacker.tell()
        self._pending.clear()
        return True

    def _hash_to(self, offset: int) -> None:
        """Hash the fed bytes up to unpacker offset ``offset`` and let go of the pieces wholly hashed."""
        n = offset - self._hashed
        pending = self._pending
        update = self._hasher.update
        while n:
            piece = pending[0]
            take = min(len(piece) - self._skip, n)
            update(memoryview(piece)[self._skip : self._skip + take])
            n -= take
            self._hashed += take
            if self._skip + take == len(piece):
                pending.popleft()
                self._skip = 0
            else:
                self._skip += take


def _parse_header(header: Any) -> SnapshotHeader:
    if type(header) is not dict:
        raise SnapshotCorruptError(f"header is a {type(header).__name__}, not a map")
    fmt = header.get("format")
    if fmt != FORMAT_VERSION or type(fmt) is not int:
        raise SnapshotForeignError(f"snapshot format {fmt!r} is not supported (this code reads {FORMAT_VERSION})")
    node_id = header.get("node_id")
    if type(node_id) is not str:
        raise SnapshotCorruptError(f"header node_id is {node_id!r}, not a str")
    return SnapshotHeader(node_id, _header_int(header, "ring_epoch"), _header_int(header, "created_ms"), _header_int(header, "count"))


def _header_int(header: dict[str, Any], name: str) -> int:
    n = header.get(name)
    if type(n) is not int or n < 0:
        raise SnapshotCorruptError(f"header {name} is {n!r}, not an int >= 0")
    return n
