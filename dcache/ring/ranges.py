"""Sets of hash ranges as fast membership tests (pure).

A range is the arc ``(start, end]`` of the 64-bit hash circle
(``dcache.ring.in_range``): start exclusive, end inclusive, wrapping through
0 when ``start > end``, the whole circle when ``start == end``.
``compile_ranges`` turns a list of arcs into sorted, merged inclusive
intervals: one interval is two comparisons, more are a ``bisect``. Building
the matcher is O(r log r) for r ranges; each test is O(log r).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable

__all__ = ["RangeMatcher", "compile_ranges"]

_U64_MAX = (1 << 64) - 1

#: A compiled set of ranges: a predicate on 64-bit hashes, ``None`` for the whole circle.
RangeMatcher = Callable[[int], bool] | None


def _match_none(h: int) -> bool:
    return False


def compile_ranges(ranges: Iterable[tuple[int, int]]) -> RangeMatcher:
    """A membership test for the union of the arcs ``(start, end]``; ``None`` for the whole circle.

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
    if not spans:
        return _match_none
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
    if len(los) == 1:
        lo0, hi0 = los[0], his[0]
        if lo0 == 0 and hi0 == _U64_MAX:
            return None

        def match_one(h: int) -> bool:
            return lo0 <= h <= hi0

        return match_one

    def match_many(h: int) -> bool:
        i = bisect_right(los, h) - 1
        return i >= 0 and h <= his[i]

    return match_many
