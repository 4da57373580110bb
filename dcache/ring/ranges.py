"""Sets of hash ranges as fast membership tests (pure).

A range is the arc ``(start, end]`` of the 64-bit hash circle
(``dcache.ring.in_range``): start exclusive, end inclusive, wrapping through
0 when ``start > end``, the whole circle when ``start == end``.
``compile_ranges`` turns a list of arcs into a ``RangeSet``: the sorted,
merged inclusive intervals as one flat list of bounds
``[lo0, hi0 + 1, lo1, hi1 + 1, ...]``, so a hash is in the set exactly when
``bisect_right(bounds, h)`` is odd. Building it is O(r log r) for r ranges;
each test is one ``bisect`` in C, O(log r), and ``select`` tests a whole
batch of hashes in one comprehension, with no Python call per hash (what a
SCAN does with every key it examines).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

__all__ = ["RangeMatcher", "RangeSet", "compile_ranges"]

_U64_MAX = (1 << 64) - 1


class RangeSet:
    """A union of hash ranges: ``rs(h)`` tests one hash, ``rs.select(hashes)`` a batch."""

    __slots__ = ("bounds",)

    def __init__(self, bounds: list[int]) -> None:
        #: ``[lo0, hi0 + 1, lo1, hi1 + 1, ...]``, strictly increasing.
        self.bounds = bounds

    def __call__(self, h: int) -> bool:
        """Whether hash ``h`` is in the set."""
        return bool(bisect_right(self.bounds, h) & 1)

    def select(self, hashes: Iterable[int]) -> list[int]:
        """The positions in ``hashes`` of the hashes in the set, in order."""
        bounds = self.bounds
        return [i for i, h in enumerate(hashes) if bisect_right(bounds, h) & 1]


#: A compiled set of ranges, ``None`` for the whole circle.
RangeMatcher = RangeSet | None


def compile_ranges(ranges: Iterable[tuple[int, int]]) -> RangeMatcher:
    """The ``RangeSet`` of the union of the arcs ``(start, end]``; ``None`` for the whole circle.

    Bounds must already be integers in ``0 .. 2**64-1`` (the protocol's
    parser checks them). An empty iterable matches nothing.
    """
    spans: list[tuple[int, int]] = []
    for start, end in ranges:
        if start == end:
            return None
        if start < end:
            spans.append((start + 1, end))
        else:
            if start < _U64_MAX:
                spans.append((start + 1, _U64_MAX))
            spans.append((0, end))
    spans.sort()
    los: list[int] = []
    his: list[int] = []
    for lo, hi in spans:
        if his and lo <= his[-1] + 1:
            if hi > his[-1]:
                his[-1] = hi
        else:
            los.append(lo)
            his.append(hi)
    if len(los) == 1 and los[0] == 0 and his[0] == _U64_MAX:
        return None
    bounds: list[int] = []
    for lo, hi in zip(los, his, strict=True):
        bounds += (lo, hi + 1)
    return RangeSet(bounds)
