"""Consistent hashing: the ring that maps keys to their owning nodes (pure)."""

from .hashring import (
    DERIVE_MAX_CHANGED,
    MAX_RING_POINTS,
    RING_SIZE,
    VNODES_PER_WEIGHT,
    EmptyRingError,
    HashRing,
    PreferenceTable,
    RangeMove,
    hash64,
    in_range,
    moved_ranges,
)
from .ranges import RangeMatcher, RangeSet, compile_ranges

__all__ = [
    "DERIVE_MAX_CHANGED",
    "MAX_RING_POINTS",
    "RING_SIZE",
    "VNODES_PER_WEIGHT",
    "EmptyRingError",
    "HashRing",
    "PreferenceTable",
    "RangeMatcher",
    "RangeSet",
    "RangeMove",
    "compile_ranges",
    "hash64",
    "in_range",
    "moved_ranges",
]
