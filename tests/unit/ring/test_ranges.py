"""Hash-range sets as membership tests (``dcache.ring.compile_ranges``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.ring import RING_SIZE, compile_ranges, in_range
from dcache.ring.ranges import BUCKET_BITS

U64 = RING_SIZE - 1
BUCKET_SHIFT = 64 - BUCKET_BITS
BUCKET = 1 << BUCKET_SHIFT
hashes = st.one_of(
    st.integers(0, U64),
    st.sampled_from([0, 1, 2, U64 - 1, U64, 1 << 63]),
    st.integers(0, (1 << BUCKET_BITS) - 1).map(lambda k: k << (64 - BUCKET_BITS)),  # a bucket's first hash
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(hashes, hashes), max_size=8), st.lists(hashes, min_size=1, max_size=20))
def test_compile_ranges_matches_in_range(ranges: list[tuple[int, int]], probes: list[int]) -> None:
    match = compile_ranges(ranges)
    for s, e in ranges:
        probes += [s, e, (s + 1) % RING_SIZE, (e + 1) % RING_SIZE]
        for b in (s, e):  # the first and last hash of the bound's bucket and of its neighbours (RangeSet.select)
            start = b >> BUCKET_SHIFT << BUCKET_SHIFT
            probes += [h % RING_SIZE for h in (start, start - 1, start + BUCKET - 1, start + BUCKET)]
    for h in probes:
        expected = any(in_range(h, s, e) for s, e in ranges)
        assert (True if match is None else match(h)) == expected
    if match is not None:
        assert match.select(iter(probes)) == [i for i, h in enumerate(probes) if any(in_range(h, s, e) for s, e in ranges)]


def test_whole_circle_and_nothing() -> None:
    assert compile_ranges([(5, 5)]) is None
    assert compile_ranges([(U64, 0), (0, U64)]) is None
    match = compile_ranges([])
    assert match is not None and not match(0) and not match(U64) and match.select([0, 5, U64]) == []
