"""The hybrid logical clock (``dcache.hlc``): versions strictly increase whatever the wall clock does; the receive rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dcache.hlc import _COUNTER_MAX, HybridClock, version_ceiling, version_wall_ms


class _FakeWall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_versions_increase_within_one_ms_and_when_the_wall_clock_steps_back() -> None:
    wall = _FakeWall(1_000)
    clock = HybridClock("m1", clock=wall)
    seen = [clock.next() for _ in range(10)]
    wall.ms = 900  # the wall clock steps back: versions still grow, on the clock's own ms
    seen += [clock.next() for _ in range(10)]
    wall.ms = 2_000
    seen.append(clock.next())
    assert seen == sorted(set(seen))
    assert {version_wall_ms(v) for v in seen[:20]} == {1_000}
    assert version_wall_ms(seen[-1]) == 2_000


def test_a_full_counter_moves_to_the_next_ms() -> None:
    wall = _FakeWall(5_000)
    clock = HybridClock("m1", clock=wall)
    versions = [clock.next() for _ in range(_COUNTER_MAX + 3)]
    assert versions == sorted(set(versions))
    assert version_wall_ms(versions[_COUNTER_MAX]) == 5_000
    assert version_wall_ms(versions[_COUNTER_MAX + 1]) == 5_001
    wall.ms = 5_001  # the wall clock catches up: still after the versions already issued
    assert clock.next() > versions[-1]


def test_next_is_newer_than_an_observed_version() -> None:
    wall = _FakeWall(10_000)
    other = HybridClock("m2", clock=_FakeWall(10_003))
    clock = HybridClock("m1", clock=wall)
    theirs = other.next()
    assert clock.observe(theirs)
    assert clock.next() > theirs


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


def test_issued_after_tells_this_clocks_later_versions_from_others() -> None:
    mine, other = HybridClock("m1"), HybridClock("m2")
    first = mine.next()
    assert mine.issued_after(mine.next(), first)
    assert not mine.issued_after(first, first) and not mine.issued_after(first - 1, first)
    assert not mine.issued_after(HybridClock("m2", clock=lambda: 2**40).next(), first)  # newer, but another node's
    assert not mine.issued_after(None, first) and not mine.issued_after("1", first)
    assert other.next() != mine.next()
