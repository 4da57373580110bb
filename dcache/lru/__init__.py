"""The LRU cache: a pure, synchronous structure (see ``cache.py``'s design note)."""

from .cache import (
    CPYTHON_COST,
    INT64_MAX,
    INT64_MIN,
    NO_EXPIRY,
    Entry,
    EntryTooLargeError,
    IntegerOverflowError,
    LRUCache,
    NotAnInt64Error,
)
from .cost import EntryCost
from .snapshot import (
    SnapshotCorruptError,
    SnapshotData,
    SnapshotError,
    SnapshotForeignError,
    dump,
    load,
)

__all__ = [
    "CPYTHON_COST",
    "INT64_MAX",
    "INT64_MIN",
    "NO_EXPIRY",
    "Entry",
    "EntryCost",
    "EntryTooLargeError",
    "IntegerOverflowError",
    "LRUCache",
    "NotAnInt64Error",
    "SnapshotCorruptError",
    "SnapshotData",
    "SnapshotError",
    "SnapshotForeignError",
    "dump",
    "load",
]
