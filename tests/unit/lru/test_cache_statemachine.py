"""Stateful test: ``LRUCache`` against a plain ``OrderedDict`` model.

The model restates the documented semantics as simply as possible (LRU order
is the dict order, expired entries linger until something touches them,
eviction ignores expiry, tombstones in record order, every part of the
charging rule: object headers and rounding, expiries and tombstones) and every rule
compares results; invariants compare sizes and counters after each step and
run ``check_valid()``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dcache.lru import INT64_MAX, INT64_MIN, EntryCost, EntryTooLargeError, IntegerOverflowError, LRUCache, NotAnInt64Error

#: A small charging rule with every part of the real one: per entry, per
#: bytes object (header and rounding), per expiry, per tombstone.
OVERHEAD = 8
HEADER = 3
ALIGN = 4
EXPIRY = 5
TOMBSTONE = 6
TOMB_TTL = 40
MAX_TOMBS = 3
START = 1_000

keys = st.sampled_from([b"a", b"b", b"c", b"long-key-d"])
plain_values = st.binary(max_size=48)
int_values = st.one_of(
    st.integers(-3, 3).map(lambda n: b"%d" % n),
    st.integers(INT64_MIN, INT64_MAX).map(lambda n: b"%d" % n),
    st.sampled_from([b"-0", b"007", b"+3", b" 4", b"x", b"", b"9223372036854775808"]),
)
values = st.one_of(plain_values, int_values)
ttls = st.one_of(st.none(), st.integers(-2, 40))  # <= 0: an already-passed expiry
advances = st.one_of(st.sampled_from([0, 1, 5, 10]), st.integers(0, 40))
versions = st.integers(1, 12)
deltas = st.one_of(st.integers(-5, 5), st.sampled_from([INT64_MAX, INT64_MIN, 2**64]))

_INT_RE = re.compile(rb"-?(0|[1-9][0-9]{0,18})")


def model_parse(value: bytes) -> int:
    if not _INT_RE.fullmatch(value) or value == b"-0":
        raise NotAnInt64Error
    n = int(value)
    if not INT64_MIN <= n <= INT64_MAX:
        raise NotAnInt64Error
    return n


@dataclass
class M:  # one model entry
    value: bytes
    exp: int
    version: int


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now


class LRUMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.d: OrderedDict[bytes, M] = OrderedDict()  # LRU first
        self.tombs: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self.c = {"hits": 0, "misses": 0, "evictions": 0, "expirations": 0, "sets": 0, "deletes": 0}
        self.cache: LRUCache

    @initialize(max_bytes=st.integers(30, 200), max_items=st.sampled_from([0, 0, 2, 3, 5]))
    def init(self, max_bytes: int, max_items: int) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.cache = LRUCache(
            max_bytes,
            max_items,
            clock=self.clock,
            cost=EntryCost(entry=OVERHEAD, header=HEADER, align=ALIGN, expiry=EXPIRY, tombstone=TOMBSTONE),
            tombstone_ttl_ms=TOMB_TTL,
            max_tombstones=MAX_TOMBS,
        )

    # ------------------------------------------------------------ the model

    @property
    def now(self) -> int:
        return self.clock.now

    @staticmethod
    def obj(n: int) -> int:  # a bytes object: header, and rounding up to ALIGN at most
        return n + HEADER + ALIGN - 1

    def size(self, key: bytes, value: bytes, exp: int) -> int:
        size = OVERHEAD + self.obj(len(key)) + self.obj(len(value))
        return size + EXPIRY + self.obj(len(key)) if exp else size

    def model_bytes(self) -> int:
        entries = sum(self.size(k, m.value, m.exp) for k, m in self.d.items())
        return entries + sum(TOMBSTONE + self.obj(len(k)) for k in self.tombs)

    def expired(self, m: M) -> bool:
        return m.exp != 0 and m.exp <= self.now

    def live(self, key: bytes) -> M | None:
        m = self.d.get(key)
        if m is not None and self.expired(m):
            del self.d[key]
            self.c["expirations"] += 1
            return None
        return m

    def over(self) -> bool:
        return self.model_bytes() > self.max_bytes or bool(self.max_items and len(self.d) > self.max_items)

    def evict(self, keep: bytes | None) -> None:
        """LRU entries but ``keep`` first, then the oldest tombstones, then ``keep``."""
        for k in list(self.d):
            if not self.over():
                break
            if k != keep:
                del self.d[k]
                self.c["evictions"] += 1
        while self.tombs and self.model_bytes() > self.max_bytes:
            self.tombs.popitem(last=False)
        if keep is not None and self.model_bytes() > self.max_bytes:
            del self.d[keep]
            self.c["evictions"] += 1

    def store(self, key: bytes, value: bytes, exp: int, version: int) -> None:
        self.tombs.pop(key, None)
        self.c["sets"] += 1
        self.d[key] = M(value, exp, version)
        self.d.move_to_end(key)
        self.evict(key)

    def tomb_version(self, key: bytes) -> int:
        t = self.tombs.get(key)
        if t is None:
            return 0
        if t[1] <= self.now:
            del self.tombs[key]
            return 0
        return t[0]

    def record_tomb(self, key: bytes, version: int) -> None:
        if version <= self.tomb_version(key):
            return
        self.tombs[key] = (version, self.now + TOMB_TTL)
        self.tombs.move_to_end(key)
        while len(self.tombs) > MAX_TOMBS:
            self.tombs.popitem(last=False)
        if self.model_bytes() > self.max_bytes:
            self.evict(None)

    def expiry(self, ttl: int | None) -> int:
        return 0 if ttl is None else self.now + ttl

    # ---------------------------------------------------------------- rules

    @rule(key=keys)
    def get(self, key: bytes) -> None:
        m = self.d.get(key)
        if m is None or self.expired(m):
            if m is not None:
                del self.d[key]
                self.c["expirations"] += 1
            self.c["misses"] += 1
            expected = None
        else:
            self.d.move_to_end(key)
            self.c["hits"] += 1
            expected = m.value
        assert self.cache.get(key) == expected

    @rule(key=keys)
    def peek(self, key: bytes) -> None:
        m = self.d.get(key)
        expected = None if m is None or self.expired(m) else m.value
        assert self.cache.peek(key) == expected

    @rule(key=keys)
    def get_entry(self, key: bytes) -> None:
        m = self.live(key)
        e = self.cache.get_entry(key)
        if m is None:
            assert e is None
        else:
            assert e is not None and (e.key, e.value, e.expires_at, e.version) == (key, m.value, m.exp, m.version)

    @rule(key=keys)
    def exists(self, key: bytes) -> None:
        assert self.cache.exists(key) == (self.live(key) is not None)

    @rule(key=keys, value=values, ttl=ttls, version=st.integers(0, 12), mode=st.sampled_from(["", "nx", "xx"]))
    def set(self, key: bytes, value: bytes, ttl: int | None, version: int, mode: str) -> None:
        exp = self.expiry(ttl)

        def cache_set() -> bool:
            return self.cache.set(key, value, expires_at=exp, version=version, nx=mode == "nx", xx=mode == "xx")

        if self.size(key, value, exp) > self.max_bytes:
            try:
                cache_set()
            except EntryTooLargeError:
                return
            raise AssertionError("expected EntryTooLargeError")
        m = self.d.get(key)
        if mode:
            is_live = m is not None and not self.expired(m)
            if (mode == "nx") == is_live:
                assert cache_set() is False
                return
        if exp and exp <= self.now:
            self.tombs.pop(key, None)
            self.c["sets"] += 1
            if m is not None:
                del self.d[key]
                self.c["expirations"] += 1
        else:
            self.store(key, value, exp, version)
        assert cache_set() is True

    @rule(key=keys, value=plain_values, ttl=ttls, version=versions)
    def apply(self, key: bytes, value: bytes, ttl: int | None, version: int) -> None:
        exp = self.expiry(ttl)
        if self.size(key, value, exp) > self.max_bytes:
            try:
                self.cache.apply(key, value, expires_at=exp, version=version)
            except EntryTooLargeError:
                return
            raise AssertionError("expected EntryTooLargeError")
        expected = False
        if not (exp and exp <= self.now):
            m = self.live(key)
            if (m is None or version > m.version) and (not self.tombs or version > self.tomb_version(key)):
                self.store(key, value, exp, version)
                expected = True
        assert self.cache.apply(key, value, expires_at=exp, version=version) is expected

    @rule(key=keys, version=st.one_of(st.just(0), versions))
    def delete(self, key: bytes, version: int) -> None:
        m = self.live(key)
        if m is not None:
            del self.d[key]
            self.c["deletes"] += 1
        if version:
            self.record_tomb(key, version)
        assert self.cache.delete(key, version=version) is (m is not None)

    @rule(key=keys, version=versions)
    def apply_delete(self, key: bytes, version: int) -> None:
        m = self.live(key)
        removed = m is not None and m.version < version
        if removed:
            del self.d[key]
            self.c["deletes"] += 1
        self.record_tomb(key, version)
        assert self.cache.apply_delete(key, version=version) is removed

    @rule(key=keys)
    def tombstone_version(self, key: bytes) -> None:
        assert self.cache.tombstone_version(key) == self.tomb_version(key)

    @rule(key=keys)
    def touch(self, key: bytes) -> None:
        m = self.live(key)
        if m is not None:
            self.d.move_to_end(key)
        assert self.cache.touch(key) is (m is not None)

    @rule(key=keys, ttl=st.integers(-2, 60))
    def expire(self, key: bytes, ttl: int) -> None:
        m = self.live(key)
        if m is not None:
            if ttl <= 0:
                del self.d[key]
                self.c["deletes"] += 1
            else:
                added = m.exp == 0
                m.exp = self.now + ttl
                if added and self.model_bytes() > self.max_bytes:
                    self.evict(key)
        assert self.cache.expire(key, ttl) is (m is not None)

    @rule(key=keys)
    def persist(self, key: bytes) -> None:
        m = self.live(key)
        had = m is not None and m.exp != 0
        if m is not None:
            m.exp = 0
        assert self.cache.persist(key) is had

    @rule(key=keys)
    def ttl_ms(self, key: bytes) -> None:
        m = self.d.get(key)
        if m is None:
            expected = -2
        elif m.exp == 0:
            expected = -1
        elif self.expired(m):
            del self.d[key]
            self.c["expirations"] += 1
            expected = -2
        else:
            expected = m.exp - self.now
        assert self.cache.ttl_ms(key) == expected

    @rule(key=keys, delta=deltas, version=st.integers(0, 12))
    def incr(self, key: bytes, delta: int, version: int) -> None:
        m = self.live(key)
        error: type[Exception] | None = None
        result = 0
        try:
            current = 0 if m is None else model_parse(m.value)
            result = current + delta
            if not INT64_MIN <= result <= INT64_MAX:
                raise IntegerOverflowError
            value = b"%d" % result
            exp = 0 if m is None else m.exp
            if self.size(key, value, exp) > self.max_bytes:
                raise EntryTooLargeError
            self.store(key, value, exp, version)
        except (NotAnInt64Error, IntegerOverflowError, EntryTooLargeError) as exc:
            error = type(exc)
        if error is None:
            assert self.cache.incr(key, delta, version=version) == result
        else:
            try:
                self.cache.incr(key, delta, version=version)
            except error:
                return
            raise AssertionError(f"expected {error.__name__}")

    @rule(ms=advances)
    def advance_clock(self, ms: int) -> None:
        self.clock.now += ms

    def purge_tombs(self, n: int) -> None:
        for _ in range(n):
            if not self.tombs:
                break
            k, (_, exp) = next(iter(self.tombs.items()))
            if exp > self.now:
                break
            del self.tombs[k]

    @rule(n=st.integers(1, 4))
    def expire_some(self, n: int) -> None:
        due = sorted((m.exp, k) for k, m in self.d.items() if self.expired(m))
        removed = self.cache.expire_some(n)
        assert 0 <= removed <= n
        # stale heap items may end a call early, but removal is in expiry order
        for _, k in due[:removed]:
            del self.d[k]
        self.c["expirations"] += removed
        self.purge_tombs(n)
        assert [k for k, _, _, _ in self.cache.items(include_expired=True)] == list(self.d)

    @rule()
    def expire_all(self) -> None:
        due = [k for k, m in self.d.items() if self.expired(m)]
        assert self.cache.expire_some(10_000) == len(due)
        for k in due:
            del self.d[k]
        self.c["expirations"] += len(due)
        self.purge_tombs(10_000)

    @precondition(lambda self: len(self.d) > 0)
    @rule()
    def clear(self) -> None:
        self.d.clear()
        self.tombs.clear()
        self.cache.clear()

    @rule()
    def items(self) -> None:
        expected = [(k, m.value, m.exp, m.version) for k, m in self.d.items() if not self.expired(m)]
        assert self.cache.snapshot_items() == expected

    # ----------------------------------------------------------- invariants

    @invariant()
    def structure_is_valid(self) -> None:
        self.cache.check_valid()

    @invariant()
    def sizes_match(self) -> None:
        assert len(self.cache) == len(self.d)
        assert self.cache.bytes_used == self.model_bytes()
        assert self.cache.tombstone_count == len(self.tombs)

    @invariant()
    def counters_match(self) -> None:
        stats = self.cache.stats()
        assert {k: stats[k] for k in self.c} == self.c

    @invariant()
    def lru_order_matches(self) -> None:
        assert [k for k, _, _, _ in self.cache.items(include_expired=True)] == list(self.d)


LRUMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLRUCache = LRUMachine.TestCase
