"""Sets of hash ranges as fast membership tests (pure).

A range is the arc ``(start, end]`` of the 64-bit hash circle
(``dcache.ring.in_range``): start exclusive, end inclusive, wrapping through
0 when ``start > end``, the whole circle when ``start == end``.
``compile_ranges`` turns a list of arcs into a ``RangeSet``: the sorted,
merged inclusive intervals as one flat list of bounds
``[lo0, hi0 + 1, lo1, hi1 + 1, ...]``, so a hash is in the set exactly when
``bisect_right(bounds, h)`` is odd. Building it is O(r log r) for r ranges;
each test is one ``bisect`` in C, O(log r). ``select`` tests a whole batch
of hashes in one comprehension, with no Python call per hash (what a SCAN
does with every key it examines), and looks each hash up in a table of
buckets first (16384, by its top bits, built on first use in O(2**14 + r)):
only a hash in a bucket that a bound cuts needs the ``bisect``. With the
~500 ranges a node gives a newcomer, 0.23 -> 0.14 us per hash.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

__all__ = ["RangeMatcher", "RangeSet", "compile_ranges"]

_U64_MAX = (1 << 64) - 1

#: ``RangeSet.select`` sorts hashes into this many (``2**BUCKET_BITS``) buckets by their top bits first.
BUCKET_BITS = 14
_BUCKET_SHIFT = 64 - BUCKET_BITS
_OUT, _IN, _CUT = 0, 1, 2


class RangeSet:
    """A union of hash ranges: ``rs(h)`` tests one hash, ``rs.select(hashes)`` a batch."""

    __slots__ = ("bounds", "_buckets")

    def __init__(self, bounds: list[int]) -> None:
        #: ``[lo0, hi0 + 1, lo1, hi1 + 1, ...]``, strictly increasing.
        self.bounds = bounds
        self._buckets: bytearray | None = None

    def __call__(self, h: int) -> bool:
        """Whether hash ``h`` is in the set."""
        return bool(bisect_right(self.bounds, h) & 1)

    def select(self, hashes: Iterable[int]) -> list[int]:
        """The positions in ``hashes`` of the hashes in the set, in order.

        A hash is first looked up in a table of ``2**BUCKET_BITS`` buckets
        (its top bits): most buckets lie wholly inside or outside the set,
        and only a hash in a bucket a bound cuts goes on to ``bisect``.
        """
        buckets = self._buckets
        if buckets is None:
            buckets = self._buckets = self._bucket_table()
        bounds = self.bounds
        return [i for i, h in enumerate(hashes) if (b := buckets[h >> _BUCKET_SHIFT]) == _IN or (b and bisect_right(bounds, h) & 1)]

    def _bucket_table(self) -> bytearray:
        """Per bucket: ``_OUT`` (no hash of it in the set), ``_IN`` (every hash), ``_CUT`` (a bound inside it)."""
        table = bytearray(1 << BUCKET_BITS)
        bounds = self.bounds
        size = 1 << _BUCKET_SHIFT
        for j in range(0, len(bounds), 2):
            lo, end = bounds[j], bounds[j + 1]  # the hashes lo .. end - 1
            first_full = -(-lo // size)
            end_full = end // size  # buckets first_full .. end_full - 1 lie inside
            if first_full < end_full:
                table[first_full:end_full] = b"\x01" * (end_full - first_full)
            if lo % size:
                table[lo >> _BUCKET_SHIFT] = _CUT
            if end % size:
                table[(end - 1) >> _BUCKET_SHIFT] = _CUT
        return table


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
