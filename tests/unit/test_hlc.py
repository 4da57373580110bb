"""The hybrid logical clock's receive rule (``dcache.hlc``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dcache.hlc import HybridClock, version_ceiling

NOW_MS = 1_800_000_000_000
SKEW_MS = 5_000


def _clock(state: int) -> HybridClock:
    clock = HybridClock("n1", clock=lambda: NOW_MS, max_skew_ms=SKEW_MS)
    clock.observe(state)
    return clock


@given(state=st.integers(0, version_ceiling(NOW_MS, SKEW_MS)), version=st.integers(1, version_ceiling(NOW_MS, SKEW_MS)))
def test_observe_checked_moves_the_clock_as_observe_does(state: int, version: int) -> None:
    a, b = _clock(state), _clock(state)
    assert a.observe(version)
    b.observe_checked(version)
    assert a.next() == b.next()
    assert b.next() > version


def test_version_ceiling_is_capped_at_64_bits() -> None:
    assert version_ceiling(NOW_MS, SKEW_MS) == ((NOW_MS + SKEW_MS) << 22) | ((1 << 22) - 1)
    assert version_ceiling(1 << 42, 0) == (1 << 64) - 1
