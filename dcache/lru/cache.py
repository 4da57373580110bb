"""A byte-budgeted LRU cache with TTLs, versions and tombstones; pure and synchronous.

Design note
===========

Structure. A dict maps each key to an ``Entry``; the entries also form a
circular doubly linked list through a sentinel ``head`` node, so no link is
ever ``None`` and unlinking needs no branches. ``head.next`` is the least
recently used entry (the next victim), ``head.prev`` the most recently used.
With the C ``Entry`` (the default where it was built, "Memory" below) the
dict's key is the entry itself: it hashes as its key and compares equal to
it, so a lookup with the request's ``bytes`` finds it and no key object is
kept per entry; ``keys_snapshot`` and ``key_shards`` then copy the keys out.

The dict is split into ``SHARDS`` dicts by the key's builtin ``hash()``
(the hash the dict computes anyway and caches on the key, so the lookup
costs one index more: about 25 ns). A key never changes shard, so
``key_shards()`` can copy the keys one shard at a time, a few thousand per
copy, where one ``list()`` of a million keys held the loop for 15-35 ms.
The builtin hash is salted per process; shards are never persisted or
compared across processes.

Invariants (all checked by ``check_valid()``, O(n), for tests):

* The shards and the list hold the same entries, each in the shard its key
  hashes to, and ``len()`` is their total; ``e.next.prev is e`` and
  ``e.prev.next is e`` for every node, the sentinel included.
* ``bytes_used`` is exactly the sum of the charges (``cost.py``: a model
  of what each really costs in memory) of the entries, an entry with an
  expiry being charged more, and of the tombstones; it never exceeds
  ``max_bytes``. The number of entries never exceeds ``max_items`` (when
  non-zero). Every write (and a tombstone, or an expiry given to an entry)
  evicts from the LRU end until both hold again, never the entry just
  written, and drops the oldest tombstones if evicting every other entry is
  not enough; evictions are counted.
* Expiry times are absolute wall-clock milliseconds, ``0`` meaning none. An
  entry is expired once ``expires_at <= now``; an expired entry is never
  returned. It is removed lazily when a lookup touches it, or actively by
  ``expire_some``; until then it still counts in ``len()`` and
  ``bytes_used``.
* Every live entry with an expiry has an item ``(expires_at, key)`` in the
  expiry heap. Heap items go stale when their entry is removed or its expiry
  changes; they are skipped lazily, and the heap is compacted when it holds
  more than ``2 * entries_with_expiry + 1024`` items, so its size stays
  linear in the number of entries with an expiry. Compaction is gradual:
  the full heap becomes an old heap that each later push, and the aux
  node's expiry sweep, drain a few items at a time into a new heap, current
  items moved and stale ones dropped (``drain_expiry_heap``); meanwhile
  ``expire_some`` reads both. So no single write pays for the whole heap
  (done in one go, it stopped the loop 1.1-1.7 s for a million expiring
  keys), both heaps together stay within ``2.5 * entries_with_expiry +
  2048`` items, and no temporary copy is made (a set or list of a million
  items would be freed to a heap that glibc does not give back: about 60
  bytes per expiring entry of RSS, measured).
* Tombstones ``key -> (version, expires_at)`` live in an ``OrderedDict`` in
  the order they were recorded (which, with a constant TTL, is expiry order).
  There are at most ``max_tombstones``; the oldest is dropped first. A key
  that is both live and tombstoned has an entry version at least the
  tombstone's (``apply_delete`` keeps a newer entry and still records).

Versions. Each entry carries a version (a hybrid logical clock value from the
caller; 0 = unversioned). Local writes (``set``, ``incr``) always win and clear
the key's tombstone. Imports (``apply``, ``apply_delete``) are last-writer-wins:
they take effect only when newer than the live entry and the tombstone, so
replication, migration and restore are idempotent and order-insensitive, and a
late older copy never resurrects a deleted key while its tombstone lasts.

Complexity. ``get``, ``set``, ``delete``, ``apply*``, ``exists``, ``touch``,
``expire``, ``persist``, ``ttl_ms`` and ``incr`` are O(1) amortised; adding an
expiry costs an O(log n) heap push, and the occasional heap compaction is
amortised against the pushes that made it necessary. ``expire_some(k)`` does
O(k log n) work at most. ``items``, ``snapshot_items``, ``keys_snapshot``,
``check_valid`` are O(n); each step of ``key_shards`` is O(n / SHARDS);
``clear`` is O(1) plus freeing memory.

Hot path. ``get`` and ``set`` (and ``apply``, when it overwrites a live
entry whose expiry stays the same) cache attribute lookups in locals, inline
the list surgery and only call the clock when an entry has (or is given) an
expiry, so TTL-less traffic never pays for it. An entry's charge is its
key's and value's lengths plus a constant taken from the ``EntryCost`` once,
in the constructor (plus a second constant and the key's length again for an
expiry), the operations ``len(key) + len(value) + overhead`` always took;
it is recomputed when the entry is removed rather than stored (one more
slot would make every ``Entry`` 16 bytes larger).

Memory. Two entries, one behaviour (docs/DECISIONS.md, "Memory per key").
The C ``Entry`` (``_entry.c``, built by ``pip install``; ``NativeEntry``)
is 80 bytes of object and one buffer holding the key's and the value's
bytes; its version is a C integer; its ``key`` and ``value`` are copied
out on each read. 16-byte keys with 100-byte values take about 250 bytes
each at a million entries (Redis: 208). The pure-Python ``PyEntry`` is
what runs where no C compiler was at hand, or with ``DCACHE_PURE_PYTHON=1``
in the environment: 80 bytes of object (six slots, the object and GC
headers) with its own key and value objects, its version int and its share
of its shard's table: about 360 bytes each, of which the key and value
objects are 208. It stores its version as its offset from
``VERSION_BIAS`` (the hybrid-clock version of 2030-01-01): a version issued
within 2**38 ms (8.7 years) of that date is then an int of two 30-bit
digits, 32 bytes, where the version itself (63 bits, three digits) takes
48. ``Entry.version`` adds the bias back; the cache's own loops read and
write the offset (``_version``) directly, which the C entry converts. Each
entry has its charging rule (``CPYTHON_COST``, ``PY_ENTRY_COST``).

The cache is not thread-safe and must not be mutated while ``items()`` is
being iterated.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from heapq import heapify, heappop, heappush
from itertools import chain
from typing import Any, cast, overload

from ..hlc import wall_ms
from ..widths import INT64_MAX, INT64_MIN
from .cost import EntryCost, measure_cpython_cost

__all__ = [
    "SHARDS",
    "VERSION_BIAS",
    "CPYTHON_COST",
    "PY_ENTRY_COST",
    "NO_EXPIRY",
    "INT64_MIN",
    "INT64_MAX",
    "Entry",
    "NativeEntry",
    "PyEntry",
    "LRUCache",
    "EntryTooLargeError",
    "NotAnInt64Error",
    "IntegerOverflowError",
]

#: ``expires_at`` value meaning "never expires".
NO_EXPIRY = 0


#: What an entry's version is stored relative to: the hybrid-clock version
#: (``wall_ms << 22``) of 2030-01-01 00:00 UTC. Versions within 2**60 of it
#: (wall clocks from 2021 to 2038) are stored as 32-byte ints, not 48.
VERSION_BIAS = 1_893_456_000_000 << 22
#: The largest offset from ``VERSION_BIAS`` stored in two 30-bit digits.
_VERSION_OFFSET_BOUND = (1 << 60) - 1

#: Heap compaction slack: compact when the heap exceeds 2 * live + this.
_HEAP_SLACK = 1024
#: Old expiry-heap items each write with a TTL drains while a compaction runs: the old heap
#: (at most 2 * live + slack items) is gone after half as many pushes as it holds, so the two
#: heaps together stay within 2.5 * live + slack items.
_DRAIN_PER_PUSH = 4

#: Dicts the keys are spread over (a power of two): a million keys make
#: shards of about 4,000, each copied by ``key_shards`` in well under 1 ms.
SHARDS = 256
_SHARD_MASK = SHARDS - 1


class EntryTooLargeError(ValueError):
    """A single entry's charge is larger than ``max_bytes``."""


class NotAnInt64Error(ValueError):
    """``incr`` on a value that is not the ASCII decimal of a signed 64-bit integer."""


class IntegerOverflowError(ValueError):
    """``incr`` would produce a result outside the signed 64-bit range."""


class PyEntry:
    """One cached item and a node of the LRU list: the pure-Python ``Entry``.

    Used when the C extension (``dcache.lru._entry``, the same attributes
    with the key and value in one buffer) was not built, or when a cache is
    made with ``native=False``.

    Treat entries returned by ``LRUCache.get_entry`` as read-only.

    Attributes:
        key: the key (bytes).
        value: the value (bytes).
        expires_at: absolute wall-clock milliseconds, or ``NO_EXPIRY`` (0).
        version: the write's hybrid-logical-clock version, 0 if unversioned
            (a property: stored as ``_version``, its offset from
            ``VERSION_BIAS``, a smaller int).
        prev, next: list links, set when the entry is linked (a removed
            entry points at the cache's sentinel).
    """

    __slots__ = ("_version", "expires_at", "key", "next", "prev", "value")

    key: bytes
    value: bytes
    expires_at: int
    _version: int
    prev: PyEntry
    next: PyEntry

    def __init__(self, key: bytes, value: bytes, expires_at: int = NO_EXPIRY, version: int = 0) -> None:
        self.key = key
        self.value = value
        self.expires_at = expires_at
        self._version = version - VERSION_BIAS

    @property
    def version(self) -> int:
        """The write's version (0 if unversioned)."""
        return self._version + VERSION_BIAS

    @version.setter
    def version(self, version: int) -> None:
        self._version = version - VERSION_BIAS

    def __repr__(self) -> str:
        return f"Entry(key={self.key!r}, value=<{len(self.value)} bytes>, expires_at={self.expires_at}, version={self.version})"


#: The charging rule for ``PyEntry`` on this interpreter (``cost.py``), measured at import.
PY_ENTRY_COST = measure_cpython_cost(PyEntry(b"", b""), _VERSION_OFFSET_BOUND)

#: The C ``Entry`` (``_entry.c``: the key and value in one buffer, 80 bytes of object), or
#: ``None`` where the extension was not built. Typed as ``PyEntry``: it has the same attributes.
#: ``DCACHE_PURE_PYTHON`` set to anything but ``""`` or ``0`` leaves it out, as if it were not built.
NativeEntry: type[PyEntry] | None = None
#: Why ``NativeEntry`` is ``None`` (for the aux node's start-up log), ``""`` when it is not.
NATIVE_MISSING = "turned off by DCACHE_PURE_PYTHON"
if os.environ.get("DCACHE_PURE_PYTHON", "") in ("", "0"):
    try:
        from ._entry import Entry as _CEntry
    except ImportError as exc:  # built without a C compiler: the pure-Python entry, larger (docs/DECISIONS.md)
        NATIVE_MISSING = f"not built ({exc})"
    else:
        NativeEntry = cast("type[PyEntry]", _CEntry)
        NATIVE_MISSING = ""

#: The entry a cache uses by default: the C one when it was built.
Entry: type[PyEntry] = PyEntry if NativeEntry is None else NativeEntry
#: The charging rule of ``Entry`` on this interpreter: what a cache charges by default.
CPYTHON_COST = PY_ENTRY_COST if NativeEntry is None else measure_cpython_cost(NativeEntry(b"", b""), None)


class LRUCache:
    """A least-recently-used cache bounded by bytes and, optionally, by items.

    Counters are plain int attributes, monotonic over the cache's life
    (``clear()`` does not reset them): ``hits``, ``misses`` (``get`` only),
    ``evictions`` (entries dropped to make room), ``expirations`` (expired
    entries removed, lazily or by ``expire_some``), ``sets`` (successful
    ``set``/``apply``/``incr``), ``deletes`` (live entries removed by
    ``delete``, ``apply_delete`` or ``expire`` with ``ttl_ms <= 0``).

    ``on_drop``, when set, is called with the key of every entry that leaves
    on the cache's own initiative (evicted for room, or removed because it
    expired), after it has left; the changes a caller asks for (set, delete,
    ``expire``, ``clear``) are the caller's to see.
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_count",
        "_shards",
        "_head",
        "_heap",
        "_old_heap",
        "_max_bytes",
        "_max_items",
        "_max_tombs",
        "_n_expiring",
        "_cost",
        "_entry",
        "_entry_fixed",
        "_expiry_fixed",
        "_expiry_keys",
        "_native",
        "_tomb_fixed",
        "_tomb_ttl",
        "_tombs",
        "deletes",
        "evictions",
        "expirations",
        "hits",
        "misses",
        "on_drop",
        "sets",
    )

    def __init__(
        self,
        max_bytes: int,
        max_items: int = 0,
        *,
        clock: Callable[[], int] = wall_ms,
        cost: EntryCost | None = None,
        tombstone_ttl_ms: int = 60_000,
        max_tombstones: int = 100_000,
        native: bool | None = None,
    ) -> None:
        """Create an empty cache.

        Args:
            max_bytes: byte budget over the charges of all entries and
                tombstones; must be > 0.
            max_items: item cap; 0 means no cap.
            clock: returns the current wall-clock time in integer
                milliseconds (tests pass a fake one).
            cost: the charging rule; by default the one measured for the
                entry in use (tests pass simpler ones).
            tombstone_ttl_ms: how long a delete's tombstone lasts.
            max_tombstones: most tombstones kept (oldest dropped first);
                0 disables tombstones.
            native: use the C ``Entry`` (True), the pure-Python one
                (False), or the C one when it was built (None).

        Raises:
            ValueError: ``max_bytes <= 0`` or any other argument negative,
                or ``native=True`` where the C extension was not built.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        if tombstone_ttl_ms < 0:
            raise ValueError(f"tombstone_ttl_ms must be >= 0, got {tombstone_ttl_ms}")
        if max_tombstones < 0:
            raise ValueError(f"max_tombstones must be >= 0, got {max_tombstones}")
        if native is None:
            native = NativeEntry is not None
        if native and NativeEntry is None:
            raise ValueError("native entries asked for, but the C extension dcache.lru._entry was not built")
        entry = self._entry = NativeEntry if native and NativeEntry is not None else PyEntry
        #: With C entries each shard maps an entry to itself (it hashes and compares as its key), else a key to its entry.
        self._native = native
        if cost is None:
            cost = CPYTHON_COST if entry is Entry else PY_ENTRY_COST
        #: Keyed by ``bytes``, or with C entries by the entries themselves (``_native``).
        self._shards: list[dict[Any, PyEntry]] = [{} for _ in range(SHARDS)]
        self._count = 0
        head = self._head = entry(b"", b"")
        head.prev = head.next = head
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_items = max_items
        self._cost = cost
        # charges are these plus the lengths: see EntryCost.entry_bytes
        per_object = cost.object_bytes(0)
        #: Key objects an expiry holds (the heap items' keys), charged ``len(key)`` each.
        self._expiry_keys = 2 if cost.packed else 1
        self._entry_fixed = cost.entry + (cost.align - 1 if cost.packed else 2 * per_object)
        self._expiry_fixed = cost.expiry + self._expiry_keys * per_object
        self._tomb_fixed = cost.tombstone + per_object
        self._clock = clock
        self._heap: list[tuple[int, bytes]] = []
        #: The heap a compaction is draining into ``_heap`` (see ``_compact_step``); empty otherwise.
        self._old_heap: list[tuple[int, bytes]] = []
        self._n_expiring = 0
        self._tombs: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._tomb_ttl = tombstone_ttl_ms
        self._max_tombs = max_tombstones
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        self.sets = 0
        self.deletes = 0
        self.on_drop: Callable[[bytes], None] | None = None

    # ------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        """Number of entries, including expired ones not yet removed."""
        return self._count

    def __contains__(self, key: object) -> bool:
        """Same as ``exists(key)`` (expired entries are removed)."""
        return isinstance(key, bytes) and self.exists(key)

    @property
    def bytes_used(self) -> int:
        """Exact sum of the charges of the entries and tombstones (see ``charge``)."""
        return self._bytes

    @property
    def max_bytes(self) -> int:
        """The byte budget."""
        return self._max_bytes

    @property
    def max_items(self) -> int:
        """The item cap (0 = none)."""
        return self._max_items

    @property
    def cost(self) -> EntryCost:
        """The charging rule."""
        return self._cost

    def charge(self, key: bytes, value: bytes, expires_at: int = NO_EXPIRY) -> int:
        """Bytes an entry is charged: ``cost.entry_bytes`` of its lengths and expiry.

        An entry whose charge exceeds ``max_bytes`` is refused with
        ``EntryTooLargeError``.
        """
        return self._cost.entry_bytes(len(key), len(value), expires_at != NO_EXPIRY)

    @property
    def tombstone_count(self) -> int:
        """Number of tombstones held, including expired ones not yet purged."""
        return len(self._tombs)

    def stats(self) -> dict[str, int]:
        """Counters and sizes as a fresh dict (for STATS and metrics)."""
        return {
            "items": self._count,
            "bytes_used": self._bytes,
            "max_bytes": self._max_bytes,
            "max_items": self._max_items,
            "tombstones": len(self._tombs),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "sets": self.sets,
            "deletes": self.deletes,
        }

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> bytes | None:
        """Return the live value of ``key`` and mark it most recently used.

        Counts a hit, or a miss if the key is absent or expired (an expired
        entry is removed and counted as an expiration).
        """
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is None:
            self.misses += 1
            return None
        exp = e.expires_at
        if exp and exp <= self._clock():
            self._expire(e)
            self.misses += 1
            return None
        head = self._head
        last = head.prev
        if last is not e:
            p = e.prev
            n = e.next
            p.next = n
            n.prev = p
            last.next = e
            e.prev = last
            e.next = head
            head.prev = e
        self.hits += 1
        return e.value

    def get_entry(self, key: bytes) -> PyEntry | None:
        """Return the live ``Entry`` for ``key`` (read-only) or ``None``.

        No hit/miss counting and no recency change; an expired entry is
        removed (counted as an expiration) and ``None`` returned.
        """
        return self._live(key)

    def lookup(self, key: bytes) -> PyEntry | None:
        """Like ``get`` but return the live ``Entry`` (read-only) instead of its value.

        Counts a hit or a miss and marks a hit most recently used; an expired
        entry is removed (counted as an expiration and a miss). For reads
        that also need the expiry and the version (GETV, and MGETV's every
        key: ``get``'s steps, inlined as there).
        """
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is None:
            self.misses += 1
            return None
        exp = e.expires_at
        if exp and exp <= self._clock():
            self._expire(e)
            self.misses += 1
            return None
        head = self._head
        last = head.prev
        if last is not e:
            p = e.prev
            n = e.next
            p.next = n
            n.prev = p
            last.next = e
            e.prev = last
            e.next = head
            head.prev = e
        self.hits += 1
        return e

    def peek(self, key: bytes) -> bytes | None:
        """Return the live value without changing recency, counters or state."""
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is None:
            return None
        exp = e.expires_at
        if exp and exp <= self._clock():
            return None
        return e.value

    def exists(self, key: bytes) -> bool:
        """Whether ``key`` is live; no counting, no recency change.

        An expired entry is removed (counted as an expiration).
        """
        return self._live(key) is not None

    def ttl_ms(self, key: bytes) -> int:
        """Remaining time to live: -2 if absent, -1 if no expiry, else ms >= 0."""
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is None:
            return -2
        exp = e.expires_at
        if not exp:
            return -1
        now = self._clock()
        if exp <= now:
            self._expire(e)
            return -2
        return exp - now

    def tombstone_version(self, key: bytes) -> int:
        """The version of the key's unexpired tombstone, or 0 if none.

        An expired tombstone is dropped.
        """
        t = self._tombs.get(key)
        if t is None:
            return 0
        if t[1] <= self._clock():
            del self._tombs[key]
            self._bytes -= self._tomb_fixed + len(key)
            return 0
        return t[0]

    def items(self, *, include_expired: bool = False) -> Iterator[tuple[bytes, bytes, int, int]]:
        """Yield ``(key, value, expires_at, version)`` from LRU to MRU.

        Expired entries are skipped (never removed) unless ``include_expired``
        (for tests and debugging: it shows entries not yet lazily removed).
        The clock is read once, when iteration starts. The cache must not be
        mutated while the iterator is in use; use ``snapshot_items`` to take
        a copy instead.
        """
        now = -1 if include_expired else self._clock()
        head = self._head
        e = head.next
        while e is not head:
            exp = e.expires_at
            if not exp or exp > now:
                yield e.key, e.value, exp, e._version + VERSION_BIAS
            e = e.next

    def snapshot_items(self) -> list[tuple[bytes, bytes, int, int]]:
        """A list copy of ``items()``, safe to serialize while the cache changes."""
        return list(self.items())

    def keys_snapshot(self) -> Sequence[bytes]:
        """Every key (expired ones not yet removed included), as of now: O(n) references.

        For bounded, resumable scans: the sequence stays valid while the
        cache changes; look each key up again (``get_entry``) before using
        it. A list of the keys with the Python entry; with the C entry a
        list of the entries, whose keys are copied out as they are read
        (copying a million keys up front held the loop 270-300 ms and took
        64 bytes a key for the scan's life; the list alone takes 40 ms).
        An entry removed meanwhile stays in memory until the sequence goes.
        """
        if self._native:  # the shards' keys are the entries
            return _KeysOf(list(chain.from_iterable(self._shards)))
        return list(chain.from_iterable(self._shards))

    def key_shards(self) -> Iterator[list[bytes]]:
        """Copy the keys one shard at a time: each list is made when the iterator reaches it.

        Unlike ``keys_snapshot`` this may be interleaved with writes (yield
        to the event loop between lists): a key never changes shard, so a
        key that is in the cache for the whole iteration is in exactly one
        list; keys added or removed meanwhile may or may not be. Expired
        entries not yet removed are included; look each key up again
        (``get_entry``) before using it. Empty shards are skipped.
        """
        native = self._native
        for shard in self._shards:
            if shard:
                yield [e.key for e in shard] if native else list(shard)

    def entry_shards(self) -> Iterator[list[PyEntry]]:
        """The entries one shard at a time, as ``key_shards`` copies the keys; for snapshots.

        The entries may be removed or replaced while the lists are in use:
        check each with ``is_live`` before reading it. Cheaper than
        ``key_shards`` and a lookup by key with the C entry, whose keys are
        copies (a snapshot of a million keys: docs/BENCHMARKS.md).
        """
        for shard in self._shards:
            if shard:
                yield list(shard.values())

    def is_live(self, e: PyEntry) -> bool:
        """Whether ``e`` is still its key's live entry; an expired one is removed (as ``get_entry`` does)."""
        key: Any = e if self._native else e.key  # a C entry looks itself up (it hashes and compares as its key): no key copy
        return self._live(key) is e

    def tombstone_keys_snapshot(self) -> list[bytes]:
        """A list copy of the keys that have a tombstone (expired ones included), O(t).

        Look each up again with ``tombstone_version`` before using it.
        """
        return list(self._tombs)

    # ----------------------------------------------------------------- writes

    def set(
        self,
        key: bytes,
        value: bytes,
        *,
        expires_at: int = NO_EXPIRY,
        version: int = 0,
        nx: bool = False,
        xx: bool = False,
    ) -> bool:
        """Store ``value`` under ``key`` as the most recently used entry.

        A local write: it replaces any entry whatever its version and removes
        the key's tombstone. Least recently used entries are evicted (and
        counted) until the byte budget and the item cap hold. A set whose
        ``expires_at`` has already passed removes the key and stores nothing
        (like Redis), but still counts as done.

        Args:
            key, value: bytes.
            expires_at: absolute wall-clock ms, or ``NO_EXPIRY``.
            version: the write's version (0 = unversioned).
            nx: only store if the key is absent (or expired).
            xx: only store if the key is live.

        Returns:
            False if the NX/XX condition failed (nothing changed), else True.

        Raises:
            EntryTooLargeError: the entry's charge alone exceeds
                ``max_bytes``; the cache is left unchanged.
            ValueError: both ``nx`` and ``xx`` given.
        """
        size = len(key) + len(value) + self._entry_fixed
        if expires_at:
            size += self._expiry_fixed + self._expiry_keys * len(key)
        if size > self._max_bytes:
            raise EntryTooLargeError(
                f"entry of key {len(key)} + value {len(value)} bytes is charged {size} bytes, "
                f"more than the cache budget of {self._max_bytes} bytes"
            )
        entries = self._shards[hash(key) & _SHARD_MASK]
        e = entries.get(key)
        if nx or xx:
            if nx and xx:
                raise ValueError("nx and xx are mutually exclusive")
            live = e is not None and (not e.expires_at or e.expires_at > self._clock())
            if nx == live:
                return False
        if self._tombs and self._tombs.pop(key, None) is not None:
            self._bytes -= self._tomb_fixed + len(key)
        self.sets += 1
        if expires_at:
            if expires_at <= self._clock():
                if e is not None:
                    self._remove(e)
                    self.expirations += 1
                return True
            if e is None or e.expires_at != expires_at:
                heappush(self._heap, (expires_at, key))
        head = self._head
        if e is None:
            e = self._entry(key, value, expires_at, version)
            entries[e if self._native else key] = e
            self._count += 1
            if expires_at:
                self._n_expiring += 1
            last = head.prev
            last.next = e
            e.prev = last
            e.next = head
            head.prev = e
            self._bytes += size
        else:
            self._bytes += len(value) - len(e.value)
            old_exp = e.expires_at
            if old_exp != expires_at:
                if not old_exp:
                    self._n_expiring += 1
                    self._bytes += self._expiry_fixed + self._expiry_keys * len(key)
                elif not expires_at:
                    self._n_expiring -= 1
                    self._bytes -= self._expiry_fixed + self._expiry_keys * len(key)
                e.expires_at = expires_at
            e.value = value
            e._version = version - VERSION_BIAS
            self._to_mru(e)
        if self._bytes > self._max_bytes or (self._max_items and self._count > self._max_items):
            self._evict(e)
        if expires_at and (self._old_heap or len(self._heap) > 2 * self._n_expiring + _HEAP_SLACK):
            self._compact_step()
        return True

    def apply(self, key: bytes, value: bytes, *, expires_at: int, version: int) -> bool:
        """Last-writer-wins import (replication, migration, restore).

        Stores the entry only if ``version`` is strictly greater than the
        live entry's version and the key's tombstone version (an absent key
        with no tombstone accepts any version), and ``expires_at`` has not
        passed. An applied import clears the tombstone, becomes the most
        recently used entry and evicts like ``set``.

        Returns:
            Whether the entry was stored.

        Raises:
            EntryTooLargeError: the entry's charge alone exceeds
                ``max_bytes``; the cache is left unchanged.
        """
        # The steps of _charge, _live and Entry.version, inlined: every write routed by a master comes here.
        size = len(key) + len(value) + self._entry_fixed
        if expires_at:
            size += self._expiry_fixed + self._expiry_keys * len(key)
        if size > self._max_bytes:
            raise EntryTooLargeError(f"entry charged {size} bytes exceeds the cache budget of {self._max_bytes} bytes")
        if expires_at and expires_at <= self._clock():
            return False
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is not None:
            exp = e.expires_at
            if exp and exp <= self._clock():
                self._expire(e)
                e = None
            elif version <= e._version + VERSION_BIAS:
                return False
        tombs = self._tombs
        if tombs and version <= self.tombstone_version(key):
            return False
        if e is None or e.expires_at != expires_at:
            self._put(key, value, size, e, expires_at, version)
            return True
        # The overwrite of a live entry with the same expiry (every write of a key the node holds, without a TTL):
        # the steps of _put, inlined; the charge changes by the value's length only and the expiry heap not at all.
        if tombs and tombs.pop(key, None) is not None:
            self._bytes -= self._tomb_fixed + len(key)
        self.sets += 1
        self._bytes += len(value) - len(e.value)
        e.value = value
        e._version = version - VERSION_BIAS
        head = self._head
        last = head.prev
        if last is not e:
            p = e.prev
            n = e.next
            p.next = n
            n.prev = p
            last.next = e
            e.prev = last
            e.next = head
            head.prev = e
        if self._bytes > self._max_bytes or (self._max_items and self._count > self._max_items):
            self._evict(e)
        return True

    def batch_apply(self) -> Callable[..., bool]:
        """The ``apply`` to call for each entry of a batch of imports stored in one go (nothing else runs in between).

        Here ``apply`` itself; a subclass that wraps ``apply`` may return a
        cheaper function that is equivalent for the whole batch.
        """
        return self.apply

    def apply_many(self, items: Sequence[tuple[bytes, bytes, int, int]]) -> int:
        """``apply`` of each ``(key, value, expires_at, version)`` in order, for APPLY and migration pages.

        Every entry's charge is checked before any is stored; the clock is
        read once for the batch. A key with no entry and no tombstone (all
        of them, on a node receiving its new ranges) goes straight to the
        store; any other takes ``apply``'s path.

        Returns:
            How many entries were stored.

        Raises:
            EntryTooLargeError: an entry's charge alone exceeds
                ``max_bytes``; nothing is stored.
        """
        charge = self._charge
        sizes = [charge(len(key), len(value), expires_at) for key, value, expires_at, _ in items]
        if sizes and max(sizes) > self._max_bytes:
            size = max(sizes)
            raise EntryTooLargeError(f"entry charged {size} bytes exceeds the cache budget of {self._max_bytes} bytes")
        now = self._clock()
        shards = self._shards
        tombs = self._tombs
        put = self._put
        applied = 0
        for (key, value, expires_at, version), size in zip(items, sizes, strict=True):
            if expires_at and expires_at <= now:
                continue
            if key in shards[hash(key) & _SHARD_MASK] or (tombs and key in tombs):
                applied += self.apply(key, value, expires_at=expires_at, version=version)
                continue
            put(key, value, size, None, expires_at, version)
            applied += 1
        return applied

    def delete(self, key: bytes, *, version: int = 0) -> bool:
        """Remove ``key``; with a non-zero ``version`` also leave a tombstone.

        The tombstone (kept if it is newer than an existing one) lasts
        ``tombstone_ttl_ms`` and makes ``apply`` reject older copies.

        Returns:
            Whether a live entry was removed.
        """
        e = self._live(key)
        if e is not None:
            self._remove(e)
            self.deletes += 1
        if version:
            self._record_tombstone(key, version)
        return e is not None

    def apply_delete(self, key: bytes, *, version: int) -> bool:
        """Last-writer-wins delete: remove the live entry only if it is older.

        The live entry is removed only if its version is below ``version``;
        a tombstone with ``version`` is recorded if it is newer than the
        existing one (even when the live entry is newer, so an import between
        the two versions is still rejected after the entry is evicted).

        Returns:
            Whether a live entry was removed.
        """
        e = self._live(key)
        removed = False
        if e is not None and e.version < version:
            self._remove(e)
            self.deletes += 1
            removed = True
        self._record_tombstone(key, version)
        return removed

    def touch(self, key: bytes) -> bool:
        """Mark ``key`` most recently used; return whether it is live."""
        e = self._live(key)
        if e is None:
            return False
        self._to_mru(e)
        return True

    def expire(self, key: bytes, ttl_ms: int) -> bool:
        """Set the key's expiry to ``now + ttl_ms``; ``ttl_ms <= 0`` deletes it.

        No recency change, no version change. An expiry adds to the entry's
        charge: if that exceeds the budget, other entries are evicted from
        the LRU end, then the oldest tombstones dropped, and this entry too
        if its charge alone exceeds ``max_bytes``.

        Returns:
            Whether the key was live.
        """
        e = self._live(key)
        if e is None:
            return False
        if ttl_ms <= 0:
            self._remove(e)
            self.deletes += 1
            return True
        exp = self._clock() + ttl_ms
        if e.expires_at != exp:
            added = not e.expires_at
            e.expires_at = exp
            if added:
                self._n_expiring += 1
                self._bytes += self._expiry_fixed + self._expiry_keys * len(key)
            self._push_expiry(exp, key)
            if added and self._bytes > self._max_bytes:
                self._evict(e)
        return True

    def persist(self, key: bytes) -> bool:
        """Remove the key's expiry; return True only if it had one (like Redis)."""
        e = self._live(key)
        if e is None or not e.expires_at:
            return False
        e.expires_at = NO_EXPIRY
        self._n_expiring -= 1
        self._bytes -= self._expiry_fixed + self._expiry_keys * len(key)
        return True

    def incr(self, key: bytes, delta: int, *, version: int = 0) -> int:
        """Add ``delta`` to the integer stored at ``key`` and return the result.

        The value must be the canonical ASCII decimal of a signed 64-bit
        integer (optional ``-``, no ``+``, spaces or leading zeros; like
        Redis). An absent key counts as 0. The result is stored as ASCII
        decimal, keeps the existing expiry, takes ``version``, clears the
        tombstone and becomes the most recently used entry.

        Raises:
            NotAnInt64Error: the stored value is not such an integer.
            IntegerOverflowError: the result is outside the signed 64-bit range.
            EntryTooLargeError: the new entry's charge alone exceeds ``max_bytes``.
        """
        e = self._live(key)
        if e is None:
            current = 0
            expires_at = NO_EXPIRY
        else:
            current = _parse_int64(e.value)
            expires_at = e.expires_at
        result = current + delta
        if result < INT64_MIN or result > INT64_MAX:
            raise IntegerOverflowError(f"{current} + {delta} overflows a signed 64-bit integer")
        value = b"%d" % result
        size = self._charge(len(key), len(value), expires_at)
        if size > self._max_bytes:
            raise EntryTooLargeError(f"entry charged {size} bytes exceeds the cache budget of {self._max_bytes} bytes")
        self._put(key, value, size, e, expires_at, version)
        return result

    def clear(self) -> None:
        """Drop every entry and tombstone; counters are kept."""
        head = self._head
        e = head.next
        while e is not head:  # break the list's reference cycles so memory frees promptly
            n = e.next
            e.prev = e.next = head
            e = n
        head.prev = head.next = head
        self._shards = [{} for _ in range(SHARDS)]
        self._count = 0
        self._bytes = 0
        self._heap = []
        self._old_heap = []
        self._n_expiring = 0
        self._tombs = OrderedDict()

    # --------------------------------------------------------- active expiry

    def expire_some(self, max_checks: int = 20) -> int:
        """Remove up to ``max_checks`` expired entries, soonest expiry first.

        Work is bounded: at most ``max_checks`` removals plus at most
        ``max_checks`` stale heap items skipped, and at most ``max_checks``
        expired tombstones purged (oldest first). Safe to call every loop
        tick.

        Returns:
            How many expired entries were removed.
        """
        if max_checks <= 0:
            return 0
        now = self._clock()
        new = self._heap
        old = self._old_heap
        shards = self._shards
        removed = 0
        skipped = 0
        while removed < max_checks:
            # the soonest item of the two heaps (``old``: a compaction is draining it)
            if old and (not new or old[0] < new[0]):
                heap = old
            elif new:
                heap = new
            else:
                break
            exp, key = heap[0]
            e = shards[hash(key) & _SHARD_MASK].get(key)
            if e is None or e.expires_at != exp:
                heappop(heap)
                skipped += 1
                if skipped >= max_checks:
                    break
                continue
            if exp > now:
                break
            heappop(heap)
            self._expire(e)
            removed += 1
        tombs = self._tombs
        for _ in range(max_checks):
            if not tombs:
                break
            k, t = next(iter(tombs.items()))
            if t[1] > now:
                break
            del tombs[k]
            self._bytes -= self._tomb_fixed + len(k)
        return removed

    # -------------------------------------------------------------- checking

    def check_valid(self) -> None:
        """Assert every structural invariant (O(n), for tests).

        Raises:
            AssertionError: with a message naming the broken invariant.
        """
        shards = self._shards
        head = self._head
        n = self._count
        if len(shards) != SHARDS:
            raise AssertionError(f"{len(shards)} shards instead of {SHARDS}")
        if sum(map(len, shards)) != n:
            raise AssertionError(f"the shards hold {sum(map(len, shards))} entries but the count is {n}")
        for i, shard in enumerate(shards):
            for key, entry in shard.items():
                if hash(key) & _SHARD_MASK != i:
                    raise AssertionError(f"key {key!r} is in shard {i}, not the one it hashes to")
                if entry.__class__ is not self._entry:
                    raise AssertionError(f"entry {key!r} is a {entry.__class__.__name__}, not a {self._entry.__name__}")
                if (key is not entry) if self._native else (key.__class__ is not bytes):
                    raise AssertionError(f"shard {i} keys {key!r} by a {key.__class__.__name__}")
        entries: dict[bytes, PyEntry] = {}
        for shard in shards:
            entries.update(shard)
        if head.key != b"" or head.value != b"":
            raise AssertionError("sentinel node was modified")
        count = 0
        total = 0
        expiring = 0
        seen: set[bytes] = set()
        e = head.next
        prev = head
        while e is not head:
            if count > n:
                raise AssertionError(f"list longer than the dict ({n} entries): cycle or stray node")
            if e.prev is not prev:
                raise AssertionError(f"backward link of {e.key!r} does not match the forward walk")
            if entries.get(e.key) is not e:
                raise AssertionError(f"list node {e.key!r} is not the dict's entry for that key")
            if e.key in seen:
                raise AssertionError(f"key {e.key!r} appears twice in the list")
            seen.add(e.key)
            if not isinstance(e.key, bytes) or not isinstance(e.value, bytes):
                raise AssertionError(f"entry {e.key!r} holds non-bytes key or value")
            if e.expires_at < 0:
                raise AssertionError(f"entry {e.key!r} has a negative expiry")
            total += self._charge(len(e.key), len(e.value), e.expires_at)
            if e.expires_at:
                expiring += 1
            count += 1
            prev = e
            e = e.next
        if head.prev is not prev:
            raise AssertionError("sentinel's backward link does not point at the last node")
        if count != n:
            raise AssertionError(f"list has {count} nodes but the dict has {n} entries")
        for key in self._tombs:
            total += self._cost.tombstone_bytes(len(key))
        if total != self._bytes:
            raise AssertionError(f"bytes_used is {self._bytes} but entries and tombstones sum to {total}")
        if self._bytes > self._max_bytes:
            raise AssertionError(f"bytes_used {self._bytes} exceeds max_bytes {self._max_bytes}")
        if self._max_items and n > self._max_items:
            raise AssertionError(f"{n} entries exceed max_items {self._max_items}")
        if expiring != self._n_expiring:
            raise AssertionError(f"{expiring} entries have an expiry but the counter says {self._n_expiring}")
        heap = self._heap
        old = self._old_heap
        for h in (heap, old):
            for i in range(1, len(h)):
                if h[(i - 1) >> 1] > h[i]:
                    raise AssertionError(f"expiry heap property broken at index {i}")
        bound = (5 * expiring) // 2 + 2 * _HEAP_SLACK if old else 2 * expiring + _HEAP_SLACK
        if len(heap) + len(old) > bound:
            raise AssertionError(f"expiry heaps hold {len(heap)} + {len(old)} items for {expiring} expiring entries")
        in_heap = set(heap)
        in_heap.update(old)
        for key, entry in entries.items():
            if entry.expires_at and (entry.expires_at, key) not in in_heap:
                raise AssertionError(f"entry {key!r} has an expiry but no heap item")
        tombs = self._tombs
        if len(tombs) > self._max_tombs:
            raise AssertionError(f"{len(tombs)} tombstones exceed max_tombstones {self._max_tombs}")
        for key, (version, _) in tombs.items():
            if version <= 0:
                raise AssertionError(f"tombstone {key!r} has non-positive version {version}")
            live = entries.get(key)
            if live is not None and live.version < version:
                raise AssertionError(f"entry {key!r} (version {live.version}) is older than its tombstone ({version})")

    # --------------------------------------------------------------- private

    def _live(self, key: bytes) -> PyEntry | None:
        """The live entry for ``key``; removes (and counts) an expired one."""
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is None:
            return None
        exp = e.expires_at
        if exp and exp <= self._clock():
            self._expire(e)
            return None
        return e

    def _expire(self, e: PyEntry) -> None:
        """Remove the expired entry ``e``, count it and tell ``on_drop``."""
        self._remove(e)
        self.expirations += 1
        if self.on_drop is not None:
            self.on_drop(e.key)

    def _remove(self, e: PyEntry) -> None:
        """Unlink ``e`` from the list and the dict and release its bytes."""
        p = e.prev
        n = e.next
        p.next = n
        n.prev = p
        e.prev = e.next = self._head  # not to itself: a self-cycle would need the GC
        key = e.key
        del self._shards[hash(key) & _SHARD_MASK][key]
        self._count -= 1
        self._bytes -= len(key) + len(e.value) + self._entry_fixed
        if e.expires_at:
            self._n_expiring -= 1
            self._bytes -= self._expiry_fixed + self._expiry_keys * len(key)

    def _charge(self, key_len: int, value_len: int, expires_at: int) -> int:
        """``charge`` from lengths, with the constants cached on the cache."""
        size = key_len + value_len + self._entry_fixed
        return size + self._expiry_fixed + self._expiry_keys * key_len if expires_at else size

    def _to_mru(self, e: PyEntry) -> None:
        head = self._head
        last = head.prev
        if last is e:
            return
        p = e.prev
        n = e.next
        p.next = n
        n.prev = p
        last.next = e
        e.prev = last
        e.next = head
        head.prev = e

    def _put(self, key: bytes, value: bytes, size: int, e: PyEntry | None, expires_at: int, version: int) -> None:
        """Store without checks (``e`` is the live entry or None, ``size`` the new charge); for apply/incr.

        ``set`` inlines the same steps to keep its hot path free of a call.
        """
        if self._tombs and self._tombs.pop(key, None) is not None:
            self._bytes -= self._cost.tombstone_bytes(len(key))
        self.sets += 1
        if e is None:
            e = self._entry(key, value, expires_at, version)
            self._shards[hash(key) & _SHARD_MASK][e if self._native else key] = e
            self._count += 1
            head = self._head
            last = head.prev
            last.next = e
            e.prev = last
            e.next = head
            head.prev = e
            self._bytes += size
            if expires_at:
                self._n_expiring += 1
                self._push_expiry(expires_at, key)
        else:
            self._bytes += size - self._charge(len(key), len(e.value), e.expires_at)
            old_exp = e.expires_at
            if old_exp != expires_at:
                if not old_exp:
                    self._n_expiring += 1
                elif not expires_at:
                    self._n_expiring -= 1
                e.expires_at = expires_at
                if expires_at:
                    self._push_expiry(expires_at, key)
            e.value = value
            e._version = version - VERSION_BIAS
            self._to_mru(e)
        if self._bytes > self._max_bytes or (self._max_items and self._count > self._max_items):
            self._evict(e)

    def _evict(self, keep: PyEntry | None) -> None:
        """Make the byte budget and the item cap hold again.

        Evicts entries from the LRU end, skipping ``keep`` (the entry just
        written or given an expiry), then drops the oldest tombstones, then
        evicts ``keep`` if it is still needed (never for a write: an entry
        whose charge alone exceeds ``max_bytes`` is refused before).
        """
        head = self._head
        max_bytes = self._max_bytes
        max_items = self._max_items
        evicted = 0
        while self._bytes > max_bytes or (max_items and self._count > max_items):
            e = head.next
            if e is keep:  # a write's entry is the MRU one: met only when it alone is left
                e = e.next
            if e is head:  # no other entry left: over the byte budget, not the item cap
                tombs = self._tombs
                tomb_bytes = self._cost.tombstone_bytes
                while tombs and self._bytes > max_bytes:
                    self._bytes -= tomb_bytes(len(tombs.popitem(last=False)[0]))
                if self._bytes > max_bytes and keep is not None:
                    self._remove(keep)
                    evicted += 1
                    if self.on_drop is not None:
                        self.on_drop(keep.key)
                break
            self._remove(e)
            evicted += 1
            if self.on_drop is not None:
                self.on_drop(e.key)
        self.evictions += evicted

    def _push_expiry(self, expires_at: int, key: bytes) -> None:
        heap = self._heap
        heappush(heap, (expires_at, key))
        if self._old_heap or len(heap) > 2 * self._n_expiring + _HEAP_SLACK:
            self._compact_step()

    def _compact_step(self) -> None:
        """One bounded step of the expiry heap's compaction, after a push (see ``drain_expiry_heap``).

        Over its bound (``2 * n_expiring + 1024`` items), the heap becomes
        the old heap and a new, empty one takes the pushes; then every push
        drains ``_DRAIN_PER_PUSH`` items of the old one into the new one, so
        the old one is gone before the new one can reach its own bound, and
        no single write pays for more than a few items (a compaction in one
        go took 1.1-1.7 s for a million expiring keys).
        """
        if not self._old_heap:
            if len(self._heap) <= 2 * self._n_expiring + _HEAP_SLACK:
                return
            self._old_heap, self._heap = self._heap, []
        self.drain_expiry_heap(_DRAIN_PER_PUSH)

    def drain_expiry_heap(self, max_items: int) -> int:
        """Move up to ``max_items`` items of a compaction's old expiry heap into the current one, dropping stale ones.

        O(``max_items`` log n). Items are taken from the old heap's end,
        which keeps it a heap, so ``expire_some`` reads both heaps while the
        compaction lasts. Writes with a TTL call it with a few items; the
        aux node's expiry sweep calls it with many, so the compaction ends
        within seconds even without writes. Nothing to do (0) when no
        compaction runs. An entry removed and stored again with the same
        expiry has two identical current items: if, once the old heap is
        empty, duplicates keep the heap over its bound, a set removes them
        in one go (rare, and it at least halves the heap).

        Returns:
            How many old items were looked at.
        """
        old = self._old_heap
        if not old:
            return 0
        heap = self._heap
        shards = self._shards
        n = min(max_items, len(old))
        pop = old.pop
        for _ in range(n):
            item = pop()
            key = item[1]
            e = shards[hash(key) & _SHARD_MASK].get(key)
            if e is not None and e.expires_at == item[0]:
                heappush(heap, item)
        if not old and len(heap) > 2 * self._n_expiring + _HEAP_SLACK:
            heap[:] = set(heap)
            heapify(heap)
        return n

    def _record_tombstone(self, key: bytes, version: int) -> None:
        """Record ``key -> version`` unless an unexpired tombstone is as new."""
        if version <= 0 or not self._max_tombs:
            return
        tombs = self._tombs
        if version <= self.tombstone_version(key):
            return
        tomb_bytes = self._cost.tombstone_bytes
        if key not in tombs:
            self._bytes += tomb_bytes(len(key))
        tombs[key] = (version, self._clock() + self._tomb_ttl)
        tombs.move_to_end(key)
        while len(tombs) > self._max_tombs:
            self._bytes -= tomb_bytes(len(tombs.popitem(last=False)[0]))
        if self._bytes > self._max_bytes:
            self._evict(None)


class _KeysOf(Sequence[bytes]):
    """The keys of a list of C entries, each copied out when it is read (``LRUCache.keys_snapshot``)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: list[PyEntry]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [e.key for e in self._entries[index]]
        return self._entries[index].key


def _parse_int64(value: bytes) -> int:
    """Parse the canonical ASCII decimal of a signed 64-bit integer.

    Raises:
        NotAnInt64Error: anything else (sign ``+``, spaces, leading zeros,
            ``-0``, non-ASCII digits, out of range).
    """
    if value[:1] == b"-":
        digits = value[1:]
        negative = True
    else:
        digits = value
        negative = False
    if (
        not 0 < len(digits) <= 19 or not digits.isdigit() or (digits[0] == 48 and (negative or len(digits) > 1))  # 48 == ord("0")
    ):
        raise NotAnInt64Error(f"value is not a signed 64-bit decimal integer: {value[:32]!r}")
    n = -int(digits) if negative else int(digits)
    if n < INT64_MIN or n > INT64_MAX:
        raise NotAnInt64Error(f"value is not a signed 64-bit decimal integer: {value[:32]!r}")
    return n
