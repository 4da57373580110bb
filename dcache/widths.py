"""The integer widths of the protocol and the cache: signed and unsigned 64-bit."""

from __future__ import annotations

__all__ = ["INT64_MIN", "INT64_MAX", "UINT64_MAX"]

#: Smallest and largest signed 64-bit integers (INCR results, deltas, expiries).
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
#: Largest unsigned 64-bit integer (versions, request ids, hashes, cursors).
UINT64_MAX = (1 << 64) - 1
