"""Hot keys and the near cache of a master: answering the hottest reads without asking an aux node.

``HotKeys`` watches the read stream with a count-min sketch (two rows of
``width`` counters, halved every ``window`` reads so counts decay) and keeps
the top keys it met, with their estimated read rates, for HOTKEYS and the
metrics. Its cost per read is constant: one hash, two counter updates. The
halving is lazy: a window's end only advances an epoch, and a counter is
shifted right by the epochs it missed when it is next read or counted.
Since ``(c >> 1) >> 1 == c >> 2``, it then holds exactly what halving every
counter at each window's end would have left, without a read that pays for
all ``2 * width`` counters (2.1 ms with the defaults: a loop stall every
``window * SAMPLE`` reads).

``NearCache`` holds copies of the keys ``HotKeys`` calls hot, within a byte
budget, and answers reads of them. It stays coherent by invalidation
(``dcache.auxnode.tracking``; docs/PROTOCOL.md "Near-cache tracking"):

* a copy is filled by ``GETV [key, true]`` on the owner's tracking
  connection, which subscribes this master to the key's next change; the
  owner pushes ``INVALIDATE`` (and waits for ``INVACK``) before it
  acknowledges any change, so a write acknowledged anywhere has removed
  every master's copy first;
* a copy is served only within ``NEAR_LEASE_S`` of sending a PING that the
  owner answered on that connection (its lease, counted from the send, see
  ``AuxLink._renew_lease``) and before the entry's own expiry; a master cut
  off from an owner stops serving its copies by itself;
* a new ring view drops copies at once; so does this master's own write of
  a key, except a plain SET to an owner that keeps a writer's subscription
  (``SetFlag.KEEP_COPY``): the write goes on the tracking connection, the
  one every request to that node goes on (``write_through``), the owner
  pushes it no invalidation for it, and its answer stores the written
  value as the new copy;
* an owner that lists ``"value-push"`` in HELLO is asked to push values
  (``GETV [key, 2]``): another master's write of a key then updates this
  master's copy instead of dropping it (``update``), so a hot key written
  through several masters keeps a copy in each;
* versions settle the races left: an invalidation drops copies no newer than
  its version, and a fill that an invalidation of the same key overtook
  (any version at least the fill's) is not stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from random import Random
from typing import Any

from ..hlc import wall_ms
from ..protocol.limits import NEAR_LEASE_S

__all__ = ["HotKeys", "NearCache", "ENTRY_OVERHEAD"]

#: ``HotKeys`` counts one read in this many on average, after gaps drawn at random (a fixed stride
#: would never count a key whose reads come at a multiple of it): a quarter of the cost per GET, and
#: a hot key, read thousands of times a second, is still counted hundreds of times.
SAMPLE = 4
_GAP_MASK = 1023

#: Bytes a near-cache entry is charged on top of its key and value (dict slot, tuple, ints).
ENTRY_OVERHEAD = 160


class HotKeys:
    """A decaying frequency sketch of the keys read, and the top keys it saw.

    ``note(key)`` counts one read in ``sample`` (at random, so every key's
    reads are sampled alike) and then returns the key's
    estimated count: counted reads in the current window plus half the
    previous window's, and so on. A key is *hot* when that reaches
    ``hot_count``. With the defaults (``width`` 65536, ``window`` 65536
    counted reads) collisions add about 2 to a counter (a counter holds the
    decayed sum of ``2 * window / width`` counted reads of other keys), so a
    key with uniform traffic is hot only if both its counters collide far
    beyond that (about one key in a million); the hot threshold of 8 is a
    key taking about 1 read in 16,000.

    A key's counters are ``hash(key) & (width - 1)`` in the first row and
    ``(hash(key) >> 24) & (width - 1)`` in the second; its estimate is the
    smaller. At the end of each window every counter is halved (rounding
    down), lazily (module note): no read costs more than two counters.
    """

    __slots__ = (
        "_a",
        "_b",
        "_a_epoch",
        "_b_epoch",
        "_epoch",
        "_mask",
        "window",
        "hot_count",
        "_n",
        "_sample",
        "_gaps",
        "_gap",
        "_skip",
        "top",
        "top_size",
        "_top_min",
        "_since",
        "_last_window_s",
        "reads",
    )

    def __init__(self, width: int = 65536, window: int = 65536, hot_count: int = 8, top_size: int = 64, sample: int = SAMPLE) -> None:
        """``sample``: count one read in that many (1: every read; tests use it for exact counts)."""
        if width & (width - 1) or width <= 0:
            raise ValueError("width must be a power of two")
        self._a = [0] * width
        self._b = [0] * width
        #: The window each counter was last brought up to (its halvings since are still owed), and the current one.
        self._a_epoch = [0] * width
        self._b_epoch = [0] * width
        self._epoch = 0
        self._mask = width - 1
        self.window = window
        self.hot_count = hot_count
        self._n = 0
        self._sample = sample
        # Reads skipped between two counted ones: random gaps averaging ``sample``, drawn once.
        rng = Random(0x5EED)
        self._gaps = [rng.randint(1, 2 * sample - 1) for _ in range(_GAP_MASK + 1)] if sample > 1 else [1] * (_GAP_MASK + 1)
        self._gap = 0
        self._skip = 1
        #: The top keys met: key -> last estimated count (at most ``top_size``).
        self.top: dict[bytes, int] = {}
        self.top_size = top_size
        self._top_min = 0
        self._since = time.monotonic()
        self._last_window_s = 0.0
        #: Reads noted since start.
        self.reads = 0

    def note(self, key: bytes) -> int:
        """Count one read of ``key``: one read in ``sample`` is counted; return its estimated count then, else 0."""
        skip = self._skip - 1
        if skip:
            self._skip = skip
            return 0
        gi = self._gap = (self._gap + 1) & _GAP_MASK
        self._skip = self._gaps[gi]
        n = self._n = self._n + 1
        h = hash(key)
        epoch = self._epoch
        a = self._a
        i = h & self._mask
        c = a[i]
        if self._a_epoch[i] != epoch:  # halve it for each window that ended since it was last touched
            c >>= epoch - self._a_epoch[i]
            self._a_epoch[i] = epoch
        c += 1
        a[i] = c
        b = self._b
        j = (h >> 24) & self._mask
        d = b[j]
        if self._b_epoch[j] != epoch:
            d >>= epoch - self._b_epoch[j]
            self._b_epoch[j] = epoch
        d += 1
        b[j] = d
        if d < c:
            c = d
        if n >= self.window:
            self._age()
        if c >= self.hot_count and not c & 7:  # the top list is refreshed every 8th count of a hot key
            self._offer(key, c)
        return c

    def _offer(self, key: bytes, count: int) -> None:
        top = self.top
        if key in top or len(top) < self.top_size:
            top[key] = count
        elif count > self._top_min:
            del top[min(top, key=top.__getitem__)]
            top[key] = count
        else:
            return
        self._top_min = min(top.values())

    def _age(self) -> None:
        """Halve every counter (the decay), once per ``window`` counted reads: lazily, see the module note."""
        self.reads += self._n
        self._n = 0
        self._epoch += 1
        top = self.top
        for key in list(top):
            c = top[key] >> 1
            if c < self.hot_count // 2:
                del top[key]
            else:
                top[key] = c
        self._top_min = min(top.values(), default=0)
        now = time.monotonic()
        self._last_window_s = now - self._since
        self._since = now

    def estimate(self, key: bytes) -> int:
        """The key's estimated count, without counting a read."""
        h = hash(key)
        i = h & self._mask
        j = (h >> 24) & self._mask
        epoch = self._epoch
        return min(self._a[i] >> (epoch - self._a_epoch[i]), self._b[j] >> (epoch - self._b_epoch[j]))

    def rate_of(self, count: int) -> float:
        """Reads per second a decayed count stands for (counts sum ``rate * (t + T)``: ``t`` in this window, ``T`` the last one)."""
        span = (time.monotonic() - self._since) + self._last_window_s
        return count * self._sample / span if span > 0 else 0.0

    def hottest(self, n: int) -> list[tuple[bytes, float]]:
        """The ``n`` hottest keys met, with their estimated reads per second, hottest first."""
        ranked = sorted(((k, self.estimate(k)) for k in self.top), key=lambda kc: kc[1], reverse=True)[:n]
        return [(k, self.rate_of(c)) for k, c in ranked]


class _Fill:
    """A fill in flight: the newest invalidation of its key met meanwhile."""

    __slots__ = ("seen", "hits")

    def __init__(self, hits: int = 0) -> None:
        self.seen = -1
        #: The reads the key's copies answered before this fill (a write's: the copy it replaces).
        self.hits = hits


#: ``_Fill.seen`` of a fill that a later write of this master overtook (above any version): it is
#: not stored, and, unlike a fill another master's write overtook, puts its key in no cool-down.
_OWN_WRITE = (1 << 64) + 1


class NearCache:
    """Copies of hot keys held by a master (see the module note).

    An entry is ``[value, expires_at, version, conn, hits, hits_then]``:
    ``conn`` is the tracking connection it was filled on, whose lease it
    lives by; ``hits`` the reads it answered; ``hits_then`` what ``hits``
    was when its value was last stored (a copy not read since is dropped,
    not updated, when its owner pushes a newer value: ``update``).

    Keys written about as often as they are read cost more to cache than
    they save (a fill, a push and its acknowledgement, a write held a round
    trip, for each copy). A copy invalidated after answering fewer than
    ``min_hits`` reads (default ``MIN_HITS``), or a fill overtaken by an invalidation, puts its key
    in a cool-down: no fill for ``COOL_S`` seconds, twice as long each time
    in a row up to ``MAX_COOL_S``, until a copy of it pays off (at most
    ``MAX_COOL`` keys remembered).
    """

    #: Reads a copy must answer before its invalidation for its key to stay worth filling.
    MIN_HITS = 8
    #: Seconds a key that did not pay off waits before it is filled again (the first time).
    COOL_S = 1.0
    #: Longest cool-down: a key written as often as it is read is tried again this often.
    MAX_COOL_S = 16.0
    #: Keys in a cool-down remembered at once (the oldest forgotten first).
    MAX_COOL = 4096

    def __init__(self, max_bytes: int, hot: HotKeys | None = None, min_hits: int = 8) -> None:
        """``min_hits``: ``MIN_HITS`` for this cache (``--near-cache-min-hits``; 0: no cool-down)."""
        self.max_bytes = max_bytes
        self.min_hits = min_hits
        self.hot = hot or HotKeys()
        self.entries: OrderedDict[bytes, list[Any]] = OrderedDict()
        #: key -> (``loop.time()`` before which it is not filled, the cool-down it got) (see the class note).
        self.cool: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self.bytes = 0
        self.filling: dict[bytes, _Fill] = {}
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.fills_discarded = 0
        self.invalidations = 0
        self.evictions = 0
        self.lease_lapses = 0
        self.cooled = 0
        self.write_throughs = 0
        self.updates = 0
        self._now = 0.0

    def lookup(self, key: bytes, now: float) -> bytes | None:
        """The value of a live copy of ``key`` (``now``: the loop's time), or None; counts a hit or a miss."""
        e = self.entries.get(key)
        if e is not None:
            value, expires_at, _, conn, _, _ = e
            if now - conn.lease_from < NEAR_LEASE_S and not conn.closed:
                if not expires_at or expires_at > wall_ms():
                    self.hits += 1
                    e[4] += 1
                    return value  # type: ignore[no-any-return]
            else:
                self.lease_lapses += 1
            self._remove(key)
        self.misses += 1
        return None

    def may_fill(self, key: bytes, now: float) -> bool:
        """Whether a fill of ``key`` may start at ``now``: none in flight, and the key not cooling down."""
        if key in self.filling:
            return False
        cooling = self.cool.get(key)
        return cooling is None or cooling[0] <= now

    def start_fill(self, key: bytes, now: float = 0.0) -> _Fill | None:
        """Begin filling ``key`` at ``now`` (loop time); None: a fill of it is in flight, or the key cools down."""
        if not self.may_fill(key, now):
            return None
        self._now = now
        f = self.filling[key] = _Fill()
        return f

    def end_fill(self, key: bytes, fill: _Fill, entry: Any, conn: Any) -> None:
        """A fill's answer: store ``entry`` (``[value, expires_at, version]``) unless an invalidation overtook it."""
        if self.filling.get(key) is fill:
            del self.filling[key]
        elif fill.seen < 1 << 64:
            fill.seen = 1 << 64  # the cache was cleared meanwhile (or, _OWN_WRITE, a write of this master overtook it)
        if entry is None or conn is None:
            return
        value, expires_at, version = entry
        if version <= fill.seen or (expires_at and expires_at <= wall_ms()):
            self.fills_discarded += 1
            if version <= fill.seen and self.min_hits and fill.seen != _OWN_WRITE:
                self._cool(key)
            return
        size = len(key) + len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        self._remove(key)
        self.entries[key] = [value, expires_at, version, conn, fill.hits, fill.hits]
        self.bytes += size
        self.fills += 1
        self._evict_over_budget()

    def invalidate(self, key: bytes, version: int) -> None:
        """``key`` changed to ``version``: drop a copy no newer, and poison a fill in flight."""
        f = self.filling.get(key)
        if f is not None and version > f.seen:
            f.seen = version
        e = self.entries.get(key)
        if e is not None and e[2] <= version:
            self._invalidated(key, e)

    def update(self, key: bytes, version: int, value: bytes, expires_at: int, conn: Any) -> bool:
        """The owner pushed ``key``'s written ``value`` (its subscription for values, on ``conn``); whether this master still holds it.

        A copy on ``conn`` that was read since it was stored takes the value
        (unless it is already as new: this master's own write answered
        first); one not read since, one from another connection, an expired
        value or one over the budget is dropped, as an invalidation would
        (with its cool-down). A fill in flight is overtaken as by an
        invalidation. True while this master has a copy of ``key`` or a read
        or write of it in flight: only otherwise may the owner end the
        subscription (``INVACK [seq, keys]``, docs/PROTOCOL.md).
        """
        f = self.filling.get(key)
        if f is not None and version > f.seen:
            f.seen = version
        e = self.entries.get(key)
        if e is None:
            return f is not None
        if e[2] >= version:
            return True
        size = len(key) + len(value) + ENTRY_OVERHEAD
        if e[3] is not conn or e[4] == e[5] or (expires_at and expires_at <= wall_ms()) or size > self.max_bytes:
            self._invalidated(key, e)
            return f is not None
        self.bytes += len(value) - len(e[0])
        e[0] = value
        e[1] = expires_at
        e[2] = version
        e[5] = e[4]
        self.updates += 1
        self._evict_over_budget()
        return key in self.entries or f is not None

    def _invalidated(self, key: bytes, e: list[Any]) -> None:
        """Drop the copy ``e`` of ``key`` as a change does: cool the key down if it answered fewer than ``min_hits`` reads."""
        self._remove(key)
        self.invalidations += 1
        if e[4] < self.min_hits:
            self._cool(key)
        elif self.cool:
            self.cool.pop(key, None)  # it paid off: a later cool-down starts short again

    def _evict_over_budget(self) -> None:
        """Drop the oldest copies until the bytes are within ``max_bytes``."""
        while self.bytes > self.max_bytes:
            old, _ = next(iter(self.entries.items()))
            self._remove(old)
            self.evictions += 1

    def _cool(self, key: bytes) -> None:
        cool = self.cool
        last = cool.get(key)
        period = self.COOL_S if last is None else min(last[1] * 2, self.MAX_COOL_S)
        cool[key] = (self._now + period, period)
        cool.move_to_end(key)
        if len(cool) > self.MAX_COOL:
            cool.popitem(last=False)
        self.cooled += 1

    def write_through(self, key: bytes, now: float) -> _Fill | None:
        """This master writes ``key`` with KEEP_COPY (``now``: loop time): drop its copy and start the fill the write's answer ends.

        None when the key has neither a copy nor a fill in flight (nothing to
        keep; the write discards as any other). A fill in flight (a read's, or
        an earlier write's) is overtaken: not stored, and no cool-down; the
        write's own fill replaces it. The new copy inherits the reads its
        predecessor answered, so a key read and written by this master alone
        does not cool down for its own writes.
        """
        e = self.entries.get(key)
        f = self.filling.get(key)
        if e is not None:
            hits = e[4]
            self._remove(key)
        elif f is not None:
            hits = f.hits
        else:
            return None
        if f is not None:
            f.seen = _OWN_WRITE
        self._now = now
        f = self.filling[key] = _Fill(hits)
        self.write_throughs += 1
        return f

    def discard(self, key: bytes) -> None:
        """Drop ``key``'s copy and poison its fill (this master writes the key)."""
        self.invalidate(key, 1 << 64)

    def clear(self) -> None:
        """Drop every copy and poison every fill in flight (a new view)."""
        for f in self.filling.values():
            f.seen = 1 << 64
        self.filling.clear()
        self.invalidations += len(self.entries)
        self.entries.clear()
        self.bytes = 0

    def _remove(self, key: bytes) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.bytes -= len(key) + len(e[0]) + ENTRY_OVERHEAD

    def stats(self) -> dict[str, int]:
        """Counters and sizes for STATS and the metrics."""
        return {
            "near_cache_keys": len(self.entries),
            "near_cache_bytes": self.bytes,
            "near_cache_max_bytes": self.max_bytes,
            "near_cache_hits": self.hits,
            "near_cache_misses": self.misses,
            "near_cache_fills": self.fills,
            "near_cache_fills_discarded": self.fills_discarded,
            "near_cache_invalidations": self.invalidations,
            "near_cache_evictions": self.evictions,
            "near_cache_lease_lapses": self.lease_lapses,
            "near_cache_cooled": self.cooled,
            "near_cache_write_throughs": self.write_throughs,
            "near_cache_updates": self.updates,
        }
