"""What the LRU charges for an entry: a model of its real memory cost on CPython.

Design note
===========

The byte budget (``--max-memory``) is only honest if each entry is charged
what it really costs the process, not ``len(key) + len(value)``: on 64-bit
CPython 3.11 a 16-byte key with a 16-byte value takes up to 348 bytes, and
up to 654 with an expiry. The charge is the two lengths plus constants
measured once at import (``sys.getsizeof`` of the real objects, rounded to
the allocator's granularity), so charging costs what ``len(key) +
len(value) + overhead`` did. The figures below are those of 64-bit CPython
3.11 with glibc.

An entry of ``k`` key bytes and ``v`` value bytes is charged::

    entry + obj(k) + obj(v)                       without an expiry
    entry + obj(k) + obj(v) + expiry + obj(k)     with one
    obj(n) = n + header + align - 1               a bytes object of n bytes

and a tombstone ``tombstone + obj(k)``. The C ``Entry`` (``_entry.c``) keeps
the key and value in one buffer of its own, without object headers, and
its expiry heap's items hold key objects of their own (the live item's and
a stale one's): its rule is ``packed``::

    entry + k + v + align - 1                     without an expiry
    entry + k + v + align - 1 + expiry + 2 obj(k) with one

with ``entry`` (188) the object (80: the two links, the buffer's address,
the expiry, the version as a C integer and the two lengths, with the object
and GC headers) and the shard slot below. With
``PY_ENTRY_COST``, the pure-Python ``Entry``'s rule:

* ``obj(n)``: a ``bytes`` object has a 33-byte header (``sys.getsizeof(b"")``,
  the trailing NUL included); pymalloc serves requests up to 512 bytes from
  16-byte size classes, glibc malloc larger ones in 16-byte aligned chunks
  (with an 8-byte header, not modelled). ``obj`` charges the rounding's
  bound, 15 bytes, rather than the rounding itself: exact for the 16-byte
  and 10 KB objects measured, 7.5 bytes too many on average, and rounding
  on the hot path (``&`` is not a specialised operation in CPython 3.11)
  cost 14% more instructions per ``set`` (docs/DECISIONS.md).
* ``entry`` (220): the ``Entry`` object (80 with its GC header), its
  version (stored as an offset of at most 60 bits from a fixed bias, an
  int of two 30-bit digits: 32; the 63-bit version itself would take 48;
  a version more than 8.7 years from 2030 takes those 16 bytes more than
  it is charged), and its share of its shard dict's table. A
  dict's table has 24 bytes (hash, key, value) for each of two thirds of its
  slots plus a 2-byte index per slot, so 18 bytes per slot; a dict that
  grows or churns (inserts and evictions) is resized to the power of two at
  or above 3 x its entries, so it has fewer than 6 slots per entry: 108
  bytes at most, 54 at least. The charge is the bound, so a cache is never
  over its budget whichever power of two its shards sit at; it holds up to
  about 15% fewer small entries than an exact accountant would.
* ``expiry`` (242, plus ``obj(k)``): the ``expires_at`` int (48: it is a
  sum, ``now + ttl``, and CPython allocates a sum one 30-bit digit longer
  than its larger operand), the expiry heap's ``(expires_at, key)`` tuple
  (64) and its list slot (8, and 12.5% of list over-allocation). The heap
  is compacted when it holds more than ``2 x expiring entries + 1024``
  items, so each expiring entry is charged for two items, the second stale:
  its tuple, slot, its own int, and its key (an evicted entry's stale item
  keeps the key alive).
* ``tombstone`` (360, plus ``obj(k)``): a slot of the tombstones'
  ``OrderedDict`` (its dict table with 4-byte indices, 20 bytes per slot,
  plus 8 for the ordered dict's node array, at most 6 slots per tombstone:
  168), its list node (32), the ``(version, expires_at)`` tuple (64) and
  the two ints (48 each).

Not modelled: pymalloc's pool and arena overhead and fragmentation (free
blocks of one size class that another cannot use), glibc's retention of
freed heap memory, and the process's fixed costs (interpreter, buffers,
connections). ``bin/bench_memory_budget.py`` measures a real node filled
past its budget: its RSS above the empty process's is 0.92 to 1.04 times
``--max-memory`` for 16-byte to 10 KB values, with or without expiries,
at 32 and 64 MB (docs/DECISIONS.md).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

__all__ = ["EntryCost", "measure_cpython_cost"]

#: Pointer size (8 on 64-bit builds).
_P = struct.calcsize("P")
#: pymalloc's size-class step and glibc malloc's chunk alignment on 64-bit builds.
_ALIGN = 16
#: pymalloc serves requests up to this size; larger ones go to malloc.
_SMALL_REQUEST_BYTES = 512
#: A dict's table in slots per entry, at most: it is resized to the power of
#: two at or above 3 x its entries, so fewer than 6 x.
_DICT_SLOTS_PER_ENTRY = 6
#: Bytes of a dict's table per slot: a (hash, key, value) entry for two thirds
#: of the slots, plus the index.
_DICT_ENTRY_BYTES = 3 * _P
#: Index width of the shard dicts (tables of 256 to 32,768 slots, up to about
#: 2.8 million entries in all) and of the tombstones' dict (up to 2**31 slots).
_SHARD_INDEX_BYTES = 2
_TOMB_INDEX_BYTES = 4
#: Heap items charged per expiring entry: the live one and one stale one.
_HEAP_ITEMS_PER_EXPIRY = 2
#: A list over-allocates by about one eighth when it grows.
_LIST_SLOT_BYTES = _P + _P // 8


def _alloc(n: int) -> int:
    """Bytes a request of ``n`` bytes takes: pymalloc's size class, or a malloc chunk."""
    if n <= _SMALL_REQUEST_BYTES:
        return (n + _ALIGN - 1) & -_ALIGN
    return (n + _P + _ALIGN - 1) & -_ALIGN


@dataclass(frozen=True, slots=True)
class EntryCost:
    """The charging rule's constants (see the module's design note).

    Attributes:
        entry: bytes per entry on top of its key and value objects.
        header: bytes per ``bytes`` object on top of its length.
        align: allocation granularity (a power of two): a ``bytes`` object
            is charged ``align - 1`` bytes of rounding, the most it can
            take; 1 means none.
        expiry: bytes per entry with an expiry, on top of one more key
            object (two when ``packed``).
        tombstone: bytes per tombstone on top of its key object.
        packed: the entry keeps its key and value in one buffer of its
            own (the C ``Entry``): they are charged their lengths and one
            allocation's rounding, not two objects; its expiry heap items
            hold key objects of their own, so an expiry adds two.

    Raises:
        ValueError: a negative field, or ``align`` not a power of two.
    """

    entry: int
    header: int = 0
    align: int = 1
    expiry: int = 0
    tombstone: int = 0
    packed: bool = False

    def __post_init__(self) -> None:
        for name in ("entry", "header", "expiry", "tombstone"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.align < 1 or self.align & (self.align - 1):
            raise ValueError(f"align must be a power of two, got {self.align}")

    def object_bytes(self, length: int) -> int:
        """Charge of a ``bytes`` object of ``length`` bytes: header and length, rounded up at most."""
        return length + self.header + self.align - 1

    def entry_bytes(self, key_length: int, value_length: int, expires: bool = False) -> int:
        """Charge of an entry with a key and value of these lengths, and an expiry or not."""
        k = self.object_bytes(key_length)
        if self.packed:
            size = self.entry + key_length + value_length + self.align - 1
            return size + self.expiry + 2 * k if expires else size
        size = self.entry + k + self.object_bytes(value_length)
        return size + self.expiry + k if expires else size

    def tombstone_bytes(self, key_length: int) -> int:
        """Charge of a tombstone for a key of this length."""
        return self.tombstone + self.object_bytes(key_length)


def measure_cpython_cost(entry_object: object, stored_version: int | None) -> EntryCost:
    """The charging rule for this interpreter, from ``sys.getsizeof`` of real objects.

    Args:
        entry_object: an empty ``Entry`` (the LRU's node object), measured
            as is.
        stored_version: the largest int an entry stores a current version as
            (the LRU stores an offset, smaller than the version itself);
            ``None`` for the C ``Entry``, which keeps its key and value in
            one buffer and its version as a C integer (``packed``).
    """
    packed = stored_version is None
    version = 0 if stored_version is None else _alloc(sys.getsizeof(stored_version))
    tomb_version = _alloc(sys.getsizeof((1 << 63) - 1))  # a tombstone's version, stored as is: 63 bits
    # An absolute expiry in wall-clock ms is a sum (now + ttl), and CPython
    # allocates a sum with one digit more than the larger operand has.
    wall_ms = _alloc(sys.getsizeof(1 << 44) + sys.int_info.sizeof_digit)
    pair = _alloc(sys.getsizeof((0, 0)))  # a heap item, a tombstone's (version, expires_at)
    shard_slot = _DICT_SLOTS_PER_ENTRY * (_DICT_ENTRY_BYTES * 2 // 3 + _SHARD_INDEX_BYTES)
    tomb_slot = _DICT_SLOTS_PER_ENTRY * (_DICT_ENTRY_BYTES * 2 // 3 + _TOMB_INDEX_BYTES + _P)
    tomb_node = _alloc(4 * _P)  # OrderedDict's node: key, hash, prev, next
    return EntryCost(
        entry=_alloc(sys.getsizeof(entry_object)) + version + shard_slot,
        header=sys.getsizeof(b""),
        align=_ALIGN,
        expiry=_HEAP_ITEMS_PER_EXPIRY * (wall_ms + pair + _LIST_SLOT_BYTES),
        tombstone=tomb_slot + tomb_node + pair + tomb_version + wall_ms,
        packed=packed,
    )
