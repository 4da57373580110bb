"""Example-based tests of ``dcache.lru.LRUCache``, one behaviour at a time."""

from __future__ import annotations

import itertools
import sys
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.lru import (
    CPYTHON_COST,
    INT64_MAX,
    INT64_MIN,
    NO_EXPIRY,
    EntryCost,
    EntryTooLargeError,
    IntegerOverflowError,
    LRUCache,
    NotAnInt64Error,
)
from dcache.lru.cache import SHARDS

OVERHEAD = 10
#: The old flat rule, ``len(key) + len(value) + OVERHEAD``, for example-based tests.
FLAT = EntryCost(entry=OVERHEAD)


class FakeClock:
    """A settable wall clock in integer milliseconds that counts its reads."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, max_bytes: int = 10_000, max_items: int = 0, **kw: Any) -> LRUCache:
    cache = LRUCache(max_bytes, max_items, clock=clock, cost=FLAT, **kw)
    cache.check_valid()
    return cache


def keys(cache: LRUCache) -> list[bytes]:
    return [k for k, _, _, _ in cache.items(include_expired=True)]


# ------------------------------------------------------------- construction


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_max_bytes_must_be_positive(max_bytes: int) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        LRUCache(max_bytes)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_items": -1}, {"tombstone_ttl_ms": -1}, {"max_tombstones": -1}],
)
def test_negative_arguments_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LRUCache(100, **kwargs)


def test_defaults() -> None:
    cache = LRUCache(1000)
    assert cache.max_bytes == 1000
    assert cache.max_items == 0
    assert cache.cost is CPYTHON_COST
    assert NO_EXPIRY == 0
    cache.set(b"k", b"v", expires_at=time.time_ns() // 1_000_000 + 10_000)
    assert 0 < cache.ttl_ms(b"k") <= 10_000  # default clock is wall ms
    assert cache.bytes_used == CPYTHON_COST.entry_bytes(1, 1, expires=True)


# ----------------------------------------------------------- basic get/set


def test_get_set_peek_and_counters(clock: FakeClock) -> None:
    cache = make(clock)
    assert cache.get(b"a") is None
    assert cache.set(b"a", b"1") is True
    assert cache.get(b"a") == b"1"
    assert cache.peek(b"a") == b"1"
    assert cache.peek(b"zz") is None
    assert (cache.hits, cache.misses, cache.sets) == (1, 1, 1)
    assert len(cache) == 1 and b"a" in cache and b"b" not in cache
    assert "a" not in cache  # str keys are never present
    cache.check_valid()


def test_set_replaces_value_and_version(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"short", version=3)
    cache.set(b"a", b"a much longer value", version=2)
    e = cache.get_entry(b"a")
    assert e is not None and e.value == b"a much longer value" and e.version == 2
    assert len(cache) == 1
    assert cache.bytes_used == 1 + len(b"a much longer value") + OVERHEAD
    cache.check_valid()


def test_nx_and_xx(clock: FakeClock) -> None:
    cache = make(clock)
    assert cache.set(b"a", b"1", xx=True) is False
    assert b"a" not in cache
    assert cache.set(b"a", b"1", nx=True) is True
    assert cache.set(b"a", b"2", nx=True) is False
    assert cache.get(b"a") == b"1"
    assert cache.set(b"a", b"3", xx=True) is True
    assert cache.get(b"a") == b"3"
    with pytest.raises(ValueError):
        cache.set(b"a", b"4", nx=True, xx=True)
    assert cache.get(b"a") == b"3"
    cache.check_valid()


def test_nx_succeeds_and_xx_fails_on_expired_key(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 10)
    clock.advance(10)
    assert cache.set(b"a", b"2", xx=True) is False
    assert cache.set(b"a", b"2", nx=True) is True
    assert cache.get(b"a") == b"2"
    assert cache.ttl_ms(b"a") == -1
    cache.check_valid()


def test_failed_nx_does_not_touch_recency(clock: FakeClock) -> None:
    cache = make(clock, max_items=2)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    assert cache.set(b"a", b"x", nx=True) is False
    cache.set(b"c", b"3")
    assert keys(cache) == [b"b", b"c"]


# ---------------------------------------------------------------- eviction


def test_lru_order_eviction_by_items(clock: FakeClock) -> None:
    cache = make(clock, max_items=3)
    for k in (b"a", b"b", b"c"):
        cache.set(k, b"v")
    assert keys(cache) == [b"a", b"b", b"c"]
    cache.get(b"a")  # a becomes MRU, b is now LRU
    cache.set(b"d", b"v")
    assert keys(cache) == [b"c", b"a", b"d"]
    assert cache.evictions == 1
    cache.touch(b"c")
    cache.set(b"e", b"v")
    assert keys(cache) == [b"d", b"c", b"e"]
    assert cache.evictions == 2
    cache.check_valid()


def test_peek_exists_get_entry_do_not_change_recency(clock: FakeClock) -> None:
    cache = make(clock, max_items=2)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    cache.peek(b"a")
    cache.exists(b"a")
    cache.get_entry(b"a")
    cache.ttl_ms(b"a")
    cache.set(b"c", b"3")
    assert keys(cache) == [b"b", b"c"]
    assert (cache.hits, cache.misses) == (0, 0)


def test_replacing_moves_to_mru(clock: FakeClock) -> None:
    cache = make(clock, max_items=2)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    cache.set(b"a", b"3")
    cache.set(b"c", b"4")
    assert keys(cache) == [b"a", b"c"]


def test_byte_budget_accounting_and_eviction(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    cache.set(b"a", b"x" * 20)  # 31
    cache.set(b"b", b"x" * 20)  # 31
    cache.set(b"c", b"x" * 20)  # 31 -> 93
    assert cache.bytes_used == 93 and cache.evictions == 0
    cache.set(b"d", b"x" * 5)  # 16 -> 109 > 100: evicts a
    assert keys(cache) == [b"b", b"c", b"d"]
    assert cache.bytes_used == 78 and cache.evictions == 1
    cache.set(b"d", b"x" * 60)  # grows d to 71: needs b and c gone
    assert keys(cache) == [b"d"]
    assert cache.bytes_used == 71 and cache.evictions == 3
    cache.set(b"d", b"")  # shrinking frees bytes
    assert cache.bytes_used == 11
    cache.delete(b"d")
    assert cache.bytes_used == 0
    cache.check_valid()


def test_entry_of_exactly_max_bytes_fits_and_evicts_everything(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=50)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    cache.set(b"k", b"v" * (50 - 1 - OVERHEAD))
    assert keys(cache) == [b"k"] and cache.bytes_used == 50
    cache.check_valid()


def test_entry_too_large_leaves_cache_unchanged(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=50)
    cache.set(b"a", b"1", version=1)
    cache.set(b"b", b"2", version=2)
    cache.delete(b"c", version=5)
    before = (cache.snapshot_items(), cache.bytes_used, cache.stats())
    too_big = b"v" * (50 - 1 - OVERHEAD + 1)
    with pytest.raises(EntryTooLargeError) as info:
        cache.set(b"a", too_big)
    assert isinstance(info.value, ValueError)
    with pytest.raises(EntryTooLargeError):
        cache.set(b"c", too_big, nx=True)
    with pytest.raises(EntryTooLargeError):
        cache.apply(b"z", too_big, expires_at=0, version=99)
    assert (cache.snapshot_items(), cache.bytes_used, cache.stats()) == before
    assert cache.tombstone_version(b"c") == 5
    cache.check_valid()


def test_item_cap_and_byte_budget_together(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=1000, max_items=2)
    for k in (b"a", b"b", b"c", b"d"):
        cache.set(k, b"v")
    assert len(cache) == 2 and cache.evictions == 2
    cache.check_valid()


# ------------------------------------------------------------ charging rule

#: Every part of the rule, with small numbers: obj(n) = n + 3 + 8 - 1.
PARTS = EntryCost(entry=10, header=3, align=8, expiry=20, tombstone=30)


@pytest.mark.parametrize("kwargs", [{"entry": -1}, {"entry": 0, "header": -1}, {"entry": 0, "align": 0}, {"entry": 0, "align": 12}])
def test_entry_cost_rejects_bad_fields(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EntryCost(**kwargs)


def test_charge_counts_objects_expiries_and_tombstones(clock: FakeClock) -> None:
    cache = LRUCache(1000, clock=clock, cost=PARTS)
    assert [PARTS.object_bytes(n) for n in (0, 1, 5)] == [10, 11, 15]
    cache.set(b"k", b"v" * 5)  # 10 + 11 + 15
    assert cache.bytes_used == 36 == cache.charge(b"k", b"v" * 5)
    cache.set(b"k", b"v" * 6)
    assert cache.bytes_used == 37
    assert cache.expire(b"k", 100)  # + 20, + the key's object once more (a stale heap item's)
    assert cache.bytes_used == 68 == cache.charge(b"k", b"v" * 6, clock.now + 100) == PARTS.entry_bytes(1, 6, expires=True)
    cache.check_valid()
    assert cache.persist(b"k")
    assert cache.bytes_used == 37
    cache.set(b"k", b"v" * 6, expires_at=clock.now + 5)
    assert cache.bytes_used == 68
    cache.set(b"k", b"v" * 6)
    assert cache.bytes_used == 37
    cache.delete(b"k", version=1)  # the entry goes, its tombstone stays
    assert cache.bytes_used == 41 == PARTS.tombstone_bytes(1)
    cache.set(b"k", b"v" * 5)  # a write clears the tombstone
    assert cache.bytes_used == 36
    cache.delete(b"x", version=2)
    assert cache.bytes_used == 36 + 41
    clock.advance(60_000)
    assert cache.tombstone_version(b"x") == 0  # expired: dropped, and its bytes released
    assert cache.bytes_used == 36
    cache.check_valid()


def test_tombstones_count_against_the_budget(clock: FakeClock) -> None:
    cache = LRUCache(110, clock=clock, cost=PARTS, max_tombstones=10)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")  # 2 x 32
    cache.delete(b"x", version=1)  # + 41 = 105
    assert keys(cache) == [b"a", b"b"]
    cache.delete(b"y", version=2)  # 146: evicts a, then b
    assert keys(cache) == [] and cache.evictions == 2 and cache.tombstone_count == 2
    cache.delete(b"z", version=3)  # 123 and no entry left: the oldest tombstone goes
    assert [cache.tombstone_version(k) for k in (b"x", b"y", b"z")] == [0, 2, 3]
    assert cache.bytes_used == 82
    cache.set(b"c", b"3")  # 114: the entry just written stays, the oldest tombstone goes
    assert keys(cache) == [b"c"] and cache.tombstone_count == 1 and cache.bytes_used == 73
    cache.check_valid()


def test_an_expiry_evicts_other_entries_first(clock: FakeClock) -> None:
    cache = LRUCache(80, clock=clock, cost=PARTS)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    assert cache.expire(b"a", 100)  # a: 32 + 31; b, though more recent, is evicted
    assert keys(cache) == [b"a"] and cache.evictions == 1 and cache.bytes_used == 63
    cache.check_valid()
    small = LRUCache(50, clock=clock, cost=PARTS)
    small.set(b"a", b"1")
    assert small.expire(b"a", 100)  # 63 alone exceeds 50: the entry itself goes
    assert len(small) == 0 and small.evictions == 1 and small.bytes_used == 0
    small.check_valid()


@settings(max_examples=200)
@given(st.integers(0, 100_000))
def test_cpython_cost_covers_a_bytes_objects_allocation(n: int) -> None:
    size = sys.getsizeof(b"x" * n)
    assert (size + 15) & -16 <= CPYTHON_COST.object_bytes(n) <= size + 15  # pymalloc's and glibc's 16-byte steps


@pytest.mark.parametrize(("value_bytes", "ttl"), [(16, False), (100, True), (10_240, False)])
def test_cpython_cost_bounds_what_tracemalloc_sees(value_bytes: int, ttl: bool) -> None:
    """At churn (three turnovers) the charge covers the traced bytes, and is not absurdly more.

    tracemalloc sees requested sizes of everything the cache holds: objects,
    shard dicts, expiry heap, stale items; the charge adds the allocator's
    rounding and bounds the parts that vary (a dict's table, the expiry
    heap's stale items) by their largest, hence up to 1.5 x.
    """
    n = 2_000
    now = time.time_ns() // 1_000_000
    charge = CPYTHON_COST.entry_bytes(16, value_bytes, ttl)
    cache = LRUCache(charge * n, clock=lambda: now)
    version = 1 << 62
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(3 * n):
            cache.set(b"k:%014d" % i, bytes(value_bytes), expires_at=now + 3_600_000 + i if ttl else 0, version=version + i)
        traced = (tracemalloc.get_traced_memory()[0] - base) / len(cache)
    finally:
        tracemalloc.stop()
    assert len(cache) == n
    assert traced <= charge <= 1.5 * traced, (traced, charge)


# -------------------------------------------------------------------- TTL


def test_lazy_expiry_on_get(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 100)
    clock.advance(99)
    assert cache.get(b"a") == b"1"
    assert cache.ttl_ms(b"a") == 1
    clock.advance(1)  # expires_at <= now: expired
    assert len(cache) == 1  # not yet removed
    assert cache.peek(b"a") is None
    assert len(cache) == 1  # peek never mutates
    assert cache.get(b"a") is None
    assert len(cache) == 0 and cache.bytes_used == 0
    assert (cache.hits, cache.misses, cache.expirations) == (1, 1, 1)
    cache.check_valid()


@pytest.mark.parametrize(
    "op",
    [
        lambda c: c.exists(b"a"),
        lambda c: c.get_entry(b"a"),
        lambda c: c.ttl_ms(b"a"),
        lambda c: c.touch(b"a"),
        lambda c: c.expire(b"a", 100),
        lambda c: c.persist(b"a"),
        lambda c: c.delete(b"a"),
    ],
)
def test_every_lookup_removes_expired(clock: FakeClock, op: object) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 5)
    clock.advance(5)
    assert op(cache) in (False, None, -2)  # type: ignore[operator]
    assert len(cache) == 0 and cache.expirations == 1 and cache.deletes == 0
    cache.check_valid()


def test_items_skip_expired(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 5, version=7)
    cache.set(b"b", b"2")
    assert cache.snapshot_items() == [(b"a", b"1", clock.now + 5, 7), (b"b", b"2", 0, 0)]
    clock.advance(5)
    assert cache.snapshot_items() == [(b"b", b"2", 0, 0)]
    assert len(cache) == 2  # items() never removes


def test_no_clock_call_without_ttl(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1")
    cache.get(b"a")
    cache.get(b"missing")
    cache.set(b"a", b"2")
    cache.exists(b"a")
    cache.peek(b"a")
    assert clock.reads == 0


def test_set_with_past_expiry_removes_key(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1")
    assert cache.set(b"a", b"2", expires_at=clock.now) is True
    assert len(cache) == 0 and cache.get(b"a") is None
    cache.check_valid()


def test_ttl_expire_persist(clock: FakeClock) -> None:
    cache = make(clock)
    assert cache.ttl_ms(b"a") == -2
    assert cache.expire(b"a", 100) is False
    assert cache.persist(b"a") is False
    cache.set(b"a", b"1")
    assert cache.ttl_ms(b"a") == -1
    assert cache.persist(b"a") is False  # nothing to remove
    assert cache.expire(b"a", 100) is True
    assert cache.ttl_ms(b"a") == 100
    clock.advance(40)
    assert cache.ttl_ms(b"a") == 60
    assert cache.persist(b"a") is True
    assert cache.ttl_ms(b"a") == -1
    clock.advance(1000)
    assert cache.get(b"a") == b"1"
    cache.check_valid()


@pytest.mark.parametrize("ttl", [0, -1])
def test_expire_non_positive_deletes(clock: FakeClock, ttl: int) -> None:
    cache = make(clock)
    cache.set(b"a", b"1")
    assert cache.expire(b"a", ttl) is True
    assert b"a" not in cache and cache.deletes == 1
    cache.check_valid()


def test_set_without_ttl_clears_expiry(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 10)
    cache.set(b"a", b"2")
    clock.advance(100)
    assert cache.get(b"a") == b"2"
    assert cache.expire_some(10) == 0
    cache.check_valid()


# ------------------------------------------------------------ active expiry


def test_expire_some_is_bounded_and_ordered(clock: FakeClock) -> None:
    cache = make(clock)
    for i in range(10):
        cache.set(b"k%d" % i, b"v", expires_at=clock.now + 10 + i)
    cache.set(b"forever", b"v")
    cache.set(b"later", b"v", expires_at=clock.now + 1000)
    assert cache.expire_some(5) == 0  # nothing due yet
    clock.advance(100)
    assert cache.expire_some(3) == 3
    assert keys(cache)[:3] == [b"k3", b"k4", b"k5"]  # soonest expiry removed first
    assert cache.expire_some(3) == 3
    assert cache.expire_some(100) == 4
    assert cache.expire_some(100) == 0
    assert keys(cache) == [b"forever", b"later"]
    assert cache.expirations == 10
    assert cache.expire_some(0) == 0
    cache.check_valid()


def test_expire_some_skips_stale_heap_items(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 5)
    cache.expire(b"a", 50)  # the first heap item goes stale
    cache.set(b"b", b"1", expires_at=clock.now + 5)
    cache.delete(b"b")  # stale as well
    cache.set(b"c", b"1", expires_at=clock.now + 5)
    cache.persist(b"c")  # stale as well
    clock.advance(10)
    assert cache.expire_some(10) == 0
    assert cache.get(b"a") == b"1" and cache.get(b"c") == b"1"
    clock.advance(100)
    assert cache.expire_some(10) == 1
    assert keys(cache) == [b"c"]
    cache.check_valid()


def test_expire_some_work_is_bounded_by_stale_items_too(clock: FakeClock) -> None:
    cache = make(clock)
    for i in range(50):
        cache.set(b"k%d" % i, b"v", expires_at=clock.now + 1)
        cache.delete(b"k%d" % i)  # leaves a stale heap item due first
    cache.set(b"due", b"v", expires_at=clock.now + 2)
    clock.advance(10)
    calls = [cache.expire_some(5) for _ in range(11)]
    assert calls == [0] * 10 + [1]  # 5 stale items skipped per call, then the due entry
    assert len(cache) == 0
    cache.check_valid()


def test_heap_compaction_drops_duplicate_items(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=10**9)
    exp = clock.now + 1000
    for _ in range(3000):  # each round leaves an item identical to the next entry's own
        cache.set(b"k", b"v", expires_at=exp)
        cache.delete(b"k")
    cache.set(b"k", b"v", expires_at=exp)
    cache.check_valid()  # the heap is bounded although its items are all current
    clock.advance(1000)
    assert cache.expire_some(10) == 1 and len(cache) == 0
    cache.check_valid()


def test_expiry_heap_stays_bounded(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=10**9)
    cache.set(b"a", b"1", expires_at=clock.now + 10**6)
    for i in range(5000):  # every expire() leaves one stale heap item
        cache.expire(b"a", 1000 + i)
    cache.check_valid()  # asserts len(heap) <= 2 * expiring + 1024
    for i in range(3000):
        cache.set(b"k%d" % i, b"v", expires_at=clock.now + 1 + i % 7)
        cache.delete(b"k%d" % i)
    cache.check_valid()


def test_heap_compaction_is_gradual_and_expiry_reads_both_heaps(clock: FakeClock) -> None:
    """Over its bound the heap is drained a few items per write, never in one go; expiry stays exact meanwhile."""
    from dcache.lru.cache import _DRAIN_PER_PUSH, _HEAP_SLACK

    n = 3000
    cache = make(clock, max_bytes=10**9)
    expiry = {}
    for i in range(n):
        expiry[b"k%d" % i] = clock.now + 10_000 + i
        cache.set(b"k%d" % i, b"v", expires_at=expiry[b"k%d" % i])
    writes = 0
    while not cache._old_heap:  # every overwrite with a new expiry leaves one stale item
        key = b"k%d" % (writes % n)
        expiry[key] = clock.now + 20_000 + writes
        cache.set(key, b"v", expires_at=expiry[key])
        writes += 1
        assert writes < 10 * n
    assert len(cache._old_heap) + len(cache._heap) <= 2 * n + _HEAP_SLACK + 1
    # a few keys now expire soon: their items are in the new heap, older due items in neither
    for i in range(0, 40, 2):
        key = b"k%d" % i
        expiry[key] = clock.now + 5 + i
        before = len(cache._old_heap)
        cache.set(key, b"v", expires_at=expiry[key])
        assert before - len(cache._old_heap) == min(_DRAIN_PER_PUSH, before)  # bounded work per write
    cache.check_valid()
    clock.advance(30)  # k0, k2 .. k24 are due (expiries now + 5 .. now + 29)
    removed = cache.expire_some(1000)
    due = {k for k, exp in expiry.items() if exp <= clock.now}
    assert removed == len(due) == 13 and not any(k in due for k in keys(cache))
    assert cache._old_heap, "the compaction is still draining"
    cache.check_valid()
    # writes finish the drain; the old heap never comes back while the new one is within its bound
    for i in range(100, 100 + len(cache._old_heap) // _DRAIN_PER_PUSH + 1):
        cache.set(b"k%d" % i, b"v", expires_at=expiry[b"k%d" % i])  # same expiry: no new stale item
    assert not cache._old_heap
    assert len(cache._heap) == len(cache) == n - 13
    cache.check_valid()


def test_the_sweep_drains_a_compaction_without_writes(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=10**9)
    cache.set(b"a", b"1", expires_at=clock.now + 10**6)
    ttl = 1000
    while not cache._old_heap:  # every expire() leaves one stale item, until a compaction starts
        ttl += 1
        cache.expire(b"a", ttl)
    assert cache.drain_expiry_heap(100) == 100
    assert cache.drain_expiry_heap(10**6) > 0 and not cache._old_heap
    assert cache.drain_expiry_heap(10) == 0  # nothing to do
    assert len(cache._heap) == 1
    clock.advance(ttl)
    assert cache.expire_some(10) == 1 and len(cache) == 0
    cache.check_valid()


# --------------------------------------------------------------------- incr


def test_incr_basic(clock: FakeClock) -> None:
    cache = make(clock)
    assert cache.incr(b"n", 5) == 5
    assert cache.get(b"n") == b"5"
    assert cache.incr(b"n", -12) == -7
    assert cache.get(b"n") == b"-7"
    cache.set(b"m", b"-12")
    assert cache.incr(b"m", 0) == -12
    assert cache.incr(b"m", 12) == 0
    assert cache.get(b"m") == b"0"
    assert cache.bytes_used == (1 + len(b"-7") + OVERHEAD) + (1 + len(b"0") + OVERHEAD)
    cache.check_valid()


def test_incr_keeps_expiry_and_sets_version(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"n", b"1", expires_at=clock.now + 100, version=1)
    clock.advance(30)
    assert cache.incr(b"n", 1, version=9) == 2
    assert cache.ttl_ms(b"n") == 70
    e = cache.get_entry(b"n")
    assert e is not None and e.version == 9
    clock.advance(70)
    assert cache.incr(b"n", 1) == 1  # expired: starts again from 0, no expiry
    assert cache.ttl_ms(b"n") == -1
    cache.check_valid()


@pytest.mark.parametrize(
    "value",
    [b"", b"abc", b"1.5", b" 1", b"1 ", b"+1", b"007", b"-0", b"-", b"--1", b"1_000", b"\xd9\xa1", b"0x10"]
    + [b"9223372036854775808", b"-9223372036854775809", b"99999999999999999999"],
)
def test_incr_rejects_non_integers(clock: FakeClock, value: bytes) -> None:
    cache = make(clock)
    cache.set(b"n", value, version=1)
    with pytest.raises(NotAnInt64Error) as info:
        cache.incr(b"n", 1, version=2)
    assert isinstance(info.value, ValueError)
    e = cache.get_entry(b"n")
    assert e is not None and e.value == value and e.version == 1


@pytest.mark.parametrize(
    ("start", "delta"),
    [(INT64_MAX, 1), (INT64_MIN, -1), (0, INT64_MAX + 1), (-1, INT64_MIN), (INT64_MAX, INT64_MAX)],
)
def test_incr_overflow(clock: FakeClock, start: int, delta: int) -> None:
    cache = make(clock)
    cache.set(b"n", b"%d" % start)
    with pytest.raises(IntegerOverflowError):
        cache.incr(b"n", delta)
    assert cache.get(b"n") == b"%d" % start


def test_incr_at_the_limits(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"n", b"%d" % (INT64_MAX - 1))
    assert cache.incr(b"n", 1) == INT64_MAX
    assert cache.get(b"n") == b"9223372036854775807"
    cache.set(b"m", b"-9223372036854775807")
    assert cache.incr(b"m", -1) == INT64_MIN
    assert cache.incr(b"m", INT64_MAX) == -1


def test_incr_too_large_for_budget(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=1 + 1 + OVERHEAD)
    assert cache.incr(b"n", 9) == 9
    with pytest.raises(EntryTooLargeError):
        cache.incr(b"n", 1)
    assert cache.get(b"n") == b"9"


# -------------------------------------------------- versions and tombstones


def test_apply_last_writer_wins(clock: FakeClock) -> None:
    cache = make(clock)
    assert cache.apply(b"a", b"v5", expires_at=0, version=5) is True
    assert cache.apply(b"a", b"v3", expires_at=0, version=3) is False
    assert cache.apply(b"a", b"v5b", expires_at=0, version=5) is False  # equal is not newer
    assert cache.get(b"a") == b"v5"
    assert cache.apply(b"a", b"v7", expires_at=clock.now + 50, version=7) is True
    assert cache.get(b"a") == b"v7" and cache.ttl_ms(b"a") == 50
    assert cache.sets == 2
    cache.check_valid()


def test_apply_rejects_already_expired(clock: FakeClock) -> None:
    cache = make(clock)
    assert cache.apply(b"a", b"v", expires_at=clock.now, version=5) is False
    assert cache.apply(b"a", b"v", expires_at=clock.now - 1, version=5) is False
    assert len(cache) == 0


def test_apply_replaces_expired_entry_regardless_of_its_version(clock: FakeClock) -> None:
    cache = make(clock)
    cache.apply(b"a", b"v9", expires_at=clock.now + 5, version=9)
    clock.advance(5)
    assert cache.apply(b"a", b"v2", expires_at=0, version=2) is True
    assert cache.get(b"a") == b"v2"


def test_late_older_copy_never_resurrects_deleted_key(clock: FakeClock) -> None:
    cache = make(clock, tombstone_ttl_ms=1000)
    cache.apply(b"a", b"v1", expires_at=0, version=1)
    assert cache.delete(b"a", version=5) is True
    assert cache.tombstone_version(b"a") == 5
    # a replica or migration delivers the old copies late, in any order
    assert cache.apply(b"a", b"v1", expires_at=0, version=1) is False
    assert cache.apply(b"a", b"v4", expires_at=0, version=4) is False
    assert cache.apply(b"a", b"v5", expires_at=0, version=5) is False
    assert b"a" not in cache
    assert cache.apply(b"a", b"v6", expires_at=0, version=6) is True
    assert cache.get(b"a") == b"v6"
    assert cache.tombstone_version(b"a") == 0  # a newer write supersedes it
    cache.check_valid()


_KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
_IMPORT = st.tuples(_KEYS, st.binary(max_size=40), st.sampled_from([0, 0, 999_990, 1_000_000, 1_000_050]), st.integers(1, 9))


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(st.tuples(st.sampled_from(["set", "apply", "del", "expiring"]), _IMPORT), max_size=8),
    items=st.lists(_IMPORT, max_size=12),
    max_bytes=st.sampled_from([120, 400, 10_000]),
)
def test_apply_many_is_apply_of_each_entry_in_order(before: list[tuple[str, Any]], items: list[Any], max_bytes: int) -> None:
    """Same entries, tombstones, counters and answer as ``apply`` called entry by entry (evictions included)."""
    caches = []
    for _ in range(2):
        clock = FakeClock()
        cache = LRUCache(max_bytes, clock=clock, cost=FLAT, tombstone_ttl_ms=1000)
        for kind, (key, value, expires_at, version) in before:
            if kind == "set":
                cache.set(key, value[:10], version=version)
            elif kind == "apply":
                cache.apply(key, value[:10], expires_at=expires_at, version=version)
            elif kind == "del":
                cache.delete(key, version=version)
            else:
                cache.set(key, value[:10], expires_at=clock.now + 5, version=version)
        clock.advance(10)  # the "expiring" entries are now expired but still held
        caches.append(cache)
    one_by_one, bulk = caches
    expected = sum(one_by_one.apply(k, v, expires_at=x, version=ver) for k, v, x, ver in items)
    assert bulk.apply_many(items) == expected
    bulk.check_valid()
    assert list(bulk.items(include_expired=True)) == list(one_by_one.items(include_expired=True))
    assert [bulk.tombstone_version(k) for k in (b"a", b"b", b"c", b"d", b"e")] == [
        one_by_one.tombstone_version(k) for k in (b"a", b"b", b"c", b"d", b"e")
    ]
    assert bulk.stats() == one_by_one.stats()


def test_apply_many_checks_every_charge_before_storing_any(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    with pytest.raises(EntryTooLargeError, match="exceeds the cache budget"):
        cache.apply_many([(b"a", b"1", 0, 5), (b"b", b"x" * 200, 0, 6)])
    assert len(cache) == 0 and cache.sets == 0
    assert cache.apply_many([]) == 0


def test_apply_delete_last_writer_wins(clock: FakeClock) -> None:
    cache = make(clock)
    cache.apply(b"a", b"v5", expires_at=0, version=5)
    assert cache.apply_delete(b"a", version=3) is False  # older delete: entry stays
    assert cache.get(b"a") == b"v5"
    assert cache.tombstone_version(b"a") == 3
    assert cache.apply_delete(b"a", version=6) is True
    assert b"a" not in cache and cache.deletes == 1
    assert cache.tombstone_version(b"a") == 6
    assert cache.apply_delete(b"a", version=4) is False
    assert cache.tombstone_version(b"a") == 6  # never lowered
    assert cache.apply(b"a", b"v5", expires_at=0, version=5) is False
    cache.check_valid()


def test_apply_delete_is_idempotent_and_order_insensitive(clock: FakeClock) -> None:
    ops = [("set", 1), ("del", 2), ("set", 3), ("del", 4)]

    results = set()
    for order in itertools.permutations(ops):
        cache = make(clock)
        for kind, v in order + order:
            if kind == "set":
                cache.apply(b"k", b"v%d" % v, expires_at=0, version=v)
            else:
                cache.apply_delete(b"k", version=v)
        results.add((cache.peek(b"k"), cache.tombstone_version(b"k")))
    assert results == {(None, 4)}


def test_set_clears_tombstone(clock: FakeClock) -> None:
    cache = make(clock)
    cache.delete(b"a", version=10)
    cache.set(b"a", b"local", version=2)
    assert cache.tombstone_version(b"a") == 0
    assert cache.get(b"a") == b"local"
    cache.check_valid()


def test_delete_without_version_leaves_no_tombstone(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", version=3)
    assert cache.delete(b"a") is True
    assert cache.delete(b"a") is False
    assert cache.tombstone_version(b"a") == 0
    assert cache.apply(b"a", b"old", expires_at=0, version=1) is True


def test_an_applied_overwrite_keeps_the_charge_exact_and_clears_the_tombstone(clock: FakeClock) -> None:
    """``apply`` over a live entry of the same expiry (its inline path): charge, recency, tombstone and eviction as ``_put``."""
    cache = make(clock, max_bytes=1_000)
    exp = clock.now + 1_000
    cache.apply(b"a", b"1", expires_at=exp, version=5)
    cache.apply(b"b", b"1", expires_at=0, version=5)
    cache.apply_delete(b"a", version=3)  # older than the entry: the entry stays, the tombstone is recorded
    assert cache.tombstone_version(b"a") == 3
    assert cache.apply(b"a", b"longer value", expires_at=exp, version=6) is True
    assert cache.tombstone_version(b"a") == 0 and cache.tombstone_count == 0
    assert cache.apply(b"a", b"stale", expires_at=exp, version=6) is False  # equal is not newer
    assert cache.get_entry(b"a").value == b"longer value"  # type: ignore[union-attr]
    cache.check_valid()  # bytes_used is the sum of the charges
    assert cache.apply(b"b", b"x" * 300, expires_at=0, version=6) is True
    assert keys(cache) == [b"a", b"b"]  # LRU first: b is now the most recently used
    assert cache.apply(b"b", b"x" * 980, expires_at=0, version=7) is True  # over the budget: a is evicted, not b
    assert cache.get_entry(b"a") is None and cache.evictions == 1
    cache.check_valid()


def test_tombstones_expire_and_are_bounded(clock: FakeClock) -> None:
    cache = make(clock, tombstone_ttl_ms=100, max_tombstones=3)
    for i in range(1, 6):
        cache.delete(b"k%d" % i, version=i)
    assert cache.tombstone_count == 3
    assert [cache.tombstone_version(b"k%d" % i) for i in range(1, 6)] == [0, 0, 3, 4, 5]
    clock.advance(99)
    assert cache.tombstone_version(b"k5") == 5
    clock.advance(1)
    assert cache.tombstone_version(b"k5") == 0
    assert cache.apply(b"k5", b"old", expires_at=0, version=1) is True
    assert cache.tombstone_count == 2  # k3, k4 expired but not yet purged
    assert cache.expire_some(1) == 0
    assert cache.tombstone_count == 1
    cache.expire_some()
    assert cache.tombstone_count == 0
    cache.check_valid()


def test_newer_tombstone_moves_to_the_back_of_the_drop_order(clock: FakeClock) -> None:
    cache = make(clock, max_tombstones=2)
    cache.delete(b"a", version=1)
    cache.delete(b"b", version=2)
    cache.apply_delete(b"a", version=3)  # re-recorded: now the newest
    cache.delete(b"c", version=4)  # drops the oldest, which is now b
    assert [cache.tombstone_version(k) for k in (b"a", b"b", b"c")] == [3, 0, 4]


def test_max_tombstones_zero_disables_them(clock: FakeClock) -> None:
    cache = make(clock, max_tombstones=0)
    cache.delete(b"a", version=5)
    assert cache.tombstone_version(b"a") == 0
    assert cache.apply(b"a", b"v", expires_at=0, version=1) is True


# ------------------------------------------------------------------- misc


def test_touch(clock: FakeClock) -> None:
    cache = make(clock, max_items=2)
    assert cache.touch(b"a") is False
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    assert cache.touch(b"a") is True
    cache.set(b"c", b"3")
    assert keys(cache) == [b"a", b"c"]


def test_clear_keeps_counters(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1", expires_at=clock.now + 10)
    cache.set(b"b", b"2")
    cache.get(b"a")
    cache.delete(b"c", version=3)
    cache.clear()
    assert len(cache) == 0 and cache.bytes_used == 0 and cache.tombstone_count == 0
    assert cache.hits == 1 and cache.sets == 2
    cache.check_valid()
    cache.set(b"a", b"1")
    assert keys(cache) == [b"a"]
    cache.check_valid()


def test_stats(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100, max_items=5)
    cache.set(b"a", b"1")
    cache.get(b"a")
    cache.get(b"b")
    cache.delete(b"a")
    assert cache.stats() == {
        "items": 0,
        "bytes_used": 0,
        "max_bytes": 100,
        "max_items": 5,
        "tombstones": 0,
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "expirations": 0,
        "sets": 1,
        "deletes": 1,
    }


def test_check_valid_detects_corruption(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    e = cache.get_entry(b"a")
    assert e is not None
    e.value = b"longer"  # bypasses the byte accounting
    with pytest.raises(AssertionError, match="bytes_used"):
        cache.check_valid()
    e.value = b"1"
    cache.check_valid()
    e.next = e  # breaks the forward/backward links
    with pytest.raises(AssertionError):
        cache.check_valid()


# ------------------------------------------------------------ key_shards


def test_key_shards_hold_every_key_once(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=10**7)
    written = {b"k%d" % i for i in range(5000)}
    for k in written:
        cache.set(k, b"v")
    lists = list(cache.key_shards())
    flat = [k for keys in lists for k in keys]
    assert len(flat) == len(written) == len(cache)
    assert set(flat) == written == set(cache.keys_snapshot())
    assert 1 < len(lists) <= SHARDS  # spread over shards, empty ones skipped
    assert max(map(len, lists)) < len(written) // 4


def test_key_shards_of_an_empty_cache(clock: FakeClock) -> None:
    assert list(make(clock).key_shards()) == []


@settings(max_examples=60, deadline=None)
@given(
    initial=st.integers(0, 600),
    steps=st.lists(st.tuples(st.sampled_from(["set", "delete", "get"]), st.integers(0, 900)), max_size=200),
)
def test_key_shards_interleaved_with_writes(initial: int, steps: list[tuple[str, int]]) -> None:
    """Writes between the lists: a key present throughout is in exactly one list; none is in two."""
    cache = LRUCache(10**7, clock=FakeClock(), cost=FLAT)
    for i in range(initial):
        cache.set(b"k%d" % i, b"v")
    touched: set[bytes] = set()
    seen: list[bytes] = []
    it = iter(steps)
    for keys in cache.key_shards():
        seen += keys
        for op, i in itertools.islice(it, 5):
            key = b"k%d" % i
            if op == "set":
                touched.add(key)
                cache.set(key, b"w")
            elif op == "delete":
                touched.add(key)
                cache.delete(key)
            else:
                cache.get(key)  # reorders the LRU list, never a shard
        cache.check_valid()
    assert len(seen) == len(set(seen))
    throughout = {b"k%d" % i for i in range(initial)} - touched
    assert throughout <= set(seen)


# ------------------------------------------------------------------ on_drop


def test_on_drop_sees_evictions_and_expiries_only(clock: FakeClock) -> None:
    """A tracker of keys (the near cache's invalidation) learns of every entry the cache drops by itself."""
    cache = make(clock, max_items=2)
    dropped: list[bytes] = []
    cache.on_drop = dropped.append
    cache.set(b"a", b"1")
    cache.set(b"b", b"2")
    cache.set(b"c", b"3")  # evicts a
    assert dropped == [b"a"]
    cache.delete(b"b")  # the caller's change: not reported
    cache.set(b"c", b"4")  # nor an overwrite
    assert dropped == [b"a"]
    for i, name in enumerate([b"x", b"y", b"z"]):
        cache.set(name, b"v", expires_at=clock.now + 10 + i)
    assert dropped == [b"a", b"c", b"x"]  # item cap 2: c evicted, then x
    clock.advance(11)
    assert cache.get(b"y") is None  # lazily expired on read
    clock.advance(100)
    assert cache.expire_some() == 1  # z, actively
    assert dropped == [b"a", b"c", b"x", b"y", b"z"]
    assert cache.expirations == 2 and cache.evictions == 3
    cache.check_valid()


def test_entry_shards_list_each_entry_once_and_is_live_drops_what_changed_since(clock: FakeClock) -> None:
    """A snapshot lists the entries, then packs them a slice at a time: what was removed, replaced or expired meanwhile must not be packed."""
    cache = make(clock, max_bytes=1_000_000)
    for i in range(300):
        cache.set(b"k%d" % i, b"v%d" % i, expires_at=clock.now + 50 if i % 10 == 0 else 0)
    listed = [e for entries in cache.entry_shards() for e in entries]
    assert sorted(e.key for e in listed) == sorted(b"k%d" % i for i in range(300))
    cache.delete(b"k1")
    cache.delete(b"k2")
    cache.set(b"k2", b"again")  # a new entry for the key: the listed one is not it
    cache.set(b"k3", b"new value")  # the same entry, its value replaced: still live, with the new value
    clock.advance(100)  # every tenth key expired
    live = {e.key: e.value for e in listed if cache.is_live(e)}
    expected = {b"k%d" % i: b"v%d" % i for i in range(300) if i % 10 and i not in (1, 2)} | {b"k3": b"new value"}
    assert live == expected
    assert len(cache) == 300 - 30 - 1  # the expired ones found by is_live were removed, as get_entry removes them
    cache.check_valid()
