"""HotKeys (the read sketch) and NearCache (a master's copies of hot keys), as pure structures.

The sketch hashes with the builtin ``hash()``, salted per process
(PYTHONHASHSEED): its tests assert over many keys, with bounds that hold
for any salt, never on one key's collisions.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from dcache.hlc import wall_ms
from dcache.master.nearcache import ENTRY_OVERHEAD, HotKeys, NearCache
from dcache.protocol.limits import NEAR_LEASE_S

# -- HotKeys -----------------------------------------------------------------------------


def test_a_key_read_one_in_ten_is_hot_and_uniform_keys_are_not() -> None:
    hot = HotKeys()
    n_keys, reads = 100_000, 300_000  # several decay windows (65,536 reads each)
    for i in range(reads):
        if i % 10 == 0:
            hot.note(b"the-hot-key")
        else:
            hot.note(b"u:%d" % ((i * 7919) % n_keys))
    assert hot.estimate(b"the-hot-key") >= hot.hot_count * 10
    false_hot = sum(1 for i in range(n_keys) if hot.estimate(b"u:%d" % i) >= hot.hot_count)
    assert false_hot / n_keys < 0.001, false_hot  # about 0 for any hash salt: a key must collide in both rows
    [(first, rate)] = hot.hottest(1)
    assert first == b"the-hot-key" and rate > 0
    assert all(hot.estimate(k) >= hot.hot_count // 2 for k in hot.top)  # the top list holds only (once-)hot keys


def test_decay_halves_the_counts_once_per_window() -> None:
    hot = HotKeys(window=1000, sample=1)
    for i in range(999):
        hot.note(b"k" if i % 2 else b"o")
    before = hot.estimate(b"k")
    assert before >= 499
    after = hot.note(b"k")  # the 1,000th read: counted, then every counter halves
    assert after == before + 1
    assert hot.estimate(b"k") == (before + 1) >> 1
    assert hot.reads == 1000


class EagerSketch:
    """The sketch as its class note defines it: two rows indexed by ``hash(key)``, every counter halved at each window's end."""

    def __init__(self, width: int, window: int) -> None:
        self.a = [0] * width
        self.b = [0] * width
        self.mask = width - 1
        self.window = window
        self.n = 0

    def rows(self, key: bytes) -> tuple[int, int]:
        h = hash(key)
        return h & self.mask, (h >> 24) & self.mask

    def note(self, key: bytes) -> int:
        i, j = self.rows(key)
        self.a[i] += 1
        self.b[j] += 1
        count = min(self.a[i], self.b[j])
        self.n += 1
        if self.n == self.window:
            self.n = 0
            self.a = [c >> 1 for c in self.a]
            self.b = [c >> 1 for c in self.b]
        return count

    def estimate(self, key: bytes) -> int:
        i, j = self.rows(key)
        return min(self.a[i], self.b[j])


def test_the_lazy_decay_gives_exactly_what_halving_every_counter_at_each_window_end_gives() -> None:
    # A narrow sketch, so counters collide and are shared; phases where a few keys are read, so
    # most counters miss many windows before they are touched again.
    width, window = 64, 37
    hot, model = HotKeys(width=width, window=window, sample=1), EagerSketch(width, window)
    rng = random.Random(7)
    pool = [b"k%d" % i for i in range(300)]
    for phase in range(40):
        keys = pool if phase % 3 == 0 else rng.sample(pool, rng.choice((1, 2, 5)))
        for _ in range(rng.randrange(1, 12 * window)):
            key = rng.choice(keys)
            assert hot.note(key) == model.note(key)
        assert [hot.estimate(k) for k in pool] == [model.estimate(k) for k in pool]
    assert hot.reads >= 100 * window  # many windows ended: the decay was exercised


def test_a_key_no_longer_read_leaves_the_top_list() -> None:
    hot = HotKeys(window=1000, hot_count=32, sample=1)
    for _ in range(200):
        hot.note(b"was-hot")
    assert b"was-hot" in hot.top
    for w in range(6):  # 200 -> 100 -> 50 -> 25 -> 12 (under hot_count // 2: dropped)
        for i in range(1000):
            hot.note(b"cold:%d:%d" % (w, i))
    assert b"was-hot" not in hot.top
    assert hot.estimate(b"was-hot") < hot.hot_count // 2 + 8  # what is left, plus collisions


def test_the_top_list_is_bounded_and_hottest_is_ordered() -> None:
    hot = HotKeys(top_size=8, sample=1)
    for i in range(20):
        for _ in range(64 + 16 * i):  # k19 is the hottest
            hot.note(b"k%d" % i)
    assert len(hot.top) == 8
    ranked = hot.hottest(5)
    assert [k for k, _ in ranked] == [b"k%d" % i for i in range(19, 14, -1)]
    rates = [r for _, r in ranked]
    assert rates == sorted(rates, reverse=True) and rates[-1] > 0
    assert len(hot.hottest(100)) == 8
    assert hot.hottest(0) == []


def test_the_rate_estimate_is_the_decayed_count_over_the_time_it_covers() -> None:
    created_before = time.monotonic()
    hot = HotKeys(window=1000, sample=1)
    created_after = time.monotonic()
    for i in range(999):
        hot.note(b"k" if i % 2 == 0 else b"o")  # 500 reads of k
    time.sleep(0.05)
    hot.note(b"k")  # the window ends: k counts (501) >> 1 = 250
    time.sleep(0.05)
    for _ in range(100):
        hot.note(b"k")
    count = hot.estimate(b"k")
    assert count == 350
    t0 = time.monotonic()
    [(key, rate)] = hot.hottest(1)
    t1 = time.monotonic()
    # The count covers this window and the last one: from the sketch's start to now.
    assert key == b"k"
    assert count / (t1 - created_before) <= rate <= count / (t0 - created_after)


# -- NearCache ---------------------------------------------------------------------------


class Conn:
    """The two fields of a tracking connection the near cache reads: when its lease started (``loop.time()``) and whether it closed."""

    def __init__(self, lease_from: float = 0.0) -> None:
        self.lease_from = lease_from
        self.closed = False


def size(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


def fill(near: NearCache, key: bytes, value: bytes, conn: Any, *, version: int = 1, expires_at: int = 0) -> bool:
    """One whole fill; whether the copy is held afterwards."""
    f = near.start_fill(key)
    assert f is not None
    near.end_fill(key, f, [value, expires_at, version], conn)
    return key in near.entries


def test_a_filled_copy_is_answered_and_counted() -> None:
    near, conn = NearCache(1 << 20), Conn()
    assert near.lookup(b"k", 0.0) is None
    assert fill(near, b"k", b"v", conn)
    assert near.lookup(b"k", 0.1) == b"v"
    assert (near.hits, near.misses, near.fills) == (1, 1, 1)
    st = near.stats()
    assert st["near_cache_keys"] == 1 and st["near_cache_bytes"] == size(b"k", b"v") and st["near_cache_max_bytes"] == 1 << 20


def test_the_byte_bound_evicts_the_oldest_copy_first() -> None:
    one = size(b"k0", b"x" * 100)
    near, conn = NearCache(3 * one), Conn()
    for i in range(3):
        assert fill(near, b"k%d" % i, b"x" * 100, conn)
    assert near.lookup(b"k0", 0.0) == b"x" * 100  # a hit does not make it younger: FIFO, not LRU
    assert fill(near, b"k3", b"x" * 100, conn)
    assert list(near.entries) == [b"k1", b"k2", b"k3"] and near.evictions == 1
    assert near.bytes == 3 * one <= near.max_bytes
    assert fill(near, b"big", b"x" * 300, conn)  # takes the room of two copies
    assert list(near.entries) == [b"k3", b"big"] and near.evictions == 3
    assert near.bytes == one + size(b"big", b"x" * 300) <= near.max_bytes
    assert not fill(near, b"huge", b"x" * (4 * one), conn)  # larger than the whole budget: not held, nothing evicted
    assert list(near.entries) == [b"k3", b"big"]


def test_a_copy_is_not_served_past_its_expiry() -> None:
    near, conn = NearCache(1 << 20), Conn()
    assert not fill(near, b"gone", b"v", conn, expires_at=wall_ms() - 1)  # expired on arrival
    assert near.fills_discarded == 1
    assert fill(near, b"k", b"v", conn, expires_at=wall_ms() + 40)
    assert near.lookup(b"k", 0.0) == b"v"
    deadline = time.monotonic() + 5.0
    while near.lookup(b"k", 0.0) is not None:
        assert time.monotonic() < deadline, "a copy was served long past its expiry"
        time.sleep(0.01)
    assert b"k" not in near.entries and near.bytes == 0


def test_a_copy_lives_only_while_its_owner_answers_within_the_lease() -> None:
    near, conn = NearCache(1 << 20), Conn(lease_from=100.0)
    assert fill(near, b"k", b"v", conn)
    assert near.lookup(b"k", 100.0 + NEAR_LEASE_S / 2) == b"v"
    assert near.lookup(b"k", 100.0 + NEAR_LEASE_S + 0.01) is None  # silent past the lease: dropped
    assert near.lease_lapses == 1 and b"k" not in near.entries
    conn.lease_from = 200.0  # answering again does not bring a dropped copy back
    assert near.lookup(b"k", 200.0) is None

    assert fill(near, b"k", b"v", conn)
    conn.closed = True  # the tracking connection is gone: no more invalidations can arrive on it
    assert near.lookup(b"k", 200.0) is None
    assert near.lease_lapses == 2


def test_an_invalidation_drops_copies_no_newer_than_its_version() -> None:
    near, conn = NearCache(1 << 20), Conn()
    fill(near, b"old", b"v", conn, version=10)
    fill(near, b"same", b"v", conn, version=20)
    fill(near, b"new", b"v", conn, version=30)
    for key in (b"old", b"same", b"new"):
        near.invalidate(key, 20)
    assert list(near.entries) == [b"new"]  # a copy newer than the change (filled after it) stays
    assert near.invalidations == 2
    near.invalidate(b"absent", 99)
    assert near.invalidations == 2
    near.discard(b"new")  # this master's own write: whatever the version
    assert not near.entries and near.bytes == 0 and near.invalidations == 3


def test_a_fill_overtaken_by_an_invalidation_is_discarded() -> None:
    near, conn = NearCache(1 << 20), Conn()
    f = near.start_fill(b"k")
    assert f is not None
    assert near.start_fill(b"k") is None  # one fill of a key at a time
    near.invalidate(b"k", 7)  # the key changed to version 7 while the fill's answer travelled
    near.end_fill(b"k", f, [b"stale", 0, 7], conn)
    assert b"k" not in near.entries and near.fills_discarded == 1

    assert near.start_fill(b"k", 0.5) is None  # a fill that lost to a write: the key cools down
    f = near.start_fill(b"k", NearCache.COOL_S)  # then another fill may start
    assert f is not None
    near.invalidate(b"k", 7)  # an older change than the value read: the copy is good
    near.end_fill(b"k", f, [b"fresh", 0, 8], conn)
    assert near.lookup(b"k", 0.0) == b"fresh"

    f = near.start_fill(b"m")
    assert f is not None
    near.end_fill(b"m", f, None, conn)  # a miss or an error: nothing held, the key may be filled again
    assert b"m" not in near.entries and near.start_fill(b"m") is not None


def test_a_key_written_about_as_often_as_read_cools_down() -> None:
    """A copy invalidated before it answered MIN_HITS reads cost more than it saved: its key is not filled for COOL_S."""
    near, conn = NearCache(1 << 20), Conn(lease_from=10.0)
    for name, reads in ((b"busy", NearCache.MIN_HITS - 1), (b"paid", NearCache.MIN_HITS)):
        f = near.start_fill(name, 10.0)
        assert f is not None
        near.end_fill(name, f, [b"v", 0, 1], conn)
        for _ in range(reads):
            assert near.lookup(name, 10.0) == b"v"
        near.invalidate(name, 2)
    assert near.start_fill(b"busy", 10.5) is None and near.cooled == 1
    assert near.start_fill(b"paid", 10.5) is not None
    assert b"paid" not in near.cool


def test_a_key_that_keeps_not_paying_off_cools_down_longer_each_time() -> None:
    """Each copy of a key invalidated too soon doubles its cool-down (up to MAX_COOL_S); a copy that pays off resets it."""
    near, conn = NearCache(1 << 20), Conn(lease_from=0.0)
    now = 0.0
    periods = []
    for _ in range(7):
        f = near.start_fill(b"busy", now)
        assert f is not None, now
        near.end_fill(b"busy", f, [b"v", 0, 1], conn)
        near.invalidate(b"busy", 2)  # written before it answered a read
        until, period = near.cool[b"busy"]
        assert until == now + period
        assert near.start_fill(b"busy", until - 0.01) is None
        periods.append(period)
        now = until
    c = NearCache.COOL_S
    assert periods == [c, 2 * c, 4 * c, 8 * c, 16 * c, NearCache.MAX_COOL_S, NearCache.MAX_COOL_S]
    f = near.start_fill(b"busy", now)
    assert f is not None
    conn.lease_from = now
    near.end_fill(b"busy", f, [b"v", 0, 3], conn)
    for _ in range(NearCache.MIN_HITS):
        assert near.lookup(b"busy", now) == b"v"
    near.invalidate(b"busy", 4)  # this copy paid off
    assert b"busy" not in near.cool and near.start_fill(b"busy", now) is not None


def test_clear_drops_every_copy_and_poisons_the_fills_in_flight() -> None:
    near, conn = NearCache(1 << 20), Conn()
    fill(near, b"a", b"v", conn)
    fill(near, b"b", b"v", conn)
    f = near.start_fill(b"k")
    assert f is not None
    near.clear()  # a new ring view
    assert not near.entries and near.bytes == 0 and near.invalidations == 2
    f2 = near.start_fill(b"k")  # a fill under the new view
    assert f2 is not None
    near.end_fill(b"k", f, [b"old-view", 0, 1], conn)  # the old view's fill ends: discarded
    assert b"k" not in near.entries and near.fills_discarded == 1
    assert near.filling.get(b"k") is f2  # and it leaves the new fill in flight alone
    near.end_fill(b"k", f2, [b"new-view", 0, 1], conn)
    assert near.lookup(b"k", 0.0) == b"new-view"


@pytest.mark.parametrize("version", [0, 1, 2**63 - 1])
def test_gone_invalidations_drop_any_copy(version: int) -> None:
    near, conn = NearCache(1 << 20), Conn()
    fill(near, b"k", b"v", conn, version=version)
    near.invalidate(b"k", 2**63 - 1)  # GONE: the key left its owner
    assert not near.entries


# -- write-through (KEEP_COPY) ---------------------------------------------------------------


def test_a_write_through_replaces_the_copy_when_its_answer_comes() -> None:
    """This master's own SET of a copied key: the old copy goes at once, the write's answer is the new copy, reads carried over."""
    near, conn = NearCache(1 << 20), Conn(lease_from=10.0)
    assert near.write_through(b"k", 10.0) is None  # no copy and no fill: nothing to keep
    assert fill(near, b"k", b"v1", conn)
    for _ in range(3):
        assert near.lookup(b"k", 10.0) == b"v1"
    f = near.write_through(b"k", 10.0)
    assert f is not None and near.lookup(b"k", 10.0) is None  # the old value is never answered after the write left
    assert not near.may_fill(b"k", 10.0)  # reads go to the owner until the answer
    near.end_fill(b"k", f, [b"v2", 0, 2], conn)
    assert near.lookup(b"k", 10.0) == b"v2"
    assert near.entries[b"k"][4] == 4  # 3 reads of v1, 1 of v2
    assert near.write_throughs == 1 and near.stats()["near_cache_write_throughs"] == 1
    assert near.bytes == size(b"k", b"v2")


def test_a_write_through_overtaken_by_a_newer_invalidation_stores_nothing() -> None:
    """Another master's write reached the owner after this one: its push (a newer version) arrived before this write's answer."""
    near, conn = NearCache(1 << 20), Conn(lease_from=10.0)
    assert fill(near, b"k", b"v1", conn)
    f = near.write_through(b"k", 10.0)
    assert f is not None
    near.invalidate(b"k", 3)
    near.end_fill(b"k", f, [b"v2", 0, 2], conn)
    assert b"k" not in near.entries and near.fills_discarded == 1
    f = near.write_through(b"k", 10.0)
    assert f is None  # no copy, no fill: the next write is a plain one


def test_a_second_own_write_overtakes_the_first_without_a_cool_down() -> None:
    """Two SETs of the key in flight: the first's answer is not stored, the second's is, and the key does not cool down."""
    near, conn = NearCache(1 << 20, min_hits=8), Conn(lease_from=10.0)
    assert fill(near, b"k", b"v1", conn)
    first = near.write_through(b"k", 10.0)
    second = near.write_through(b"k", 10.0)
    assert first is not None and second is not None and first is not second
    near.end_fill(b"k", first, [b"v2", 0, 2], conn)
    assert b"k" not in near.entries and not near.cool
    near.end_fill(b"k", second, [b"v3", 0, 3], conn)
    assert near.lookup(b"k", 10.0) == b"v3" and near.cooled == 0


def test_a_view_change_during_a_write_through_stores_nothing() -> None:
    near, conn = NearCache(1 << 20), Conn(lease_from=10.0)
    assert fill(near, b"k", b"v1", conn)
    f = near.write_through(b"k", 10.0)
    assert f is not None
    near.clear()
    near.end_fill(b"k", f, [b"v2", 0, 2], conn)
    assert b"k" not in near.entries


# -- values pushed by the owner (``update``) --------------------------------------------------


def test_a_pushed_value_updates_a_copy_read_since_it_was_stored() -> None:
    near, conn = NearCache(1 << 20), Conn()
    assert fill(near, b"k", b"v1", conn, version=10)
    assert near.lookup(b"k", 0.0) == b"v1"
    expires = wall_ms() + 60_000
    assert near.update(b"k", 20, b"value two", expires, conn) is True
    assert near.entries[b"k"][:3] == [b"value two", expires, 20] and near.updates == 1
    assert near.bytes == size(b"k", b"value two")
    assert near.lookup(b"k", 0.0) == b"value two"
    assert near.update(b"k", 15, b"older", 0, conn) is True  # a version this copy already passed: unchanged
    assert near.lookup(b"k", 0.0) == b"value two" and near.updates == 1
    near.invalidate(b"k", 20)  # versions still guard: an invalidation of the same version drops it
    assert b"k" not in near.entries


def test_a_pushed_value_drops_a_copy_not_read_since_or_from_another_connection() -> None:
    """Copies that do not pay off are dropped as an invalidation would (and the owner is told: False)."""
    near, conn, other = NearCache(1 << 20), Conn(), Conn()
    assert fill(near, b"unread", b"v", conn, version=1)
    assert near.update(b"unread", 2, b"w", 0, conn) is False  # never read since its fill
    assert b"unread" not in near.entries and near.cooled == 1  # and it had answered fewer than min_hits
    assert fill(near, b"elsewhere", b"v", conn, version=1)
    near.lookup(b"elsewhere", 0.0)
    assert near.update(b"elsewhere", 2, b"w", 0, other) is False  # subscribed on another connection
    assert fill(near, b"expired", b"v", conn, version=1)
    near.lookup(b"expired", 0.0)
    assert near.update(b"expired", 2, b"w", wall_ms() - 1, conn) is False
    assert fill(near, b"big", b"v", conn, version=1)
    near.lookup(b"big", 0.0)
    assert near.update(b"big", 2, b"w" * (1 << 20), 0, conn) is False  # over the whole budget
    assert not near.entries and near.bytes == 0 and near.updates == 0
    assert near.update(b"never", 5, b"w", 0, conn) is False  # no copy at all


def test_a_pushed_value_overtakes_a_fill_in_flight_which_is_still_held() -> None:
    """A read or a write of the key in flight: the owner must keep the subscription (True), and the older fill is not stored."""
    near, conn = NearCache(1 << 20), Conn()
    f = near.start_fill(b"k")
    assert f is not None
    assert near.update(b"k", 7, b"pushed", 0, conn) is True
    near.end_fill(b"k", f, [b"read before the write", 0, 7], conn)
    assert b"k" not in near.entries and near.fills_discarded == 1

    assert fill(near, b"w", b"v1", conn, version=1)
    near.lookup(b"w", 0.0)
    wf = near.write_through(b"w", 0.0)  # this master's own write in flight
    assert wf is not None
    assert near.update(b"w", 5, b"another master's", 0, conn) is True
    near.end_fill(b"w", wf, [b"own, newer", 0, 6], conn)
    assert near.lookup(b"w", 0.0) == b"own, newer"


def test_a_pushed_value_keeps_the_byte_bound() -> None:
    one = size(b"k0", b"x" * 100)
    near, conn = NearCache(3 * one), Conn()
    for i in range(3):
        assert fill(near, b"k%d" % i, b"x" * 100, conn)
        near.lookup(b"k%d" % i, 0.0)
    assert near.update(b"k2", 5, b"x" * 150, 0, conn) is True  # grows by 50: the oldest copy goes
    assert list(near.entries) == [b"k1", b"k2"] and near.evictions == 1
    assert near.bytes == one + size(b"k2", b"x" * 150) <= near.max_bytes
