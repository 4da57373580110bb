"""The LRU cache: a pure, synchronous structure (see ``cache.py``'s design note)."""

from .cache import (
    ENTRY_OVERHEAD_BYTES,
    INT64_MAX,
    INT64_MIN,
    NO_EXPIRY,
    Entry,
    EntryTooLargeError,
    IntegerOverflowError,
    LRUCache,
    NotAnIntegerError,
)
from .snapshot import (
    SnapshotCorruptError,
    SnapshotData,
    SnapshotError,
    SnapshotForeignError,
    dump,
    load,
)

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "INT64_MAX",
    "INT64_MIN",
    "NO_EXPIRY",
    "Entry",
    "EntryTooLargeError",
    "IntegerOverflowError",
    "LRUCache",
    "NotAnIntegerError",
    "SnapshotCorruptError",
    "SnapshotData",
    "SnapshotError",
    "SnapshotForeignError",
    "dump",
    "load",
]
